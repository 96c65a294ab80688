"""Where a model's serving state sits in Redis: every key name, and which shard an ID lives in.

The one place that knows the key layout (Redis Cluster hash tags per ID bucket will be a change
here only). All keys of one model share the hash tag ``{model}``, so they live in one Redis
Cluster slot and a publish can be one MULTI/EXEC transaction.

===========================================  ===============================================
key                                          contents
===========================================  ===============================================
``fr:{m}:meta``                              hash: ``version``, ``dense_version``,
                                             ``centroids_version``, ``schema_hash``,
                                             ``created``, ``updated``, ``generation``,
                                             ``row_dtype``, ``emb_shards``, ``bandit_shards``,
                                             ``slots`` (JSON name -> dim), ``bandit`` (JSON)
``fr:{m}:emb:{gen}:{slot}:{shard}``          hash: 8-byte LE int64 ID -> row bytes
``fr:{m}:bandit:{gen}:{shard}``              hash: 8-byte LE item ID -> float64 LE
                                             ``[t, d_0..d_C-1, b_0..b_C-1]``
``fr:{m}:dense:{dense_version}``             hash: ``manifest`` (JSON) + ``chunk:{i}`` (<=1 MB)
``fr:{m}:centroids``                         hash: ``manifest`` + ``chunk:{i}``
``fr:{m}:updates``                           stream of :class:`Update` entries (MAXLEN ~)
``fr:{m}:changelog:{version}``               hash: the ID lists of one big delta (expires)
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
    """Key names of one model; ``{model}`` is the Redis Cluster hash tag."""

    def __init__(self, model: str) -> None:
        self.prefix = f"fr:{{{model}}}"
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

    def generation_keys(self, generation: str, slots: Iterable[str], emb_shards: int,
                        bandit_shards: int) -> list[str]:
        keys = [self.emb(generation, s, i) for s in slots for i in range(emb_shards)]
        return keys + [self.bandit(generation, i) for i in range(bandit_shards)]


def shard_of(ids: np.ndarray, n_shards: int) -> np.ndarray:
    """Shard of each ID; hashed string IDs are uniform already, small ints spread by modulo."""
    return (np.asarray(ids, dtype=np.int64).view(np.uint64) % np.uint64(n_shards)).astype(
        np.int64
    )


__all__ = ["Keys", "shard_of"]
