"""A synthetic click stream with a known ground truth, for runs and evaluations without data files.

Users and items have latent vectors; the true click probability is
``sigmoid(bias + scale * <u, v>)`` and is carried in every event (``p_true``) so evaluations can
measure regret and calibration. Users come from clusters (their demographics are drawn from the
cluster, so side features carry signal), IDs follow Zipf laws with millions of distinct values,
new items keep arriving (with a share of traffic reserved for the newest), and optional drift
rotates the cluster tastes over event time.

Generation is vectorized in chunks: latent vectors are looked up in fixed random tables by
``id % table_size`` so that millions of IDs need no per-ID state.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

_TABLE = 1 << 16
_GENDERS = np.array(["F", "M"])
_OCCUPATIONS = np.array(["student", "engineer", "artist", "doctor", "writer", "other",
                         "educator", "programmer", "retired", "homemaker"])
_GENRES = np.array(["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller",
                    "Documentary", "Animation", "Western"])


@dataclass(frozen=True)
class SyntheticConfig:
    """Shape of the synthetic world."""

    n_users: int = 2_000_000
    n_items: int = 200_000
    dim: int = 8
    n_clusters: int = 16
    zipf_a: float = 1.15
    new_items_per_s: float = 2.0
    new_item_traffic: float = 0.05
    drift_period_s: float = 0.0  # 0 = no drift; else a full rotation of tastes per period
    events_per_s: float = 1000.0  # event-time rate
    bias: float = -1.8
    scale: float = 2.5
    start_ts: float = 1_700_000_000.0
    seed: int = 0


class SyntheticStream:
    """Chunks of labeled-event dicts with ``p_true``; deterministic for a given config."""

    def __init__(self, config: SyntheticConfig | None = None) -> None:
        self.config = c = config or SyntheticConfig()
        rng = np.random.default_rng(c.seed)
        self._rng = rng
        self.centers = rng.normal(size=(c.n_clusters, c.dim)) / np.sqrt(c.dim)
        self._alt_centers = rng.normal(size=(c.n_clusters, c.dim)) / np.sqrt(c.dim)
        self._user_noise = rng.normal(scale=0.3, size=(_TABLE, c.dim)) / np.sqrt(c.dim)
        # Items come in one cluster per genre: the genre feature carries most of an item's
        # taste, as content features do, and the rest is per-item (learned from its ID).
        self._item_centers = rng.normal(size=(len(_GENRES), c.dim)) / np.sqrt(c.dim)
        self._item_noise = rng.normal(scale=0.5, size=(_TABLE, c.dim)) / np.sqrt(c.dim)
        self._cluster_gender = rng.integers(0, 2, c.n_clusters)
        self._cluster_age = rng.integers(15, 65, c.n_clusters)
        self._cluster_occ = rng.integers(0, len(_OCCUPATIONS), c.n_clusters)
        self._emitted = 0

    def _user_cluster(self, users: np.ndarray) -> np.ndarray:
        return (users * 2654435761 % (1 << 32)) % self.config.n_clusters

    def user_vectors(self, users: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """Latent taste of each user at event time ``ts`` (drift rotates cluster centers)."""
        c = self.config
        clusters = self._user_cluster(users)
        centers = self.centers[clusters]
        if c.drift_period_s > 0:
            angle = 2 * np.pi * (ts - c.start_ts) / c.drift_period_s
            centers = (np.cos(angle)[:, None] * centers
                       + np.sin(angle)[:, None] * self._alt_centers[clusters])
        return centers + self._user_noise[users % _TABLE]

    def item_vectors(self, items: np.ndarray) -> np.ndarray:
        """Latent attributes of each item."""
        return self._item_centers[self._item_cluster(items)] + self._item_noise[items % _TABLE]

    @staticmethod
    def _item_cluster(items: np.ndarray) -> np.ndarray:
        return (items * 2246822519 % (1 << 32)) % len(_GENRES)

    def click_probability(self, users: np.ndarray, items: np.ndarray,
                          ts: np.ndarray) -> np.ndarray:
        """Ground-truth p(click) for user/item pairs at event times ``ts``."""
        c = self.config
        dots = np.einsum("ij,ij->i", self.user_vectors(users, ts), self.item_vectors(items))
        return 1.0 / (1.0 + np.exp(-(c.bias + c.scale * dots)))

    def live_items(self, ts: float) -> int:
        """How many items exist at event time ``ts`` (new ones keep arriving)."""
        c = self.config
        return c.n_items + int(max(0.0, ts - c.start_ts) * c.new_items_per_s)

    def chunk(self, n: int) -> list[dict[str, object]]:
        """The next ``n`` events, in event-time order."""
        c, rng = self.config, self._rng
        idx = np.arange(self._emitted, self._emitted + n)
        ts = c.start_ts + idx / c.events_per_s
        users = (rng.zipf(c.zipf_a, n) - 1) % c.n_users
        live = c.n_items + ((ts - c.start_ts) * c.new_items_per_s).astype(np.int64)
        items = (rng.zipf(c.zipf_a, n) - 1) % live
        fresh = rng.random(n) < c.new_item_traffic
        newest = np.maximum(live - rng.integers(1, 200, n), 0)
        items = np.where(fresh, newest, items)
        p = self.click_probability(users, items, ts)
        labels = (rng.random(n) < p).astype(np.int64)
        user_feats = self.user_features(users)
        item_feats = self.item_features(items)
        self._emitted += n
        return [
            {
                "event_id": f"syn-{idx[i]}",
                "ts": float(ts[i]),
                "user_id": f"u{users[i]}",
                "item_id": f"i{items[i]}",
                "label": int(labels[i]),
                "features": {**user_feats[i], **item_feats[i]},
                "p_true": float(p[i]),
            }
            for i in range(n)
        ]

    def user_features(self, users: np.ndarray) -> list[dict[str, object]]:
        """Demographics of users (drawn from their cluster, so they carry signal)."""
        clusters = self._user_cluster(users)
        ages = self._cluster_age[clusters]
        genders = _GENDERS[self._cluster_gender[clusters]]
        occs = _OCCUPATIONS[self._cluster_occ[clusters]]
        return [{"age": int(ages[i]), "gender": str(genders[i]), "occupation": str(occs[i]),
                 "zip_prefix": f"{users[i] % 100:02d}"} for i in range(len(users))]

    def item_features(self, items: np.ndarray) -> list[dict[str, object]]:
        """Genres (the second is the item's cluster, the first is noise) and release year."""
        genre = _GENRES[(items * 40503 % (1 << 16)) % len(_GENRES)]
        genre2 = _GENRES[self._item_cluster(items)]
        years = 1950 + (items % 50)
        return [{"genres": [str(genre[i]), str(genre2[i])], "release_year": int(years[i])}
                for i in range(len(items))]

    def events(self, total: int, chunk_size: int = 10_000) -> Iterator[dict[str, object]]:
        """``total`` events, generated ``chunk_size`` at a time."""
        left = total
        while left > 0:
            n = min(chunk_size, left)
            yield from self.chunk(n)
            left -= n
