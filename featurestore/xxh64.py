"""XXH64 (seed 0) in compiled code, bit for bit the ``xxhash`` package's ``xxh64_intdigest``.

The featurizer hashes string values with ``xxhash``; the compiled wire scanner
(:mod:`featurestore.wire_scan`) hashes the same bytes straight out of the Kafka message buffer,
with no ``str`` or ``bytes`` object per value. Both must give the same ID, which
``tests/featurestore/test_xxh64.py`` checks against the package on random inputs.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_P1 = np.uint64(11400714785074694791)
_P2 = np.uint64(14029467366897019727)
_P3 = np.uint64(1609587929392839161)
_P4 = np.uint64(9650029242287828579)
_P5 = np.uint64(2870177450012600261)
_MASK63 = np.uint64((1 << 63) - 1)


@njit(cache=True, inline="always")
def _rotl(x: np.uint64, r: int) -> np.uint64:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


@njit(cache=True, inline="always")
def _read(buf: np.ndarray, i: int, width: int) -> np.uint64:
    """The little-endian unsigned integer in ``buf[i:i + width]``."""
    v = np.uint64(0)
    for k in range(width):
        v |= np.uint64(buf[i + k]) << np.uint64(8 * k)
    return v


@njit(cache=True, inline="always")
def _round(acc: np.uint64, lane: np.uint64) -> np.uint64:
    acc = acc + lane * _P2
    acc = _rotl(acc, 31)
    return acc * _P1


@njit(cache=True, inline="always")
def _merge(acc: np.uint64, lane: np.uint64) -> np.uint64:
    acc = acc ^ _round(np.uint64(0), lane)
    return acc * _P1 + _P4


@njit(cache=True)
def xxh64(buf: np.ndarray, start: int, stop: int) -> np.uint64:
    """XXH64 with seed 0 of ``buf[start:stop]`` (a uint8 array)."""
    n = stop - start
    i = start
    if n >= 32:
        v1 = _P1 + _P2
        v2 = _P2
        v3 = np.uint64(0)
        v4 = np.uint64(0) - _P1
        limit = stop - 32
        while i <= limit:
            v1 = _round(v1, _read(buf, i, 8))
            v2 = _round(v2, _read(buf, i + 8, 8))
            v3 = _round(v3, _read(buf, i + 16, 8))
            v4 = _round(v4, _read(buf, i + 24, 8))
            i += 32
        h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
        h = _merge(h, v1)
        h = _merge(h, v2)
        h = _merge(h, v3)
        h = _merge(h, v4)
    else:
        h = _P5
    h = h + np.uint64(n)
    while i + 8 <= stop:
        h = h ^ _round(np.uint64(0), _read(buf, i, 8))
        h = _rotl(h, 27) * _P1 + _P4
        i += 8
    if i + 4 <= stop:
        h = h ^ (_read(buf, i, 4) * _P1)
        h = _rotl(h, 23) * _P2 + _P3
        i += 4
    while i < stop:
        h = h ^ (np.uint64(buf[i]) * _P5)
        h = _rotl(h, 11) * _P1
        i += 1
    h = h ^ (h >> np.uint64(33))
    h = h * _P2
    h = h ^ (h >> np.uint64(29))
    h = h * _P3
    return h ^ (h >> np.uint64(32))


@njit(cache=True)
def hashed_id(buf: np.ndarray, start: int, stop: int) -> np.int64:
    """The feature ID of a string value whose UTF-8 bytes are ``buf[start:stop]``: its XXH64
    with the sign bit cleared, as :func:`featurestore.featurize.encode_value` computes it."""
    return np.int64(xxh64(buf, start, stop) & _MASK63)
