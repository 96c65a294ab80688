"""Scale-out benchmark: 1 trainer process vs 2 trainer ranks, from Kafka, on this machine.

    .venv/bin/python bench/scaleout.py --quick   # 60,000 synthetic events
    .venv/bin/python bench/scaleout.py           # 300,000

One Tansu broker (2-partition events topic, keyed by user) started here; then, on the same
events, in this order:

* 1 rank: the ordinary ``freshrec trainer`` loop (:class:`trainer.loop.Trainer`, publisher
  off) in a child process;
* 2 ranks: :class:`trainer.ranks.RankedTrainer` in two child processes on gloo, as torchrun
  would start them.

Then the Redis side (:mod:`bench.reshard`): on a third of the events (another topic), the 2
ranks publish as shipped (64 buckets) to a local 3-master Redis Cluster while three slots move,
and a replica follows: ``redis_masters``, ``served_buckets_on_masters`` and
``lost_updates_during_reshard`` (rows served wrong or missing, version gaps, replica reloads).

Throughput is events / (last step with events - first step with events), from the ranks'
wall clocks (the group join and start-up are excluded alike). CPU per event is each trainer
process's own CPU time (all its threads) over the same window, and the broker's over each
phase; ``cpu_ceiling_2_vs_1`` is what two ranks would reach with every core busy on their CPU
per event and no waiting, against the one process's measured rate. The 2-rank state is compared to
the 1-rank state with :mod:`trainer.rank_check` (``equal_to_one_rank``), and every rank counts
the bytes it sent in the step's collectives. Then the ``kill -9`` drill of
:mod:`bench.rank_kill` on a topic of its own (``torchrun --max-restarts 1 freshrec trainer``,
rank 1 killed mid-stream): ``lost_events_after_rank_kill`` and ``recovery_s``. Writes
``bench/results/scaleout.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.rank_kill import kill_one_rank
from bench.reshard import scaleout_keys
from bench.results_file import RESULTS
from featurestore.schema import load_model_config
from featurestore.table import TableSet
from freshrec.devstack import LocalStack, free_port
from freshrec.kafka import create_topics
from freshrec.replay import replay
from freshrec.settings import Settings
from freshrec.synthetic import SyntheticConfig, SyntheticStream
from trainer.checkpoint import Checkpointer, load_arrays
from trainer.rank_check import RankState, distance, load_rank_states

WORLD = 2
KILL_EVENTS = 15_000  # the kill -9 drill: three shares of 5,000


def _timed_steps(trainer: Any, method: str, marks: dict[str, float]) -> None:
    """Wrap ``trainer.<method>`` to stamp the wall time of the first and last batch with
    events (``_finish`` books every learned batch, pipelined or not)."""
    inner = getattr(trainer, method)

    def timed(*args: Any, **kwargs: Any) -> Any:
        if "first" not in marks:
            marks["first"], marks["cpu_first"] = time.time(), time.process_time()
        result = inner(*args, **kwargs)
        marks["last"], marks["cpu_last"] = time.time(), time.process_time()
        return result

    setattr(trainer, method, timed)


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from ``/proc``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_rank(settings: Settings, total: int, out: str) -> None:
    """The single-process trainer, as shipped (its exploration hook; no publisher, as the
    ranks have none here), until ``total`` events."""
    from freshrec.runtime import tune_gc
    from trainer.loop import Trainer
    from trainer.main import exploration_hooks

    config = load_model_config(settings.model_config_path)
    trainer = Trainer(settings, config, hooks=exploration_hooks(settings, config))
    tune_gc()
    marks: dict[str, float] = {}
    # The pipelined loop calls the halves of ``learn``: a batch begins on the training
    # thread, learns on the stepper thread, and finishes back on the training thread.
    _timed_steps(trainer, "_begin", marks)
    _timed_steps(trainer, "_finish", marks)
    trainer.run(max_events=total)
    Path(out, "one.json").write_bytes(orjson.dumps({"trained": trainer.trained, **marks}))


def rank_main(rank: int, settings: Settings, port: int, total: int, out: str) -> None:
    """One of the ranks (``torch.multiprocessing.spawn`` target)."""
    import torch.distributed as dist

    from freshrec.runtime import tune_gc
    from trainer.ranks import loopback_rank_trainer

    trainer = loopback_rank_trainer(settings, rank, WORLD, port)
    tune_gc()
    marks: dict[str, float] = {}
    _timed_steps(trainer, "_finish", marks)
    trainer.run(max_events=total)
    sent = trainer.learner.sent
    Path(out, f"rank-{rank}.json").write_bytes(orjson.dumps({
        "trained": trainer.trained, "steps": trainer.steps, "empty_steps": trainer.empty_steps,
        "all_to_all_bytes": sent.all_to_all, "all_reduce_bytes": sent.all_reduce, **marks}))
    dist.destroy_process_group()



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60,000 events")
    args = parser.parse_args()
    import multiprocessing

    import torch.multiprocessing as mp

    total = 60_000 if args.quick else 300_000
    topic = f"bench-scaleout-{uuid.uuid4().hex[:6]}"
    events = SyntheticStream(SyntheticConfig(seed=3)).events(total)
    work = Path(tempfile.mkdtemp(prefix="scaleout-"))
    with LocalStack(topics=(topic, topic + ".dlq"), partitions=WORLD) as stack:
        summary = replay(events, stack.kafka_bootstrap, topic, total=total, progress=False)
        if summary.failed:
            raise RuntimeError(f"producing: {summary.errors[:3]}")
        base = Settings(kafka_bootstrap=stack.kafka_bootstrap, redis_url=stack.redis_url,
                        topic_events=topic, topic_dlq=topic + ".dlq", topic_partitions=WORLD,
                        trainer_metrics_port=0)
        one_settings = base.model_copy(update={
            "trainer_group_id": f"{topic}-one", "trainer_checkpoint_dir": work / "one"})
        broker = next(p.pid for name, p in stack.children if name == "kafka")
        broker_cpu = [_cpu_seconds(broker)]
        child = multiprocessing.get_context("spawn").Process(
            target=one_rank, args=(one_settings, total, str(work)))
        child.start()
        child.join(900)
        broker_cpu.append(_cpu_seconds(broker))
        if child.exitcode != 0:
            raise RuntimeError(f"the 1-rank trainer failed ({child.exitcode})")
        rank_settings = base.model_copy(update={
            "trainer_group_id": f"{topic}-ranks", "trainer_checkpoint_dir": work / "ranks"})
        mp.spawn(rank_main, args=(rank_settings, free_port(), total, str(work)),
                 nprocs=WORLD)
        broker_cpu.append(_cpu_seconds(broker))
        drill_topic = topic + "-kill"
        create_topics(stack.kafka_bootstrap, [drill_topic, drill_topic + ".dlq"], WORLD)
        kill = kill_one_rank(base.model_copy(update={
            "topic_events": drill_topic, "topic_dlq": drill_topic + ".dlq",
            "trainer_group_id": drill_topic}),
            list(SyntheticStream(SyntheticConfig(seed=4)).events(KILL_EVENTS)), work / "kill")
        redis_side = scaleout_keys(stack, total // 3, work, WORLD)
    one = orjson.loads((work / "one.json").read_bytes())
    ranks = [orjson.loads((work / f"rank-{r}.json").read_bytes()) for r in range(WORLD)]
    config = load_model_config(base.model_config_path)
    ckpt = Checkpointer(work / "one").latest()
    assert ckpt is not None
    d = distance(RankState(TableSet.load(ckpt.path / "tables", config),
                           load_arrays(ckpt.path / "dense")),
                 load_rank_states(work / "ranks", WORLD, config))
    rate_1 = one["trained"] / (one["last"] - one["first"])
    trained_2 = sum(r["trained"] for r in ranks)
    rate_2 = trained_2 / (max(r["last"] for r in ranks) - min(r["first"] for r in ranks))
    # CPU per event: the trainer processes' own (every thread, between their first and last
    # step with events), and the broker's over each whole phase (start-up and group join
    # included, so an upper bound).
    cpu_1 = (one["cpu_last"] - one["cpu_first"]) / one["trained"] * 1e6
    cpu_2 = sum(r["cpu_last"] - r["cpu_first"] for r in ranks) / trained_2 * 1e6
    broker_1 = (broker_cpu[1] - broker_cpu[0]) / total * 1e6
    broker_2 = (broker_cpu[2] - broker_cpu[1]) / total * 1e6
    cores = os.cpu_count() or 1
    out = {
        "mode": "quick" if args.quick else "full",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "stream": f"synthetic (seed 3), {total} events, 2 partitions keyed by user",
        "ranks": WORLD,
        "events_per_s_1": round(rate_1),
        "events_per_s_2": round(rate_2),
        "scaling_2_vs_1": round(rate_2 / rate_1, 3),
        "cpu_us_per_event_1": round(cpu_1, 1),
        "cpu_us_per_event_2": round(cpu_2, 1),
        "broker_cpu_us_per_event_1": round(broker_1, 1),
        "broker_cpu_us_per_event_2": round(broker_2, 1),
        "cores_busy_1": round(rate_1 * (cpu_1 + broker_1) / 1e6, 2),
        "cores_busy_2": round(rate_2 * (cpu_2 + broker_2) / 1e6, 2),
        # What 2 ranks would reach with every core busy on their CPU per event and no wait.
        "cpu_ceiling_2_vs_1": round(cores / ((cpu_2 + broker_2) / 1e6) / rate_1, 3),
        "equal_to_one_rank": d.equal,
        "distance_to_one_rank": {"same_ids": d.same_ids, "max_row_diff": d.max_row_diff,
                                 "max_norm_diff": d.max_norm_diff,
                                 "max_dense_diff": d.max_dense_diff,
                                 "dense_identical_across_ranks":
                                     d.dense_identical_across_ranks},
        "all_to_all_bytes_per_event": round(sum(r["all_to_all_bytes"] for r in ranks)
                                            / trained_2, 1),
        "all_reduce_bytes_per_event": round(sum(r["all_reduce_bytes"] for r in ranks)
                                            / trained_2, 1),
        "steps_per_rank": [r["steps"] for r in ranks],
        "empty_steps_per_rank": [r["empty_steps"] for r in ranks],
        "events_per_rank": [r["trained"] for r in ranks],
        "lost_events_after_rank_kill": kill.lost_events,
        "recovery_s": round(kill.recovery_s, 2),
        "rank_kill": {"produced": kill.produced, "trained": kill.trained,
                      "learned_twice": kill.learned_twice,
                      "restored_round": kill.rounds_before_kill,
                      "relearned_after_restart": kill.relearned},
        **redis_side,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scaleout.json").write_text(json.dumps(out, indent=1) + "\n")
    width = max(map(len, out))
    for k, v in out.items():
        if k != "machine":
            print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
