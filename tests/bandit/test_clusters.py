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


def test_decaying_counts_follow_a_drifting_population() -> None:
    rng = np.random.default_rng(3)
    frozen = OnlineKMeans(2, 2, seed=0)
    decaying = OnlineKMeans(2, 2, seed=0, half_life_s=10.0)
    for t in range(200):  # two groups; the second walks from x=10 to x=30
        shift = 10.0 + 20.0 * min(1.0, t / 100)
        X = np.concatenate([rng.normal([0, 0], 0.1, (20, 2)), rng.normal([shift, 0], 0.1, (20, 2))])
        frozen.partial_fit(X, ts=float(t))
        decaying.partial_fit(X, ts=float(t))
    far = lambda km: km.centroids[:, 0].max()  # noqa: E731
    assert abs(far(decaying) - 30.0) < 0.5  # followed the walk
    assert far(frozen) < 27.0  # 1/count learning rate: stuck near the walk's average
    assert decaying.counts.max() < 20 * 10 / np.log(2) * 1.1  # ~ points per half-life / ln 2


def test_emptied_cluster_is_reseeded_where_users_are_and_round_trips() -> None:
    rng = np.random.default_rng(4)
    km = OnlineKMeans(3, 2, seed=0, half_life_s=5.0)
    for t in range(20):
        km.partial_fit(np.concatenate([rng.normal(c, 0.1, (10, 2)) for c in ([0, 0], [5, 0],
                                                                              [0, 5])]), ts=t)
    assert km.reseeded == 0
    for t in range(20, 160):  # the (0, 5) group leaves; a (10, 0) group appears, nearest to the
        # (5, 0) centre, which alone would settle between the two groups
        km.partial_fit(np.concatenate([rng.normal(c, 0.1, (10, 2)) for c in ([0, 0], [5, 0],
                                                                              [10, 0])]), ts=t)
    assert km.reseeded >= 1
    c = km.centroids
    for target in ([0, 0], [5, 0], [10, 0]):
        assert np.min(np.linalg.norm(c - np.array(target), axis=1)) < 0.5
    back = OnlineKMeans.from_arrays(km.to_arrays())
    assert back.half_life_s == 5.0 and back.clock == km.clock and back.reseeded == km.reseeded
    np.testing.assert_array_equal(back.counts, km.counts)


def test_user_tower_places_cold_users_by_their_profile_slots() -> None:
    from bandit.context import user_slots, user_tower
    from featurestore.featurize import Featurizer
    from featurestore.schema import SlotSide, load_model_config
    from freshrec.settings import default_model_config_path

    config = load_model_config(default_model_config_path())
    layout = user_slots(config)
    assert [n for n, _ in layout] == [s.name for s in config.slots if s.side is SlotSide.USER]
    recs = [{"user_id": "cold", "age": 23, "gender": "F", "occupation": "writer"},
            {"user_id": "nobody"}]
    batch = Featurizer(config).featurize(recs, SlotSide.USER)
    known = {n: 1.0 + k for k, (n, _) in enumerate(layout) if n != "user"}  # no user-ID rows

    def lookup(slot: str, ids: np.ndarray) -> np.ndarray:
        dim = dict(layout)[slot]
        return np.full((len(ids), dim), known.get(slot, 0.0), dtype=np.float32)

    tower = user_tower(config, batch, lookup)
    assert tower.shape == (2, sum(d for _, d in layout))
    assert np.all(tower[0, :dict(layout)["user"]] == 0) and np.abs(tower[0]).sum() > 0
    centroids = np.stack([tower[0] + 0.1, tower[0] * 0 + 5.0]).astype(np.float32)
    cl, w = context_for(tower[:1], centroids, 1)
    assert cl[0, 0] == 0 and w[0, 0] == 1.0  # a real context, not the fallback


