"""Online k-means and the top-K cluster contexts built on it."""

from __future__ import annotations

import numpy as np

from bandit.clusters import OnlineKMeans
from bandit.context import context_for


def _blobs(rng: np.random.Generator, n: int, k: int, dim: int, spread: float = 0.1):
    centers = rng.normal(size=(k, dim)) * 10
    labels = rng.integers(0, k, n)
    X = centers[labels] + rng.normal(size=(n, dim)) * spread
    return X.astype(np.float32), centers, labels


def test_kmeans_converges_on_well_separated_clusters() -> None:
    rng = np.random.default_rng(0)
    X, centers, labels = _blobs(rng, 5000, 5, 8)
    km = OnlineKMeans(5, 8, seed=1)
    for batch in np.array_split(X, 50):
        km.partial_fit(batch)
    assert km.n_initialized == 5
    # every true centre has a learned centroid next to it
    d = np.linalg.norm(centers[:, None, :] - km.centroids[None, :, :], axis=-1)
    assert d.min(1).max() < 0.1
    # and the assignment is a relabelling of the truth
    pred = km.predict(X)
    for c in range(5):
        assert len(np.unique(pred[labels == c])) == 1
    assert km.counts.sum() == len(X)


def test_kmeans_survives_fewer_points_than_clusters_and_zero_rows() -> None:
    km = OnlineKMeans(4, 2, seed=0)
    km.partial_fit(np.zeros((3, 2), dtype=np.float32))
    assert km.n_initialized == 0
    km.partial_fit(np.array([[1, 1], [1, 1]], dtype=np.float32))  # duplicates: one centre
    assert km.n_initialized == 1
    km.partial_fit(np.array([[5, 5], [9, 9], [-3, 2], [9, 9.1]], dtype=np.float32))
    assert km.n_initialized == 4
    assert km.centroids.shape == (4, 2)
    back = OnlineKMeans.from_arrays(km.to_arrays())
    np.testing.assert_array_equal(back.centroids, km.centroids)
    np.testing.assert_array_equal(back.counts, km.counts)


def test_context_weights_sum_to_one_and_nearest_comes_first() -> None:
    rng = np.random.default_rng(2)
    centroids = rng.normal(size=(10, 4)).astype(np.float32)
    users = rng.normal(size=(50, 4)).astype(np.float32)
    cl, w = context_for(users, centroids, 3)
    assert cl.shape == w.shape == (50, 3) and cl.dtype == np.int64
    np.testing.assert_allclose(w.sum(1), 1.0)
    assert (np.diff(w, axis=1) <= 1e-12).all()  # nearest first, heaviest first
    d = ((users[:, None] - centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(cl[:, 0], d.argmin(1))
    _, w1 = context_for(users, centroids, 1)
    assert (w1 == 1.0).all()
    cl_all, _ = context_for(users, centroids, 99)  # k clipped to C
    assert cl_all.shape == (50, 10)


def test_users_without_embedding_fall_back_to_most_populous_clusters() -> None:
    centroids = np.eye(4, dtype=np.float32)
    users = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [np.nan, 0, 0, 0]], dtype=np.float32)
    counts = np.array([5, 50, 1, 20])
    cl, w = context_for(users, centroids, 2, counts=counts)
    assert cl[0, 0] == 0
    for row in (1, 2):
        assert cl[row].tolist() == [1, 3]
        np.testing.assert_allclose(w[row], [0.5, 0.5])
    cl, w = context_for(users, centroids, 2)
    assert cl[1].tolist() == [0, 1]
    np.testing.assert_allclose(w.sum(1), 1.0)
