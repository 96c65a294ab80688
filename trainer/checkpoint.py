"""Durable, atomic checkpoints: a directory of raw arrays + JSON, never pickle.

Protocol (why each step): write everything into a hidden temp directory (a crash leaves only
garbage that is ignored), fsync every file and the directory (the data is on disk before it is
named), rename to ``ckpt-<seq>`` (atomic on POSIX), then atomically replace ``LATEST`` with that
name. Only after ``save`` returns does the trainer commit the offsets stored inside to Kafka, so
a crash at any point restarts from a checkpoint whose offsets match its state: events after it
are re-applied (at-least-once), none are skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 1


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_arrays(directory: Path, arrays: dict[str, np.ndarray]) -> None:
    """One ``.npy`` per array (``allow_pickle=False``), names kept in ``arrays.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(arrays)
    for i, name in enumerate(names):
        np.save(directory / f"{i}.npy", np.asarray(arrays[name]), allow_pickle=False)
    (directory / "arrays.json").write_text(json.dumps(names))


def load_arrays(directory: Path) -> dict[str, np.ndarray]:
    """Inverse of :func:`save_arrays`."""
    names = json.loads((directory / "arrays.json").read_text())
    return {name: np.load(directory / f"{i}.npy", allow_pickle=False)
            for i, name in enumerate(names)}


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint on disk."""

    path: Path
    manifest: dict[str, Any]

    @property
    def offsets(self) -> dict[str, dict[int, int]]:
        """Next offset to consume, per topic and partition."""
        return {t: {int(p): int(o) for p, o in parts.items()}
                for t, parts in self.manifest.get("offsets", {}).items()}


class Checkpointer:
    """Writes and finds checkpoints under one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def save(self, writers: dict[str, Callable[[Path], None]], manifest: dict[str, Any]
             ) -> Checkpoint:
        """Run each writer into its own subdirectory, then publish atomically."""
        self.directory.mkdir(parents=True, exist_ok=True)
        latest = self.latest()
        # Past every directory on disk, not just past LATEST: a crash between the rename and
        # the LATEST update leaves a complete but unnamed ckpt-<seq+1>, and reusing its name
        # would fail the rename on every later save (a crash loop).
        seq = max([latest.manifest["seq"] if latest else 0, *self._sequences()]) + 1
        name = f"ckpt-{seq:08d}"
        tmp = self.directory / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for part, write in writers.items():
            write(tmp / part)
        manifest = {**manifest, "format": FORMAT, "seq": seq, "created": time.time()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, sort_keys=True))
        _fsync_tree(tmp)
        final = self.directory / name
        os.replace(tmp, final)
        self._point_latest_at(name)
        self._prune(keep={name, latest.path.name if latest else name})
        return Checkpoint(final, manifest)

    def _point_latest_at(self, name: str) -> None:
        """Atomically name ``name`` the latest checkpoint (durable when this returns)."""
        pointer = self.directory / ".LATEST.tmp"
        pointer.write_text(name)
        fd = os.open(pointer, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(pointer, self.directory / "LATEST")
        _fsync_dir(self.directory)

    def latest(self) -> Checkpoint | None:
        """The checkpoint ``LATEST`` names, or None if there is none yet."""
        pointer = self.directory / "LATEST"
        if not pointer.is_file():
            return None
        path = self.directory / pointer.read_text().strip()
        manifest = json.loads((path / "manifest.json").read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{path}: checkpoint format {manifest.get('format')} != {FORMAT}")
        return Checkpoint(path, manifest)

    def complete(self) -> list[Checkpoint]:
        """Every complete checkpoint on disk (the latest and the one before it, after a save),
        oldest first."""
        found = []
        for path in sorted(self.directory.glob("ckpt-*")):
            manifest = path / "manifest.json"
            if path.name[5:].isdigit() and manifest.is_file():
                found.append(Checkpoint(path, json.loads(manifest.read_text())))
        return found

    def rewind(self, to: Checkpoint) -> None:
        """Make ``to`` the latest checkpoint again and delete every newer one.

        Trainer ranks restore the newest checkpoint *all* of them completed; a rank that got
        one step further before another died holds a checkpoint no other rank has, which must
        never be restored later (nor keep ``to`` from being the one kept by the next prune).
        """
        self._point_latest_at(to.path.name)
        for ckpt in self.complete():
            if ckpt.manifest["seq"] > to.manifest["seq"]:
                shutil.rmtree(ckpt.path, ignore_errors=True)

    def _sequences(self) -> list[int]:
        return [int(p.name[5:]) for p in self.directory.glob("ckpt-*")
                if p.name[5:].isdigit()]

    def _prune(self, keep: set[str]) -> None:
        """Drop every checkpoint but the new and the previous one (and orphans of crashes)."""
        for old in self.directory.glob("ckpt-*"):
            if old.is_dir() and old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)
        for tmp in self.directory.glob(".tmp-ckpt-*"):
            shutil.rmtree(tmp, ignore_errors=True)
