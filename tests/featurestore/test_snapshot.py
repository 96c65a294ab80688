"""The Redis snapshot layout: round trips, chunking, validation of untrusted bytes, the stream."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import redis

from featurestore import snapshot_codec as codec
from featurestore import snapshot_writer as writer
from featurestore.snapshot_codec import SnapshotFormatError
from featurestore.snapshot_keys import shard_of
from featurestore.snapshot_types import BanditHeader, BanditRows, SnapshotData
from featurestore.snapshot_writer import SnapshotStore


@pytest.fixture
def store(redis_client: redis.Redis) -> SnapshotStore:
    s = SnapshotStore(redis_client, f"snap-{uuid.uuid4().hex[:8]}")
    yield s
    s.drop()


def full_data(n: int = 100, dim: int = 4, seed: int = 0) -> SnapshotData:
    rng = np.random.default_rng(seed)
    ids = rng.choice(1 << 40, size=n, replace=False).astype(np.int64)
    return SnapshotData(
        emb={"item": (ids, rng.normal(size=(n, dim)).astype(np.float32)),
             "user": (np.array([-5, 7], dtype=np.int64), np.ones((2, dim), np.float32))},
        bandit=BanditRows(ids[:10], np.full(10, 3.0), rng.random((10, 2)) + 1, rng.random((10, 2))),
        bandit_header=BanditHeader(2, 1.0, 0.0, 5, 3.0),
        dense={"w": rng.normal(size=(3, 5)).astype(np.float32), "b": np.zeros(1, np.float32)},
        centroids={"centroids": np.ones((2, 4), np.float32), "counts": np.array([3, 4])},
    )  # fmt: skip


def write_full(store: SnapshotStore, data: SnapshotData, version: int = 1) -> str:
    return store.write_full(data, version=version, prev_version=version - 1, schema_hash="abc",
                            slots={"item": 4, "user": 4})


def sorted_rows(ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    o = np.argsort(ids)
    return ids[o], rows[o]


def test_arrays_round_trip_and_big_values_are_chunked() -> None:
    arrays = {"big": np.arange(600_000, dtype=np.float32).reshape(1000, 600),
              "i": np.array([1, -2], dtype=np.int64), "scalar": np.array(2.5)}
    fields = codec.encode_arrays(arrays)
    assert len(fields) == 1 + 3  # manifest + three chunks of <= 1 MB
    assert all(len(v) <= codec.CHUNK_BYTES for k, v in fields.items() if k != b"manifest")
    out = codec.decode_arrays(fields)
    for k, a in arrays.items():
        np.testing.assert_array_equal(out[k], a)
        assert out[k].dtype == a.dtype


def test_untrusted_blobs_are_validated_not_executed() -> None:
    fields = codec.encode_arrays({"w": np.ones((2, 2), np.float32)})
    with pytest.raises(SnapshotFormatError):
        codec.decode_arrays({**fields, b"chunk:0": fields[b"chunk:0"][:-1]})
    bad = fields[b"manifest"].replace(b"<f4", b"|O")
    with pytest.raises(SnapshotFormatError):
        codec.decode_arrays({**fields, b"manifest": bad})
    with pytest.raises(SnapshotFormatError):
        codec.unpack_ids(b"1234567")
    with pytest.raises(SnapshotFormatError):
        codec.decode_records([b"12345678" + b"x" * 15], 4, np.dtype("<f4"))
    with pytest.raises(SnapshotFormatError):
        codec.decode_found_rows(np.array([1, 2]), b"11", b"x" * 31, 4, np.dtype("<f4"))


def test_full_snapshot_round_trips(store: SnapshotStore) -> None:
    data = full_data()
    gen = write_full(store, data)
    full = store.read_full()
    assert full is not None and full.meta.generation == gen and full.meta.version == 1
    assert full.meta.slots == {"item": 4, "user": 4}
    for slot, (ids, rows) in data.emb.items():
        got_ids, got_rows = sorted_rows(*full.emb[slot])
        want_ids, want_rows = sorted_rows(ids, rows)
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_array_equal(got_rows, want_rows)
    np.testing.assert_array_equal(full.dense["w"], data.dense["w"])
    np.testing.assert_array_equal(full.centroids["counts"], [3, 4])
    o = np.argsort(full.bandit.item_ids)
    w = np.argsort(data.bandit.item_ids)
    np.testing.assert_array_equal(full.bandit.d[o], data.bandit.d[w])
    np.testing.assert_array_equal(full.bandit.b[o], data.bandit.b[w])
    assert full.meta.bandit == data.bandit_header
    # Every key shares the model's hash tag (one Redis Cluster slot).
    keys = [k.decode() for k in store.r.scan_iter(match=f"{store.keys.prefix}:*")]
    assert keys and all(f"{{{store.model}}}" in k for k in keys)


def test_fp16_rows_halve_the_bytes_and_read_back_as_float32(redis_client: redis.Redis) -> None:
    store = SnapshotStore(redis_client, f"snap16-{uuid.uuid4().hex[:8]}", row_dtype="float16")
    try:
        data = full_data()
        write_full(store, data)
        ids, rows = sorted_rows(*store.read_full().emb["item"])
        _, want = sorted_rows(*data.emb["item"])
        assert rows.dtype == np.float32
        np.testing.assert_allclose(rows, want, rtol=2e-3, atol=2e-3)
        key = store.keys.emb(store.read_meta().generation, "item", int(shard_of(ids[:1], 16)[0]))
        assert len(next(iter(redis_client.hgetall(key).values()))) == 4 * 2
    finally:
        store.drop()


def test_deltas_chain_versions_and_announce_rows_written_before_them(
        store: SnapshotStore) -> None:
    gen = write_full(store, full_data())
    item_ids = full_data().emb["item"][0]
    new = SnapshotData(emb={"item": (np.array([11, 12]), np.full((2, 4), 2.0, np.float32))},
                       deleted={"item": item_ids[:3]})
    store.write_delta(new, generation=gen, version=2, prev_version=1, dense_version=1,
                      centroids_version=1, prev_dense_version=1)
    updates = store.read_updates(b"0-0")
    assert [(u.kind, u.version, u.prev_version) for u in updates] == [("full", 1, 0),
                                                                     ("delta", 2, 1)]
    u = updates[1]
    np.testing.assert_array_equal(u.emb["item"], [11, 12])
    np.testing.assert_array_equal(u.deleted["item"], item_ids[:3])
    rows = store.fetch_delta(u, store.read_meta(), current_dense=1, current_centroids=1)
    np.testing.assert_array_equal(rows.emb["item"][1], np.full((2, 4), 2.0))
    assert rows.dense is None and rows.centroids is None
    full = store.read_full()
    assert full.meta.version == 2 and len(full.emb["item"][0]) == 100 - 3 + 2
    assert full.stream_id == u.stream_id


def test_big_deltas_move_their_id_lists_to_a_changelog(store: SnapshotStore) -> None:
    gen = write_full(store, full_data())
    n = writer.INLINE_ID_LIMIT + 10
    ids = np.arange(1, n + 1, dtype=np.int64)
    gone = full_data().emb["item"][0][:7]
    store.write_delta(SnapshotData(emb={"item": (ids, np.ones((n, 4), np.float32))},
                                   deleted={"item": gone}),
                      generation=gen, version=2, prev_version=1, dense_version=1,
                      centroids_version=1, prev_dense_version=1)
    u = store.read_updates(b"0-0")[-1]
    assert u.changelog is not None and not u.emb and not u.deleted
    assert 0 < store.r.ttl(u.changelog) <= writer.CHANGELOG_TTL_S
    rows = store.fetch_delta(u, store.read_meta(), 1, 1)
    np.testing.assert_array_equal(np.sort(rows.emb["item"][0]), ids)
    # The deletions come back from the changelog too (the entry itself names none).
    np.testing.assert_array_equal(np.sort(rows.deleted["item"]), np.sort(gone))


def test_a_new_full_snapshot_expires_the_previous_generation(store: SnapshotStore) -> None:
    old = write_full(store, full_data())
    new = write_full(store, full_data(seed=1), version=2)
    assert new != old
    old_keys = store.keys.generation_keys(old, ["item"], 16, 16)
    ttls = [store.r.ttl(k) for k in old_keys if store.r.exists(k)]
    assert ttls and all(0 < t <= writer.OLD_GENERATION_TTL_S for t in ttls)
    assert 0 < store.r.ttl(store.keys.dense(1)) <= writer.OLD_DENSE_TTL_S
    assert store.read_meta().generation == new


def test_missing_or_incomplete_meta_reads_as_no_snapshot(store: SnapshotStore) -> None:
    assert store.read_meta() is None and store.read_full() is None
    write_full(store, full_data())
    store.r.hdel(store.keys.meta, "schema_hash")
    assert store.read_meta() is None


def test_rows_of_the_wrong_size_in_redis_are_refused(store: SnapshotStore) -> None:
    gen = write_full(store, full_data())
    store.write_delta(SnapshotData(emb={"item": (np.array([11]), np.ones((1, 4), np.float32))}),
                      generation=gen, version=2, prev_version=1, dense_version=1,
                      centroids_version=1, prev_dense_version=1)
    update = store.read_updates(b"0-0")[-1]
    key = store.keys.emb(gen, "item", int(shard_of(np.array([11]), store.emb_shards)[0]))
    store.r.hset(key, codec.pack_ids(np.array([11])), b"not a row")
    with pytest.raises(SnapshotFormatError):
        store.fetch_delta(update, store.read_meta(), 1, 1)
    with pytest.raises(SnapshotFormatError):
        store.read_full()
