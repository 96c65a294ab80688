"""Checkpoint protocol: a crash at any step leaves a store that the next save can extend."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from trainer import checkpoint
from trainer.checkpoint import Checkpointer, load_arrays, save_arrays


def writers(value: float) -> dict:
    return {"state": lambda d: save_arrays(d, {"x": np.full(3, value)})}


def test_crash_between_rename_and_latest_does_not_crash_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Checkpointer(tmp_path)
    store.save(writers(1.0), {"n": 1})
    real_replace = os.replace

    def crash_on_latest(src, dst) -> None:
        if Path(dst).name == "LATEST":
            raise OSError("killed before LATEST was updated")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_on_latest)
    with pytest.raises(OSError, match="killed"):
        store.save(writers(2.0), {"n": 2})
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert store.latest().manifest["n"] == 1  # the unnamed directory is not trusted

    # The restarted process saves again: it must not collide with the orphaned directory.
    for n in (3, 4):
        store = Checkpointer(tmp_path)
        saved = store.save(writers(float(n)), {"n": n})
        assert store.latest().path == saved.path
        assert load_arrays(saved.path / "state")["x"][0] == n
    names = sorted(p.name for p in tmp_path.glob("ckpt-*"))
    assert len(names) == 2 and store.latest().path.name == names[-1]  # orphan pruned


def test_rewind_makes_an_earlier_checkpoint_latest_and_drops_the_newer(tmp_path: Path) -> None:
    """A rank one global round ahead of the others goes back to the round they all hold;
    the next save then keeps that round as the previous one (what a restart would need)."""
    store = Checkpointer(tmp_path)
    store.save(writers(1.0), {"round": 1})
    store.save(writers(2.0), {"round": 2})
    one, two = store.complete()
    assert [c.manifest["round"] for c in (one, two)] == [1, 2]
    store.rewind(one)
    assert store.latest() == one
    assert [c.manifest["round"] for c in store.complete()] == [1]
    store.save(writers(3.0), {"round": 2})
    assert [c.manifest["round"] for c in store.complete()] == [1, 2]
    assert load_arrays(store.latest().path / "state")["x"][0] == 3.0
