"""Where a model's serving state sits in Redis: every key name, and which shard an ID lives in.

The one place that knows the key layout. A *chain* is one meta hash, one update stream and the
rows they announce, all under one Redis Cluster hash tag, so a publish to a chain is one
MULTI/EXEC transaction. The unbucketed layout is one chain, tag ``{m}``. The bucketed layout
(``snapshot_buckets`` > 0, :mod:`featurestore.snapshot_buckets`) has a head chain ``{m}`` that
carries only the dense weights, centroids and meta, plus one chain per ID bucket, tag
``{m:b<k>}`` (the table below with ``{m:b<k>}`` in place of ``{m}``), that carries the rows of
the IDs in bucket ``k``. Different tags hash to different slots, so a model spreads over every
master of a cluster.

===========================================  ===============================================
key                                          contents
===========================================  ===============================================
``fr:{m}:meta``                              hash: ``version``, ``dense_version``,
                                             ``centroids_version``, ``schema_hash``,
                                             ``created``, ``updated``, ``generation``,
                                             ``row_dtype``, ``emb_shards``, ``bandit_shards``,
                                             ``slots`` (JSON name -> dim), ``bandit`` (JSON),
                                             ``writer`` (who publishes the chain: ``rank-<r>``
                                             of trainer ranks, empty for one process)
``fr:{m}:emb:{gen}:{slot}:{shard}``          hash: 8-byte LE int64 ID -> row bytes
``fr:{m}:bandit:{gen}:{shard}``              hash: 8-byte LE item ID -> float64 LE
                                             ``[t, d_0..d_C-1, b_0..b_C-1]``
``fr:{m}:dense:{dense_version}``             hash: ``manifest`` (JSON) + ``chunk:{i}`` (<=1 MB)
``fr:{m}:centroids``                         hash: ``manifest`` + ``chunk:{i}``
``fr:{m}:updates``                           stream of :class:`Update` entries (MAXLEN ~)
``fr:{m}:changelog:{version}``               hash: the ID lists of one big delta (expires)
``fr:{m}:image:{gen}:{version}``             hash: every row as of ``version`` in a few big
                                             chunks (``manifest``, ``e:{slot}:{i}``,
                                             ``b:{i}``), for fast full reads (expires when
                                             superseded)
===========================================  ===============================================

Why the generation is part of the row keys: a full snapshot of a big table cannot be one
transaction, so it is written under a fresh generation and made visible by one atomic switch of
``meta.generation``. A reader never sees half of a full snapshot; the old generation's keys
expire a couple of minutes later (long enough for a replica that is mid-load to finish).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class Keys:
    """Key names of one chain: the model's head ``{model}`` or its bucket ``{model:b<k>}``."""

    def __init__(self, model: str, bucket: int | None = None) -> None:
        tag = model if bucket is None else f"{model}:b{bucket}"
        self.prefix = f"fr:{{{tag}}}"
        self.meta = f"{self.prefix}:meta"
        self.updates = f"{self.prefix}:updates"
        self.centroids = f"{self.prefix}:centroids"

    def emb(self, generation: str, slot: str, shard: int) -> str:
        return f"{self.prefix}:emb:{generation}:{slot}:{shard}"

    def bandit(self, generation: str, shard: int) -> str:
        return f"{self.prefix}:bandit:{generation}:{shard}"

    def dense(self, version: int) -> str:
        return f"{self.prefix}:dense:{version}"

    def changelog(self, version: int) -> str:
        return f"{self.prefix}:changelog:{version}"

    def image(self, generation: str, version: int) -> str:
        return f"{self.prefix}:image:{generation}:{version}"

    def generation_keys(self, generation: str, slots: Iterable[str], emb_shards: int,
                        bandit_shards: int) -> list[str]:
        keys = [self.emb(generation, s, i) for s in slots for i in range(emb_shards)]
        return keys + [self.bandit(generation, i) for i in range(bandit_shards)]


def shard_of(ids: np.ndarray, n_shards: int) -> np.ndarray:
    """Shard of each ID; hashed string IDs are uniform already, small ints spread by modulo."""
    return (np.asarray(ids, dtype=np.int64).view(np.uint64) % np.uint64(n_shards)).astype(
        np.int64
    )


_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def bucket_of(ids: np.ndarray, n_buckets: int) -> np.ndarray:
    """ID bucket of each ID (which chain holds its row, which trainer rank owns it).

    Mixed first (splitmix64's finalizer), not a plain modulo like :func:`shard_of`: with a
    modulo both ways, every ID of a bucket would fall into the same shard within it, and
    small sequential IDs would fill buckets in order.
    """
    x = np.asarray(ids, dtype=np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _MIX1
        x = (x ^ (x >> np.uint64(27))) * _MIX2
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(n_buckets)).astype(np.int64)


__all__ = ["Keys", "bucket_of", "shard_of"]
