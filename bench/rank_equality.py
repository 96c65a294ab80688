"""How far 2 trainer ranks are from one process on exactly the same steps, without Kafka.

    .venv/bin/python -m bench.rank_equality           # 20,000 synthetic events

``bench/scaleout.py`` compares ranks and one process fed by Kafka, where the two runs also
batch the events differently. Here both see the same steps: the events split in two by user
(as the partitions are), step ``i`` is events ``[i*S, (i+1)*S)`` of each half; two
:class:`~trainer.sharded.ShardedLearner` processes on gloo learn one half each, one
:class:`~trainer.learner.OnlineLearner` learns both halves of each step. For scale, the same
process on two other valid orders of the same steps (each half's block in turn, and the step
in event-time order) is compared with it too. Variants of the push: ``add`` (shipped: the
owner adds every rank's change of a row) and ``average`` (the change of a row several ranks
used is their mean; optimizer state still adds). Distances are :mod:`trainer.rank_check`'s.
Writes ``bench/results/rank_equality.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_file import RESULTS
from featurestore.events import AnyLabeledEvent, parse_labeled_event
from featurestore.schema import load_model_config
from featurestore.table import TableSet
from freshrec.devstack import free_port
from freshrec.settings import default_model_config_path
from freshrec.synthetic import SyntheticConfig, SyntheticStream
from trainer.checkpoint import load_arrays, save_arrays
from trainer.rank_check import RankState, distance

WORLD = 2
ORDERS = ("halves_in_one_step", "halves_one_after_the_other", "event_time")


def _steps(n: int, size: int) -> list[list[list[AnyLabeledEvent]]]:
    """Per step, each rank's events (split by user, as the events topic is keyed)."""
    events = [parse_labeled_event(orjson.dumps(e))
              for e in SyntheticStream(SyntheticConfig(seed=3)).events(n)]
    halves = [[e for e in events if zlib.crc32(e.user_id.encode()) % WORLD == r]
              for r in range(WORLD)]
    longest = max(map(len, halves))
    return [[h[i:i + size] for h in halves] for i in range(0, longest, size)]


def _learn(learner: Any, events: list[AnyLabeledEvent]) -> None:
    learner.step_batch(learner.featurizer.featurize_events(events),
                       np.array([e.label for e in events], dtype=np.float64),
                       np.array([e.ts for e in events], dtype=np.float64))


def _save(learner: Any, directory: Path) -> None:
    from trainer.model import model_arrays

    learner.tables.save(directory / "tables")
    save_arrays(directory / "dense", model_arrays(learner.model))


def _load(directory: Path) -> RankState:
    config = load_model_config(default_model_config_path())
    return RankState(TableSet.load(directory / "tables", config),
                     load_arrays(directory / "dense"))


def one_process(n: int, size: int, order: str, out: Path) -> None:
    from trainer.learner import OnlineLearner

    learner = OnlineLearner(load_model_config(default_model_config_path()))
    for step in _steps(n, size):
        if order == "halves_in_one_step":
            batches = [[e for half in step for e in half]]
        elif order == "halves_one_after_the_other":
            batches = [half for half in step if half]
        else:
            batches = [sorted((e for half in step for e in half), key=lambda e: e.ts)]
        for batch in batches:
            _learn(learner, batch)
    _save(learner, out)


def _average_push(learner: Any) -> None:
    """Replace the owner's sum of changes by their mean over the ranks that used the row."""
    from trainer.sharded import _FetchedRows, _Request

    def push(req: _Request, fetched: dict[str, _FetchedRows]) -> None:
        d = learner.dim_max
        for table, uniq, summed, users in learner._owned_changes(req, fetched):
            dim = table.config.dim
            e, s1, s2 = table.read_rows(uniq)
            table.write_rows(uniq, e + summed[:, :dim] / users[:, None],
                             s1 + summed[:, d:d + dim], s2 + summed[:, 2 * d:2 * d + dim])

    learner._push = push


def rank_main(rank: int, port: int, n: int, size: int, push: str, out: str) -> None:
    import torch.distributed as dist

    from trainer.sharded import DEFAULT_RANK_BUCKETS, Ranks, ShardedLearner

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    learner = ShardedLearner(load_model_config(default_model_config_path()),
                             Ranks(rank, WORLD, DEFAULT_RANK_BUCKETS))
    if push == "average":
        _average_push(learner)
    for step in _steps(n, size):
        learner.step_counts = np.array([len(half) for half in step])
        _learn(learner, step[rank])
    _save(learner, Path(out) / f"rank-{rank}")
    dist.destroy_process_group()



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--steps", type=int, nargs="*", default=[128, 2048],
                        help="events per rank and step")
    args = parser.parse_args()
    import torch.multiprocessing as mp

    work = Path(tempfile.mkdtemp(prefix="rank-equality-"))
    out: dict[str, Any] = {"events": args.events, "stream": "synthetic (seed 3), split by user",
                           "results": []}
    for size in args.steps:
        for order in ORDERS:
            one_process(args.events, size, order, work / f"one-{order}-{size}")
        one = _load(work / f"one-{ORDERS[0]}-{size}")
        row: dict[str, Any] = {"events_per_rank_and_step": size}
        for order in ORDERS[1:]:
            row[f"one_process_{order}"] = asdict(distance(one, [_load(
                work / f"one-{order}-{size}")]))
        for push in ("add", "average"):
            target = work / f"ranks-{push}-{size}"
            mp.spawn(rank_main, args=(free_port(), args.events, size, push, str(target)),
                     nprocs=WORLD)
            d = distance(one, [_load(target / f"rank-{r}") for r in range(WORLD)])
            row[f"ranks_{push}"] = {**asdict(d), "equal": d.equal}
        out["results"].append(row)
        print(json.dumps(row, indent=1), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "rank_equality.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
