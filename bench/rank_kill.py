"""``kill -9`` of one trainer rank under torchrun: all ranks restart from the last global
checkpoint, no event is lost and none is learned twice into the state.

The drill (``tests/integration/test_rank_recovery.py`` asserts it, ``bench/scaleout.py``
reports its numbers) runs the shipped launch, ``torchrun --standalone --nproc-per-node 2
--max-restarts 1 freshrec trainer``, against a real broker:

1. a first share of the events; wait for a global checkpoint that holds all of it;
2. a second share; as soon as the ranks learned some of it past that checkpoint, ``kill -9``
   rank 1 (what they learned since is in no checkpoint and must be learned again, once);
3. a third share, produced while the ranks are down;
4. ``recovery_s``: from the kill to the first event learned by the restarted ranks (the
   survivor noticing, torchrun restarting both, imports, rendezvous, restore, first fetch);
5. wait for a global checkpoint holding every event, stop torchrun;
6. count from the state: every event has one item, and the owner of the item's row counts
   its sightings (``counts``, exact: ``min_count`` 1). Per item, the sightings in the ranks'
   last checkpoints against the occurrences in the produced stream: fewer is a lost event,
   more an event learned twice.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from featurestore.events import parse_labeled_event
from featurestore.featurize import Featurizer
from featurestore.schema import load_model_config
from freshrec.devstack import die_with_parent
from freshrec.replay import replay
from freshrec.settings import Settings, to_environ
from trainer.checkpoint import Checkpoint, Checkpointer
from trainer.rank_check import load_rank_states
from trainer.sharded import DEFAULT_RANK_BUCKETS

WORLD = 2
ITEM_SLOT = "item"


@dataclass(frozen=True)
class KillResult:
    """What the drill measured."""

    produced: int
    trained: int  # events the ranks' last global checkpoint says were learned
    lost_events: int  # produced but not in the state
    learned_twice: int  # in the state more often than produced
    recovery_s: float
    rounds_before_kill: int  # the global checkpoint the ranks restarted from
    relearned: int  # events learned before the kill past that checkpoint (learned again)


def _children(pid: int) -> dict[int, int]:
    """The child processes of ``pid``: pid -> their ``RANK`` (torchrun's workers)."""
    out: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != pid:
                continue
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        ranks = [int(v[5:]) for v in env if v.startswith(b"RANK=")]
        if ranks:
            out[int(stat.parent.name)] = ranks[0]
    return out


def _rounds(directory: Path) -> dict[int, Checkpoint]:
    try:
        return {int(c.manifest["round"]): c for c in Checkpointer(directory).complete()}
    except (OSError, ValueError, KeyError):
        return {}  # being written or pruned right now


def _global_round(checkpoints: Path) -> tuple[int, int] | None:
    """``(round, events trained)`` of the newest global checkpoint (a round every rank holds),
    the one a restart restores; None before the first."""
    held = [_rounds(checkpoints / f"rank-{r}") for r in range(WORLD)]
    common = set.intersection(*(set(h) for h in held))
    if not common:
        return None
    newest = max(common)
    return newest, sum(int(h[newest].manifest["trained"]) for h in held)


def _wait(predicate: Callable[[], bool], timeout: float, what: str,
          launcher: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if launcher.poll() is not None:
            raise RuntimeError(f"{what}: torchrun exited with {launcher.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def _audited(audit: Path) -> int:
    """Events the ranks wrote to their audit logs so far (all incarnations)."""
    return sum(p.read_bytes().count(b"\n") for p in audit.parent.glob(audit.name + ".rank-*"))


def kill_one_rank(settings: Settings, events: list[dict], work: Path,
                  timeout: float = 120.0) -> KillResult:
    """Run the drill on ``events`` (labeled-event dicts, split in three shares) into
    ``settings.topic_events`` (2 partitions); checkpoints and logs under ``work``."""
    audit = work / "audit" / "events"
    settings = settings.model_copy(update={
        "trainer_checkpoint_dir": work / "checkpoints", "trainer_audit_log": audit,
        "trainer_checkpoint_interval_s": 2.0, "trainer_metrics_port": 0,
        # ranks publish their own buckets, which `freshrec trainer` requires of them
        "snapshot_buckets": settings.snapshot_buckets or DEFAULT_RANK_BUCKETS})
    checkpoints = settings.trainer_checkpoint_dir
    shares = [events[i * len(events) // 3:(i + 1) * len(events) // 3] for i in range(3)]

    def produce(share: list[dict]) -> None:
        summary = replay(share, settings.kafka_bootstrap, settings.topic_events,
                         total=len(share), progress=False)
        if summary.failed:
            raise RuntimeError(f"producing: {summary.errors[:3]}")

    work.mkdir(parents=True, exist_ok=True)
    log = (work / "torchrun.log").open("ab")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={WORLD}", "--max-restarts=1", "--monitor-interval=0.05",
         "--no-python", str(Path(sys.executable).parent / "freshrec"), "trainer"],
        env=to_environ(settings), stdout=log, stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent)
    try:
        produce(shares[0])
        _wait(lambda: (g := _global_round(checkpoints)) is not None and g[0] >= 1
              and g[1] == len(shares[0]), timeout, "a global checkpoint of the first share",
              launcher)
        before = _global_round(checkpoints)
        assert before is not None
        produce(shares[1])
        _wait(lambda: _audited(audit) > len(shares[0]), timeout,
              "the second share being learned", launcher)
        workers = _children(launcher.pid)
        victim = next(pid for pid, rank in workers.items() if rank == 1)
        subprocess.run(["kill", "-9", str(victim)], check=True)
        killed_at = time.monotonic()
        restarted_from = _global_round(checkpoints)
        produce(shares[2])
        # The old workers are gone once torchrun started new ones; then the first new line in
        # an audit log is the first event learned after the restart.
        _wait(lambda: len(new := _children(launcher.pid)) == WORLD
              and not set(new) & set(workers), timeout, "torchrun restarting the ranks",
              launcher)
        at_restart = _audited(audit)
        _wait(lambda: _audited(audit) > at_restart, timeout, "the first event learned after "
              "the restart", launcher)
        recovery_s = time.monotonic() - killed_at
        _wait(lambda: (g := _global_round(checkpoints)) is not None and g[1] == len(events),
              timeout, "a global checkpoint of every event", launcher)
    finally:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(60)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()
        log.close()
    assert restarted_from is not None and before is not None
    counted = _item_counts_in_state(settings, checkpoints)
    expected = _item_counts_in(events, settings)
    ids = sorted(set(counted) | set(expected))
    diff = np.array([counted.get(i, 0) - expected.get(i, 0) for i in ids], dtype=np.int64)
    last = _global_round(checkpoints)
    return KillResult(
        produced=len(events), trained=last[1] if last else -1,
        lost_events=int(-diff[diff < 0].sum()), learned_twice=int(diff[diff > 0].sum()),
        recovery_s=recovery_s, rounds_before_kill=restarted_from[0],
        relearned=at_restart - restarted_from[1])


def _item_counts_in_state(settings: Settings, checkpoints: Path) -> dict[int, int]:
    """Per item ID, the sightings its owner counted (in the ranks' last checkpoints)."""
    config = load_model_config(settings.model_config_path)
    out: dict[int, int] = {}
    for state in load_rank_states(checkpoints, WORLD, config):
        table = state.tables[ITEM_SLOT]
        ids, _ = table.all_rows()
        counts = table.row_state(table.find(ids))["counts"]
        out.update(zip(ids.tolist(), counts.tolist(), strict=True))
    return out


def _item_counts_in(events: list[dict], settings: Settings) -> dict[int, int]:
    """Per item ID, its occurrences in ``events``, featurized as the trainer does."""
    featurizer = Featurizer(load_model_config(settings.model_config_path))
    batch = featurizer.featurize_events([parse_labeled_event(orjson.dumps(e)) for e in events])
    ids, counts = np.unique(batch.slots[ITEM_SLOT].ids, return_counts=True)
    return dict(zip(ids.tolist(), counts.tolist(), strict=True))
