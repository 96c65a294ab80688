"""Full reads from an image: the image plus the rows changed since equals a walk of every hash,
and any image that cannot be caught up from (expired, trimmed, changelog gone) falls back."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import redis
import redis.asyncio as aredis

from featurestore.snapshot_reader import AsyncSnapshotReader
from featurestore.snapshot_types import BanditRows, FullSnapshot, SnapshotData
from featurestore.snapshot_writer import INLINE_ID_LIMIT, SnapshotStore
from freshrec.devstack import LocalStack
from tests.featurestore.test_snapshot import full_data, write_full

pytestmark = pytest.mark.integration


@pytest.fixture
def store(redis_client: redis.Redis) -> Iterator[SnapshotStore]:
    s = SnapshotStore(redis_client, f"img-{uuid.uuid4().hex[:8]}")
    yield s
    s.drop()


class Chain:
    """A writer that publishes deltas like the trainer's publisher, keeping the state it wrote."""

    def __init__(self, store: SnapshotStore, seed: int = 0) -> None:
        self.store = store
        self.rng = np.random.default_rng(seed)
        data = full_data(n=3_000, seed=seed)
        self.generation = write_full(store, data)
        self.version = 1
        self.bandit = data.bandit  # unchanged by these deltas
        self.emb = {s: dict(zip(ids.tolist(), rows, strict=True))
                    for s, (ids, rows) in data.emb.items()}

    def state(self) -> SnapshotData:
        emb = {}
        for slot, rows in self.emb.items():
            ids = np.array(sorted(rows), dtype=np.int64)
            emb[slot] = (ids, np.array([rows[i] for i in ids.tolist()], np.float32).reshape(
                len(ids), 4))
        return SnapshotData(emb=emb, bandit=self.bandit)

    def delta(self, n_new: int, n_changed: int, n_deleted: int) -> None:
        rng, items = self.rng, self.emb["item"]
        new = rng.choice(1 << 40, size=n_new, replace=False).astype(np.int64)
        old = np.array(sorted(items), dtype=np.int64)
        changed = rng.choice(old, size=n_changed, replace=False)
        deleted = rng.choice(np.setdiff1d(old, changed), size=n_deleted, replace=False)
        ids = np.concatenate([new, changed])
        rows = rng.normal(size=(len(ids), 4)).astype(np.float32)
        for i, r in zip(ids.tolist(), rows, strict=True):
            items[i] = r
        for i in deleted.tolist():
            del items[i]
        self.version += 1
        self.store.write_delta(
            SnapshotData(emb={"item": (ids, rows)}, deleted={"item": deleted}),
            generation=self.generation, version=self.version, prev_version=self.version - 1,
            dense_version=1, centroids_version=1, prev_dense_version=1)


def assert_same(a: FullSnapshot, b: FullSnapshot) -> None:
    assert a.meta.version == b.meta.version and a.stream_id == b.stream_id
    for slot in a.emb:
        np.testing.assert_array_equal(a.emb[slot][0], b.emb[slot][0])
        np.testing.assert_array_equal(a.emb[slot][1], b.emb[slot][1])
    assert a.bandit is not None and b.bandit is not None
    for field in ("item_ids", "t", "d", "b"):
        np.testing.assert_array_equal(getattr(a.bandit, field), getattr(b.bandit, field))
    for name, arr in a.dense.items():
        np.testing.assert_array_equal(arr, b.dense[name])


def scanned(store: SnapshotStore) -> FullSnapshot:
    """The same read without the image (what every full read was before images)."""
    ref = store.r.hget(store.keys.meta, "image")
    store.r.hdel(store.keys.meta, "image")
    try:
        full = store.read_full()
    finally:
        if ref is not None:
            store.r.hset(store.keys.meta, "image", ref)
    assert full is not None and full.source == "scan"
    return full


def test_image_plus_the_rows_changed_since_equals_a_scan(store: SnapshotStore) -> None:
    chain = Chain(store)
    assert store.write_image(chain.state())  # an image of v1
    chain.delta(50, 40, 30)
    chain.delta(INLINE_ID_LIMIT, 200, 100)  # ID lists in a changelog key
    store.announce_reload()  # a "full" entry of the same generation: no rows
    chain.delta(5, 5, 5)
    full = store.read_full()
    assert full is not None and full.source == "image" and full.meta.image.version == 1
    assert_same(full, scanned(store))
    np.testing.assert_array_equal(full.emb["item"][0], sorted(chain.emb["item"]))
    expected_rows = np.array([chain.emb["item"][i] for i in full.emb["item"][0].tolist()])
    np.testing.assert_array_equal(full.emb["item"][1], expected_rows)


