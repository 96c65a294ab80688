"""Labeled events straight from Kafka message bytes to the jagged feature IDs, in compiled code.

Parsing each message into a struct and then featurizing its values cost ~8 of the trainer's
~15 us per event, nearly all of it in creating and looking up Python objects (a ``str`` per ID
and feature value, a dict per event's features). This module scans the concatenated message
values once in a numba kernel, validates them, and writes each slot's IDs (XXH64 of the value's
bytes, the integer itself, or the bucket) into flat arrays, with no object per value.

**It is a fast path, never a second schema.** The scanner accepts a strict subset of what
:data:`featurestore.events.LabeledEventMsg` accepts and, for what it accepts, produces exactly
what decoding plus :meth:`featurestore.featurize.Featurizer.featurize_events` produce (same
IDs, labels, timestamps). Anything outside the subset makes :func:`scan_labeled_events` return
``None`` and the caller takes the struct path, which stays the one source of truth for what is
valid and for every dead-letter reason. The subset covers what producers emit: ASCII strings
without escape sequences; numbers that convert exactly by Clinger's fast path (at most 19
significant digits, mantissa <= 2^53, decimal exponent within +-22) — except timestamps and
rates and context weights, which are re-parsed by Python's ``float`` when they fall outside it;
no duplicate keys. ``tests/featurestore/test_wire_scan.py`` checks the equality on generated
and adversarial messages, including that nothing the struct refuses is accepted here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from featurestore.events import (
    MAX_CLUSTER,
    MAX_CONTEXT_CLUSTERS,
    MAX_FEATURE_NAME_LEN,
    MAX_FEATURES,
    MAX_ID_LEN,
    MAX_LIST_LEN,
    MAX_TS,
)
from featurestore.featurize import SlotIds, SparseBatch
from featurestore.labeled_batch import BatchContexts, LabeledBatch
from featurestore.schema import ModelConfig, SlotKind
from featurestore.xxh64 import hashed_id

# Top-level fields of a labeled event, in the order of _TOP_NAMES.
_TOP_NAMES = ("event_id", "ts", "user_id", "item_id", "label", "features", "request_id",
              "context", "p_true", "sample_rate")
_EVENT_ID, _TS, _USER_ID, _ITEM_ID, _LABEL, _FEATURES, _REQUEST_ID, _CONTEXT, _P_TRUE, \
    _SAMPLE_RATE = range(len(_TOP_NAMES))
_REQUIRED = (1 << _EVENT_ID) | (1 << _TS) | (1 << _USER_ID) | (1 << _ITEM_ID) | (1 << _LABEL)
# Numbers kept per event: columns of ``nums``.
_NUM_TS, _NUM_P_TRUE, _NUM_RATE = 0, 1, 2
# Value kinds of a feature (or id) token.
_ABSENT, _STR, _INT, _FLOAT, _LIST = 0, 1, 2, 3, 4
# Slot kinds in the kernel.
_CATEGORICAL, _BUCKETIZED, _MULTI = 0, 1, 2
_KIND_CODES = {SlotKind.CATEGORICAL: _CATEGORICAL, SlotKind.BUCKETIZED: _BUCKETIZED,
               SlotKind.MULTI_VALUED: _MULTI}
_MAX_EXACT_MANTISSA = 1 << 53
_MAX_INT_DIGITS = 18  # any 18-digit integer is inside int64 and inside the featurizer's range
_FLOAT_TO_ID_LIMIT = float(1 << 62)
_POW10 = np.array([10.0 ** k for k in range(23)])


def _names_table(names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    raw = [n.encode() for n in names]
    offsets = np.zeros(len(raw) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in raw], out=offsets[1:])
    return np.frombuffer(b"".join(raw) or b"\0", dtype=np.uint8).copy(), offsets


@njit(cache=True, inline="always")
def _skip_ws(buf: np.ndarray, i: int, stop: int) -> int:
    while i < stop:
        c = buf[i]
        if c != 32 and c != 9 and c != 10 and c != 13:
            break
        i += 1
    return i


@njit(cache=True, inline="always")
def _separator(buf: np.ndarray, i: int, stop: int, close: int) -> tuple[int, bool]:
    """After an item of an array or object: past the ``,`` and whitespace (``(next, False)``)
    or past the closing ``close`` (``(next, True)``); ``(-1, False)`` for anything else."""
    i = _skip_ws(buf, i, stop)
    if i >= stop:
        return -1, False
    if buf[i] == close:
        return i + 1, True
    if buf[i] != 44:
        return -1, False
    return _skip_ws(buf, i + 1, stop), False


@njit(cache=True)
def _match(buf: np.ndarray, s: int, e: int, names: np.ndarray, offs: np.ndarray) -> int:
    """Index of the name equal to ``buf[s:e]``, or -1."""
    n = e - s
    for k in range(offs.shape[0] - 1):
        a = offs[k]
        if offs[k + 1] - a != n:
            continue
        same = True
        for j in range(n):
            if buf[s + j] != names[a + j]:
                same = False
                break
        if same:
            return k
    return -1


@njit(cache=True)
def _string(buf: np.ndarray, i: int, stop: int) -> int:
    """End (the closing quote) of the plain ASCII string opening at ``buf[i]``; -1 if it is
    not one (no quote, an escape, a control or non-ASCII byte, no end)."""
    if i >= stop or buf[i] != 34:
        return -1
    j = i + 1
    while j < stop:
        c = buf[j]
        if c == 34:
            return j
        if c == 92 or c < 32 or c >= 128:
            return -1
        j += 1
    return -1


@njit(cache=True)
def _number(buf: np.ndarray, i: int, stop: int, out: np.ndarray) -> int:
    """Parse the JSON number at ``buf[i]``; return the index after it, or -1.

    ``out`` receives ``[is_int, int_ok, value, exact]``: ``int_ok`` is 1 for an integer token of
    at most 18 digits; ``exact`` is 1 when ``value`` is the correctly rounded double (Clinger's
    fast path: at most 17 significant digits, mantissa <= 2^53, decimal exponent within +-22).
    """
    j = i
    neg = False
    if j < stop and buf[j] == 45:
        neg = True
        j += 1
    if j >= stop or buf[j] < 48 or buf[j] > 57:
        return -1
    mant = 0
    sig = 0  # significant digits seen (leading zeros excluded)
    exp10 = 0
    digits = 0
    if buf[j] == 48:
        j += 1
        digits = 1
    else:
        while j < stop and 48 <= buf[j] <= 57:
            if sig < 18:
                mant = mant * 10 + (buf[j] - 48)
            else:
                exp10 += 1
            sig += 1
            digits += 1
            j += 1
    is_int = True
    if j < stop and buf[j] == 46:
        is_int = False
        j += 1
        if j >= stop or buf[j] < 48 or buf[j] > 57:
            return -1
        while j < stop and 48 <= buf[j] <= 57:
            d = buf[j] - 48
            if sig < 18:
                mant = mant * 10 + d
                exp10 -= 1
                if mant > 0:
                    sig += 1
            else:
                sig += 1
            j += 1
    if j < stop and (buf[j] == 101 or buf[j] == 69):
        is_int = False
        j += 1
        eneg = False
        if j < stop and (buf[j] == 43 or buf[j] == 45):
            eneg = buf[j] == 45
            j += 1
        if j >= stop or buf[j] < 48 or buf[j] > 57:
            return -1
        e = 0
        while j < stop and 48 <= buf[j] <= 57:
            if e < 100000:
                e = e * 10 + (buf[j] - 48)
            j += 1
        exp10 += -e if eneg else e
    if mant == 0:
        exact = sig <= 17
        value = 0.0
    else:
        exact = sig <= 17 and mant <= _MAX_EXACT_MANTISSA and -22 <= exp10 <= 22
        if exact:
            value = mant * _POW10[exp10] if exp10 >= 0 else mant / _POW10[-exp10]
        else:
            value = math.nan
    out[0] = 1.0 if is_int else 0.0
    out[1] = 1.0 if is_int and digits <= _MAX_INT_DIGITS else 0.0
    out[2] = -value if neg else value
    out[3] = 1.0 if exact else 0.0
    return j


@njit(cache=True)
def _int_value(buf: np.ndarray, s: int, e: int) -> int:
    """The integer of a JSON integer token of at most 18 digits."""
    neg = buf[s] == 45
    v = 0
    for j in range(s + 1 if neg else s, e):
        v = v * 10 + (buf[j] - 48)
    return -v if neg else v


@njit(cache=True)
def _value(buf: np.ndarray, i: int, stop: int, tok: np.ndarray, num: np.ndarray) -> int:
    """Validate one feature value at ``buf[i]`` (str, int64, finite float or list of str within
    the wire limits); ``tok`` gets ``[kind, start, end, int value]`` and ``num[2]`` the float.
    Returns the index after it, or -1 (outside the fast path's subset)."""
    c = buf[i]
    if c == 34:
        e = _string(buf, i, stop)
        if e < 0 or e - i - 1 > MAX_ID_LEN:
            return -1
        tok[0], tok[1], tok[2] = _STR, i + 1, e
        return e + 1
    if c == 91:
        j = _skip_ws(buf, i + 1, stop)
        count = 0
        if j < stop and buf[j] == 93:
            tok[0], tok[1], tok[2] = _LIST, i, j + 1
            return j + 1
        while True:
            e = _string(buf, j, stop)
            if e < 0 or e - j - 1 > MAX_ID_LEN:
                return -1
            count += 1
            if count > MAX_LIST_LEN:
                return -1
            j, done = _separator(buf, e + 1, stop, 93)
            if j < 0:
                return -1
            if done:
                tok[0], tok[1], tok[2] = _LIST, i, j
                return j
    if c == 45 or 48 <= c <= 57:
        e = _number(buf, i, stop, num)
        if e < 0 or (num[1] == 0.0 if num[0] == 1.0 else num[3] == 0.0):
            return -1
        if num[0] == 1.0:
            tok[0], tok[3] = _INT, _int_value(buf, i, e)
        else:
            tok[0] = _FLOAT
        tok[1], tok[2] = i, e
        return e
    return -1


@njit(cache=True)
def _literal(buf: np.ndarray, i: int, stop: int, word: bytes) -> int:
    n = len(word)
    if i + n > stop:
        return -1
    for k in range(n):
        if buf[i + k] != word[k]:
            return -1
    return i + n


@njit(cache=True)
def _context(buf: np.ndarray, i: int, stop: int, m: int, ctx: np.ndarray,
             num: np.ndarray) -> int:
    """A bandit context object at ``buf[i]``: ``{"clusters": [int], "weights": [number]}``,
    each key once, both present. ``ctx[0, m]`` gets the number of clusters (-1 while the two
    lengths differ), ``ctx[1 + 3k, m]`` cluster k, ``ctx[2 + 3k : 4 + 3k, m]`` the span of
    weight k; the weights' range and sum are checked by the caller. Returns the index after
    the object, or -1."""
    if buf[i] != 123:
        return -1
    i = _skip_ws(buf, i + 1, stop)
    seen = 0
    lengths = np.zeros(2, dtype=np.int64)
    while True:
        ke = _string(buf, i, stop)
        if ke < 0:
            return -1
        n = ke - i - 1
        key = -1
        if n == 8 and buf[i + 1] == 99:  # clusters
            key = 0
        elif n == 7 and buf[i + 1] == 119:  # weights
            key = 1
        if key < 0 or (seen >> key) & 1:
            return -1
        word = b"clusters" if key == 0 else b"weights"
        for k in range(n):
            if buf[i + 1 + k] != word[k]:
                return -1
        seen |= 1 << key
        i = _skip_ws(buf, ke + 1, stop)
        if i >= stop or buf[i] != 58:
            return -1
        i = _skip_ws(buf, i + 1, stop)
        if i >= stop or buf[i] != 91:
            return -1
        i = _skip_ws(buf, i + 1, stop)
        count = 0
        if i < stop and buf[i] == 93:
            i += 1
        else:
            while True:
                e = _number(buf, i, stop, num)
                if e < 0 or count >= MAX_CONTEXT_CLUSTERS:
                    return -1
                if key == 0:
                    if num[0] != 1.0 or num[1] != 1.0:
                        return -1
                    value = _int_value(buf, i, e)
                    if value < 0 or value > MAX_CLUSTER:
                        return -1
                    ctx[1 + 3 * count, m] = value
                else:
                    ctx[2 + 3 * count, m], ctx[3 + 3 * count, m] = i, e
                count += 1
                i, done = _separator(buf, e, stop, 93)
                if i < 0:
                    return -1
                if done:
                    break
        lengths[key] = count
        i, done = _separator(buf, i, stop, 125)
        if i < 0:
            return -1
        if done:
            break
    if seen != 3 or lengths[0] != lengths[1]:
        return -1  # the struct's own rule: the pydantic path words the reason
    ctx[0, m] = lengths[0]
    return i


@njit(cache=True, nogil=True)
def _context_weights(buf: np.ndarray, ctx: np.ndarray, weights: np.ndarray,
                     num: np.ndarray) -> int:
    """Each context's weights from their spans (NaN where Clinger's path does not apply, for
    Python's ``float``), summed left to right as ``sum()`` does: the number of NaNs, or -1 if
    a weight is out of [0, 1] or a sum exceeds 1 + 1e-6 (the struct's rules)."""
    inexact = 0
    for m in range(ctx.shape[1]):
        for k in range(ctx[0, m]):
            if _number(buf, ctx[2 + 3 * k, m], ctx[3 + 3 * k, m], num) < 0 or num[3] == 0.0:
                weights[m, k] = math.nan
                inexact += 1
            else:
                weights[m, k] = num[2]
    if inexact:
        return inexact
    return -1 if _bad_weights(ctx, weights) else 0


@njit(cache=True, nogil=True)
def _bad_weights(ctx: np.ndarray, weights: np.ndarray) -> bool:
    for m in range(ctx.shape[1]):
        total = 0.0
        for k in range(ctx[0, m]):
            w = weights[m, k]
            if not (0.0 <= w <= 1.0):
                return True
            total += w
        if total > 1.0 + 1e-6:
            return True
    return False


@njit(cache=True)
def _scan_one(buf: np.ndarray, start: int, stop: int, m: int, top: np.ndarray,
              top_offs: np.ndarray, feats: np.ndarray, feat_offs: np.ndarray,
              toks: np.ndarray, fvals: np.ndarray, nums: np.ndarray, spans: np.ndarray,
              labels: np.ndarray, num: np.ndarray, scratch: np.ndarray, ctx: np.ndarray
              ) -> bool:
    i = _skip_ws(buf, start, stop)
    if i >= stop or buf[i] != 123:
        return False
    i = _skip_ws(buf, i + 1, stop)
    seen = 0
    while True:
        ke = _string(buf, i, stop)
        if ke < 0:
            return False
        t = _match(buf, i + 1, ke, top, top_offs)
        if t < 0 or (seen >> t) & 1:
            return False
        seen |= 1 << t
        i = _skip_ws(buf, ke + 1, stop)
        if i >= stop or buf[i] != 58:
            return False
        i = _skip_ws(buf, i + 1, stop)
        if i >= stop:
            return False
        c = buf[i]
        if t in (_EVENT_ID, _USER_ID, _ITEM_ID, _REQUEST_ID):
            if t == _REQUEST_ID and c == 110:
                i = _literal(buf, i, stop, b"null")
                if i < 0:
                    return False
            else:
                e = _string(buf, i, stop)
                if e < 0 or e == i + 1 or e - i - 1 > MAX_ID_LEN:
                    return False
                if t in (_USER_ID, _ITEM_ID):
                    col = 0 if t == _USER_ID else 1
                    toks[m, col, 0], toks[m, col, 1], toks[m, col, 2] = _STR, i + 1, e
                elif t == _EVENT_ID:
                    spans[m, 0], spans[m, 1] = i + 1, e
                i = e + 1
        elif t in (_TS, _P_TRUE, _SAMPLE_RATE):
            col = _NUM_TS if t == _TS else (_NUM_P_TRUE if t == _P_TRUE else _NUM_RATE)
            if t != _TS and c == 110:
                i = _literal(buf, i, stop, b"null")
                if i < 0:
                    return False
                nums[m, col] = math.nan
            else:
                e = _number(buf, i, stop, num)
                if e < 0:
                    return False
                # Not exact: NaN, and the span for Python's float (see scan_labeled_events).
                nums[m, col] = num[2] if num[3] == 1.0 else math.nan
                spans[m, 2 + 2 * col], spans[m, 3 + 2 * col] = i, e
                i = e
        elif t == _LABEL:
            if c != 48 and c != 49:
                return False
            if i + 1 < stop and (48 <= buf[i + 1] <= 57 or buf[i + 1] == 46
                                 or buf[i + 1] == 101 or buf[i + 1] == 69):
                return False
            labels[m] = c - 48
            i += 1
        elif t == _FEATURES:
            if c != 123:
                return False
            i = _skip_ws(buf, i + 1, stop)
            count = 0
            if i < stop and buf[i] == 125:
                i += 1
            else:
                while True:
                    ke = _string(buf, i, stop)
                    if ke < 0 or ke - i - 1 > MAX_FEATURE_NAME_LEN:
                        return False
                    f = _match(buf, i + 1, ke, feats, feat_offs)
                    i = _skip_ws(buf, ke + 1, stop)
                    if i >= stop or buf[i] != 58:
                        return False
                    i = _skip_ws(buf, i + 1, stop)
                    if i >= stop:
                        return False
                    col = 2 + f
                    if f >= 0:
                        if toks[m, col, 0] != _ABSENT:
                            return False
                        i = _value(buf, i, stop, toks[m, col], num)
                        fvals[m, col] = num[2] if num[3] == 1.0 else math.nan
                    else:
                        i = _value(buf, i, stop, scratch, num)
                    if i < 0:
                        return False
                    count += 1
                    if count > MAX_FEATURES:
                        return False
                    i, done = _separator(buf, i, stop, 125)
                    if i < 0:
                        return False
                    if done:
                        break
        elif c == 110:  # "context": null
            i = _literal(buf, i, stop, b"null")
            if i < 0:
                return False
        else:
            i = _context(buf, i, stop, m, ctx, num)
            if i < 0:
                return False
        i, done = _separator(buf, i, stop, 125)
        if i < 0:
            return False
        if done:
            break
    return (seen & _REQUIRED) == _REQUIRED and _skip_ws(buf, i, stop) == stop


@njit(cache=True, nogil=True)
def _scan(buf: np.ndarray, bounds: np.ndarray, top: np.ndarray, top_offs: np.ndarray,
          feats: np.ndarray, feat_offs: np.ndarray, toks: np.ndarray, fvals: np.ndarray,
          nums: np.ndarray, spans: np.ndarray, labels: np.ndarray, ctx: np.ndarray) -> int:
    """Scan every message; the index of the first one outside the fast path, or -1."""
    num = np.empty(4)
    scratch = np.zeros(4, dtype=np.int64)  # the token of a feature no slot reads
    for m in range(bounds.shape[0] - 1):
        if not _scan_one(buf, bounds[m], bounds[m + 1], m, top, top_offs, feats, feat_offs,
                         toks, fvals, nums, spans, labels, num, scratch, ctx):
            return m
    return -1


@njit(cache=True)
def _list_items(buf: np.ndarray, s: int, e: int, ids: np.ndarray, k: int, write: bool) -> int:
    """Count (and with ``write``, hash into ``ids[k:]``) the strings of the validated list
    token ``buf[s:e]``; returns the count."""
    count = 0
    j = s + 1
    while j < e:
        if buf[j] == 34:
            end = j + 1
            while buf[end] != 34:
                end += 1
            if write:
                ids[k + count] = hashed_id(buf, j + 1, end)
            count += 1
            j = end + 1
        else:
            j += 1
    return count


@njit(cache=True)
def _split_parts(buf: np.ndarray, s: int, e: int, ids: np.ndarray, k: int, write: bool) -> int:
    """Count (and hash) the non-empty ``|``-separated parts of the string ``buf[s:e]``."""
    count = 0
    a = s
    for j in range(s, e + 1):
        if j == e or buf[j] == 124:
            if j > a:
                if write:
                    ids[k + count] = hashed_id(buf, a, j)
                count += 1
            a = j + 1
    return count


@njit(cache=True)
def _not_a_number(buf: np.ndarray, s: int, e: int) -> bool:
    """True when Python's ``float()`` certainly refuses the ASCII string ``buf[s:e]`` (the
    featurizer then gives an empty bag): it is empty, or holds a byte no float literal has
    and is not a spelling of inf, infinity or nan."""
    a, b = s, e
    while a < b and buf[a] == 32:
        a += 1
    while b > a and buf[b - 1] == 32:
        b -= 1
    if a < b and (buf[a] == 43 or buf[a] == 45):
        a += 1
    if a == b:
        return True
    for word in (b"inf", b"infinity", b"nan"):
        if b - a == len(word):
            same = True
            for k in range(b - a):
                if buf[a + k] | 32 != word[k]:
                    same = False
                    break
            if same:
                return False
    for j in range(s, e):
        c = buf[j]
        if not (48 <= c <= 57 or c in (32, 43, 45, 46, 95, 101, 69)):
            return True
    return False


@njit(cache=True)
def _bucket(bounds: np.ndarray, x: float) -> int:
    """``bisect.bisect_right(bounds, x)``, the same search step for step."""
    lo, hi = 0, bounds.shape[0]
    while lo < hi:
        mid = (lo + hi) // 2
        if x < bounds[mid]:
            hi = mid
        else:
            lo = mid + 1
    return lo


@njit(cache=True)
def _one_id(buf: np.ndarray, tok: np.ndarray, fval: float, kind: int, bounds: np.ndarray,
            num: np.ndarray) -> tuple[bool, int]:
    """The ID of a single-valued slot's token, or ``(False, 0)`` outside the fast path."""
    k = tok[0]
    if kind == _CATEGORICAL:
        if k == _STR:
            return True, hashed_id(buf, tok[1], tok[2])
        if k == _INT:
            return True, tok[3]
        if k == _FLOAT and fval == math.floor(fval) and abs(fval) < _FLOAT_TO_ID_LIMIT:
            return True, np.int64(fval)
        return False, 0
    # bucketized: Python's float() of the value, then bisect
    if k == _STR:
        if tok[2] == tok[1] or _number(buf, tok[1], tok[2], num) != tok[2] or num[3] == 0.0:
            return False, 0
        x = num[2]
    elif (k in (_INT, _FLOAT)) and not math.isnan(fval):
        x = fval
    else:
        return False, 0
    return True, _bucket(bounds, x)


@njit(cache=True, nogil=True)
def _encode_slot(buf: np.ndarray, toks: np.ndarray, fvals: np.ndarray, col: int, kind: int,
                 bounds: np.ndarray) -> tuple[bool, np.ndarray, np.ndarray]:
    """One slot's jagged IDs from the scanned tokens; ``ok`` False outside the fast path."""
    n = toks.shape[0]
    offsets = np.zeros(n + 1, dtype=np.int64)
    empty = np.empty(0, dtype=np.int64)
    for m in range(n):
        k = toks[m, col, 0]
        c = 0
        if k != _ABSENT:
            if kind == _BUCKETIZED and (k == _LIST or (k == _STR and _not_a_number(
                    buf, toks[m, col, 1], toks[m, col, 2]))):
                c = 0  # float() refuses it: an empty bag
            elif kind != _MULTI:
                c = 1
            elif k == _LIST:
                c = _list_items(buf, toks[m, col, 1], toks[m, col, 2], empty, 0, False)
            elif k == _STR:
                c = _split_parts(buf, toks[m, col, 1], toks[m, col, 2], empty, 0, False)
            elif k == _INT and not (buf[toks[m, col, 1]] == 45 and buf[toks[m, col, 1] + 1] == 48):
                c = 1  # str(int) is the token itself, "-0" aside
            else:
                return False, empty, offsets
        offsets[m + 1] = offsets[m] + c
    ids = np.empty(offsets[n], dtype=np.int64)
    num = np.empty(4)
    for m in range(n):
        k = toks[m, col, 0]
        if k == _ABSENT:
            continue
        at = offsets[m]
        if offsets[m + 1] == at:
            continue
        if kind != _MULTI:
            ok, ids[at] = _one_id(buf, toks[m, col], fvals[m, col], kind, bounds, num)
            if not ok:
                return False, empty, offsets
        elif k == _LIST:
            _list_items(buf, toks[m, col, 1], toks[m, col, 2], ids, at, True)
        elif k == _STR:
            _split_parts(buf, toks[m, col, 1], toks[m, col, 2], ids, at, True)
        else:
            ids[at] = hashed_id(buf, toks[m, col, 1], toks[m, col, 2])
    return True, ids, offsets


@dataclass(frozen=True)
class WirePlan:
    """What the scanner needs of a model config: the feature names its slots read and, per
    slot, the column of its values, its kind and its bucket boundaries."""

    top: tuple[np.ndarray, np.ndarray]
    features: tuple[np.ndarray, np.ndarray]
    slots: tuple[tuple[str, int, int, np.ndarray], ...]  # (name, column, kind, boundaries)

    @classmethod
    def of(cls, config: ModelConfig) -> WirePlan:
        names = tuple(dict.fromkeys(s.source for s in config.slots
                                    if s.source not in ("user_id", "item_id")))
        columns = {"user_id": 0, "item_id": 1} | {n: 2 + k for k, n in enumerate(names)}
        slots = tuple((s.name, columns[s.source], _KIND_CODES[s.kind],
                       np.array(s.boundaries or (0.0,), dtype=np.float64)[:len(s.boundaries)])
                      for s in config.slots)
        return cls(_names_table(_TOP_NAMES), _names_table(names), slots)


def scan_labeled_events(values: list[bytes], plan: WirePlan) -> LabeledBatch | None:
    """The batch of labeled events in ``values`` (Kafka message values) ready to learn, or
    ``None`` when any value is outside the fast path (the caller then decodes the structs)."""
    n = len(values)
    try:
        buf = b"".join(values)
    except TypeError:  # a value that is not bytes (a tombstone): the struct path says why
        return None
    bounds = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, values), dtype=np.int64, count=n), out=bounds[1:])
    data = np.frombuffer(buf, dtype=np.uint8)
    n_cols = 2 + len(plan.features[1]) - 1
    toks = np.zeros((n, n_cols, 4), dtype=np.int64)
    fvals = np.zeros((n, n_cols))
    nums = np.full((n, 3), math.nan)
    spans = np.zeros((n, 8), dtype=np.int64)
    labels = np.empty(n)
    # One column per event: the counts row is all a batch without contexts touches (the rest
    # of the 3 MB stays unwritten, so unmapped).
    ctx = np.empty((1 + 3 * MAX_CONTEXT_CLUSTERS, n), dtype=np.int64)
    ctx[0] = -1  # no context
    if _scan(data, bounds, *plan.top, *plan.features, toks, fvals, nums, spans, labels,
             ctx) >= 0:
        return None
    contexts = _contexts(buf, data, ctx)
    if contexts is False:
        return None
    for col in range(3):  # numbers off Clinger's path: Python's float, as the decoder rounds
        start, stop = spans[:, 2 + 2 * col], spans[:, 3 + 2 * col]
        for m in np.flatnonzero(np.isnan(nums[:, col]) & (stop > start)).tolist():
            nums[m, col] = float(buf[start[m]:stop[m]])
    ts, p_true, rates = nums[:, 0], nums[:, 1], nums[:, 2]
    if not (np.all((ts >= 0) & (ts <= MAX_TS))
            and np.all(np.isnan(p_true) | ((p_true >= 0) & (p_true <= 1)))
            and np.all(np.isnan(rates) | ((rates > 0) & (rates <= 1)))):
        return None
    slots = {}
    for name, col, kind, boundaries in plan.slots:
        ok, ids, offsets = _encode_slot(data, toks, fvals, col, kind, boundaries)
        if not ok:
            return None
        slots[name] = SlotIds(ids, offsets)
    has_rate = ~np.isnan(rates)
    return LabeledBatch(SparseBatch(n, slots), labels, np.ascontiguousarray(ts),
                        np.where(has_rate, rates, 1.0) if has_rate.any() else None,
                        contexts=contexts, values=values,
                        event_ids=lambda: [buf[s:e].decode() for s, e in spans[:, :2].tolist()])