def _context_reference(U: np.ndarray, C: np.ndarray, k: int, counts: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The definition in plain numpy: all distances, stable sort, softmax, fallback."""
    has_vec = np.isfinite(U).all(1) & (np.abs(np.nan_to_num(U)).sum(1) > 0)
    d2 = np.maximum(((U[:, None, :] - C[None, :, :]) ** 2).sum(-1), 0.0)
    idx = np.argsort(d2, axis=1, kind="stable")[:, :k]
    dk = np.take_along_axis(d2, idx, axis=1)
    T = np.maximum(dk.mean(1, keepdims=True), 1e-12)
    w = np.exp(-(dk - dk[:, :1]) / T)
    w /= w.sum(1, keepdims=True)
    idx[~has_vec] = np.argsort(-counts, kind="stable")[:k]
    w[~has_vec] = 1.0 / k
    return idx, w


def test_compiled_contexts_equal_the_numpy_definition() -> None:
    rng = np.random.default_rng(11)
    C = rng.normal(size=(32, 40))
    U = rng.normal(size=(300, 40))
    U[::7] = 0.0  # no vector: fallback
    U[3, 5] = np.nan  # non-finite: fallback
    counts = rng.integers(1, 100, size=32).astype(float)
    for k in (1, 3, 32):
        cl, w = context_for(U, C, k, counts=counts)
        want_cl, want_w = _context_reference(U, C, k, counts)
        np.testing.assert_array_equal(cl, want_cl)
        np.testing.assert_allclose(w, want_w, rtol=1e-9, atol=1e-12)


def test_seeding_draws_the_centres_of_k_means_plus_plus_by_its_definition() -> None:
    """The seeds are those of k-means++ as written over the expanded points: each next seed
    drawn with probability proportional to multiplicity times the squared distance to its
    nearest existing centre, recomputed against every centre (the implementation keeps that
    distance up to date instead), each seed using up one copy of its point. Batches repeat few
    distinct points, so seeding stays incomplete over several batches, as with cold users."""
    rng = np.random.default_rng(7)
    k, dim = 12, 5
    base = rng.normal(size=(9, dim)).round(1)
    km = OnlineKMeans(k, dim, seed=3)
    ref_rng = np.random.default_rng(3)
    ref: list[np.ndarray] = []
    seen: list[np.ndarray] = []
    for batch in range(6):
        X = base[rng.permutation(3 + batch)]
        w = rng.integers(1, 4, size=len(X)).astype(np.float64)
        seen.append(X)
        rest, rest_w = km._seed_centers(X, w)
        left = w.copy()
        while len(ref) < k:
            if not ref:
                p = left.copy()
            else:
                c = np.array(ref)
                p = ((X[:, None, :] - c[None, :, :]) ** 2).sum(-1).min(1) * left
            if p.sum() <= 1e-12:
                break
            i = int(ref_rng.choice(len(X), p=p / p.sum()))
            ref.append(X[i].copy())
            left[i] -= 1
        assert km.n_initialized == len(ref)
        assert np.array_equal(km._centers[: len(ref)], np.array(ref))
        assert np.array_equal(rest, X[left > 0]) and np.array_equal(rest_w, left[left > 0])
    # Fewer distinct points than clusters: each became a centre, and no other centre exists.
    assert km.n_initialized == len(np.unique(np.concatenate(seen), axis=0)) < k


def test_a_weighted_point_moves_the_centres_as_its_copies_would() -> None:
    """Once every centre exists, absorbing distinct points with multiplicities is absorbing
    every copy: the same centres and counts (up to summation order)."""
    rng = np.random.default_rng(11)
    X, _, _ = _blobs(rng, 200, 4, 3)
    weighted, copies = OnlineKMeans(4, 3, seed=1), OnlineKMeans(4, 3, seed=1)
    weighted.partial_fit(X)
    copies.partial_fit(X)
    points = X[rng.integers(len(X), size=30)] + 0.5
    mult = rng.integers(1, 6, size=len(points))
    hinted = OnlineKMeans(4, 3, seed=1)  # given the assignment it would compute itself
    hinted.partial_fit(X)
    hinted.partial_fit(points, weights=mult, nearest=hinted.predict(points))
    weighted.partial_fit(points, weights=mult)
    copies.partial_fit(np.repeat(points, mult, axis=0))
    np.testing.assert_allclose(weighted._centers, copies._centers, rtol=1e-12)
    np.testing.assert_allclose(weighted._counts, copies._counts, rtol=1e-12)
    assert np.array_equal(hinted._centers, weighted._centers)


def test_weights_must_be_finite_and_positive() -> None:
    km = OnlineKMeans(2, 2)
    X = np.ones((2, 2), dtype=np.float32)
    for bad in ([1.0, 0.0], [1.0, np.nan], [-1.0, 1.0]):
        try:
            km.partial_fit(X, weights=np.array(bad))
        except ValueError as exc:
            assert "weights" in str(exc)
        else:
            raise AssertionError(f"weights {bad} accepted")
    assert km.n_initialized == 0