def test_image_with_bandit_rows_reads_exactly_like_a_scan(store: SnapshotStore) -> None:
    data = full_data(n=2_000, seed=3)
    write_full(store, data)
    assert store.write_image(data)
    assert not store.write_image(data)  # nothing published since: nothing to write
    chain_gen = store.last_entry[2]
    b = data.bandit
    store.write_delta(
        SnapshotData(emb={"item": (data.emb["item"][0][:7], np.zeros((7, 4), np.float32))},
                     deleted={"user": np.array([7])},
                     bandit=BanditRows(b.item_ids[:2], b.t[:2] + 1, b.d[:2] * 2, b.b[:2]),
                     bandit_header=data.bandit_header),
        generation=chain_gen, version=2, prev_version=1, dense_version=1, centroids_version=1,
        prev_dense_version=1)
    full = store.read_full()
    assert full is not None and full.source == "image"
    assert_same(full, scanned(store))
    assert 7 not in full.emb["user"][0]


@pytest.mark.parametrize("bulk", [False, True], ids=["asyncio", "bulk client"])
def test_async_reader_reads_the_image_too(store: SnapshotStore, stack: LocalStack,
                                          bulk: bool) -> None:
    """Over the asyncio client, or (as the service reads) over a blocking client on the
    background thread: the same snapshot as the synchronous reader."""
    chain = Chain(store, seed=4)
    store.write_image(chain.state())
    chain.delta(10, 10, 10)
    bulk_client = redis.Redis.from_url(stack.redis_url) if bulk else None

    async def read() -> FullSnapshot | None:
        client = aredis.Redis.from_url(stack.redis_url)
        try:
            return await AsyncSnapshotReader(client, store.model, bulk_client=bulk_client,
                                             full_read_pause_ratio=0.5).read_full()
        finally:
            await client.aclose()

    full = asyncio.run(read())
    assert full is not None and full.source == "image"
    np.testing.assert_array_equal(full.emb["item"][0], sorted(chain.emb["item"]))
    assert_same(full, store.read_full())


@pytest.mark.parametrize("damage", ["image expired", "stream trimmed", "changelog expired"])
def test_an_image_that_cannot_be_caught_up_from_falls_back_to_a_scan(
        store: SnapshotStore, damage: str) -> None:
    chain = Chain(store, seed=5)
    store.write_image(chain.state())
    chain.delta(INLINE_ID_LIMIT + 10, 10, 10)  # a changelog
    chain.delta(3, 3, 3)
    if damage == "image expired":
        store.r.delete(store.keys.image(chain.generation, 1))
    elif damage == "stream trimmed":
        store.r.xtrim(store.keys.updates, maxlen=1, approximate=False)
    else:
        store.r.delete(store.keys.changelog(2))
    full = store.read_full()
    assert full is not None and full.source == "scan"
    np.testing.assert_array_equal(full.emb["item"][0], sorted(chain.emb["item"]))


def test_a_damaged_image_is_passed_over_and_every_row_is_read(store: SnapshotStore) -> None:
    """An image is a shortcut: a hostile or broken one must not keep replicas from loading."""
    chain = Chain(store, seed=6)
    store.write_image(chain.state())
    key = store.keys.image(chain.generation, 1)
    for manifest in (b'{"version": 1, "emb": {"nope": 1}, "bandit": 0}',
                     b'{"version": 1, "emb": {"item": 99999999}, "bandit": 0}',
                     b'not json', b'{"version": 1}'):
        store.r.hset(key, "manifest", manifest)
        full = store.read_full()
        assert full is not None and full.source == "scan", manifest
        np.testing.assert_array_equal(full.emb["item"][0], sorted(chain.emb["item"]))
    store.r.hset(store.keys.meta, "image", b'{"v": 1, "id": "1-0 junk"}')
    full = store.read_full()
    assert full is not None and full.meta.image is None and full.source == "scan"
    np.testing.assert_array_equal(full.emb["item"][0], sorted(chain.emb["item"]))


def test_a_new_image_expires_the_one_it_replaces(store: SnapshotStore) -> None:
    chain = Chain(store, seed=7)
    store.write_image(chain.state())
    chain.delta(1, 1, 1)
    store.write_image(chain.state())
    assert 0 < store.r.ttl(store.keys.image(chain.generation, 1)) <= 120
    assert store.r.ttl(store.keys.image(chain.generation, 2)) == -1  # the current one stays
    full = store.read_full()
    assert full is not None and full.source == "image" and full.meta.image.version == 2


def test_an_image_cut_short_expires_on_its_own(store: SnapshotStore,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    chain = Chain(store, seed=8)
    calls = []
    real = store.r.pipeline

    def failing_pipeline(transaction: bool = True):  # Redis goes away before the manifest
        if transaction:
            calls.append(1)
            raise redis.ConnectionError("gone")
        return real(transaction=transaction)

    monkeypatch.setattr(store.r, "pipeline", failing_pipeline)
    with pytest.raises(redis.ConnectionError):
        store.write_image(chain.state())
    monkeypatch.undo()
    key = store.keys.image(chain.generation, 1)
    assert calls and store.r.exists(key) and 0 < store.r.ttl(key) <= 600
    assert store.r.hget(store.keys.meta, "image") is None
    full = store.read_full()
    assert full is not None and full.source == "scan"