def _contexts(buf: bytes, data: np.ndarray, ctx: np.ndarray) -> BatchContexts | bool | None:
    """The scanned bandit contexts (``None`` if no event has one), or False when a weight or
    a sum breaks the struct's rules."""
    counts = ctx[0]
    if not (counts >= 0).any():
        return None
    width = max(int(counts.max()), 1)
    weights = np.zeros((len(counts), width))
    status = _context_weights(data, ctx, weights, np.empty(4))
    if status < 0:
        return False
    if status > 0:  # weights off Clinger's path: Python's float, as the decoder rounds
        for m, k in np.argwhere(np.isnan(weights)).tolist():
            weights[m, k] = float(buf[ctx[2 + 3 * k, m]:ctx[3 + 3 * k, m]])
        if _bad_weights(ctx, weights):
            return False
    clusters = np.ascontiguousarray(ctx[1:1 + 3 * width:3].T)
    clusters[np.arange(width)[None, :] >= counts[:, None]] = 0  # past each context: unset
    return BatchContexts(counts.copy(), clusters, weights)


def warm_up(plan: WirePlan) -> None:
    """Load the compiled kernels (numba's cache) before the first consumed batch pays for it."""
    scan_labeled_events([b'{"event_id":"w","ts":0,"user_id":"w","item_id":"w","label":0}'], plan)
