"""``freshrec trainer`` as R ranks on torch.distributed (gloo on CPU, NCCL is not used).

Launched by ``torchrun`` (or anything that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``, such as ``torch.multiprocessing.spawn`` in tests). With ``WORLD_SIZE`` unset or
1 the ordinary single-process :class:`~trainer.loop.Trainer` runs, unchanged.

Rank ``r`` of ``R``:

- ``assign()``s the events-topic partitions ``p % R == r`` (no group rebalancing between
  ranks; the group id is only where offsets are committed for lag monitoring);
- owns the embedding rows of buckets ``k % R == r`` (:class:`~trainer.sharded.ShardedLearner`);
- checkpoints into ``<trainer_checkpoint_dir>/rank-<r>`` (its rows, the dense weights, its
  partitions' offsets), at the step rank 0 chose: a *global* checkpoint, one round number on
  every rank, offsets committed only after every rank saved it, and a restart restores the
  newest round all ranks hold (:meth:`RankedTrainer.restore`).

Steps are driven by time: each rank consumes for at most ``trainer_batch_max_wait_ms``, and
then every rank takes the step, an idle one with no examples. A step starts with one
``all_gather`` of a small header (examples in hand, stop request, events done, event-time
watermark, rank 0's sweep and checkpoint decisions); nothing else decides whether a rank joins
a collective, so the collectives cannot go out of step and an idle partition cannot stall
the others.

Expiry follows one watermark: the minimum of the ranks' event clocks (ranks without events yet
have no say), so no owner expires a row that a rank still behind in event time could use.

A rank that fails (crash, ``kill -9``, a failing batch) fails the others' next collective: at
once when its connections close, after ``trainer_collective_timeout_s`` when it hangs. Every
rank then exits, and the launcher (``torchrun --max-restarts``, the StatefulSet) starts all of
them again from the last global checkpoint: events after it are learned again, once, and none
before it is learned twice.

Publishing (when ``snapshot_buckets`` > 0, which ``freshrec trainer`` requires of ranks): each
rank writes the snapshot chains of the buckets it owns, rank 0 the head chain (dense weights,
meta) too, between steps like the single process (``trainer.publisher.snapshot_store``).

Exploration (:mod:`trainer.rank_exploration`): the clusters are identical on every rank, and
the Diag-LinUCB statistics of an item live with the owner of its bucket, like its rows.

Not in ranks yet: the per-event isolation of a failing batch (a failure stops the rank, and so
all of them).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from confluent_kafka import Message, TopicPartition

from featurestore.labeled_batch import LabeledBatch
from featurestore.schema import ModelConfig, load_model_config
from featurestore.wire_scan import warm_up as warm_up_scanner
from freshrec.kafka import assign_from
from freshrec.metrics import TrainerMetrics
from freshrec.settings import Settings
from trainer.loop import BatchHook, Trainer
from trainer.sharded import DEFAULT_RANK_BUCKETS, Ranks, ShardedLearner

log = logging.getLogger("freshrec.trainer")



def ranks_from_env(settings: Settings) -> Ranks | None:
    """This process's :class:`Ranks` from torchrun's variables; ``None`` for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return Ranks(int(os.environ["RANK"]), world,
                 settings.snapshot_buckets or DEFAULT_RANK_BUCKETS)


def join_process_group(ranks: Ranks, timeout_s: float) -> None:
    """Join the gloo group (``MASTER_ADDR``/``MASTER_PORT`` rendezvous) unless joined.

    ``timeout_s`` bounds every collective: a rank that crashed is noticed at once (gloo sees
    the connection close), one that hangs or is cut off after this long; the others then fail
    and the launcher restarts all of them from the last global checkpoint.
    """
    if dist.is_initialized():
        return
    timeout = timedelta(seconds=timeout_s)
    store, _, _ = next(dist.rendezvous("env://", ranks.rank, ranks.world, timeout=timeout))
    # torchrun keeps one store across the restarts of a worker group: without a prefix per
    # attempt, a restarted rank reads the address a dead rank published and fails to connect.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group("gloo", store=dist.PrefixStore(f"freshrec/attempt-{attempt}", store),
                            rank=ranks.rank, world_size=ranks.world, timeout=timeout)


def global_round(held: list[set[int]], newest: list[int]) -> int | None:
    """The newest checkpoint round every rank holds (``held[r]``: the rounds of this world
    size on rank r's disk, ``newest[r]``: its newest round of any world size).

    ``None`` is a fresh start: no common round, and no rank got past round 0 (the empty
    state every rank saves first). Ranks holding learned state with nothing in common (a
    rank lost its volume, the world size changed) is an error: starting over would drop it.
    """
    common = set.intersection(*held)
    if common:
        return max(common)
    if max(newest) > 0:
        raise RuntimeError(
            f"no checkpoint round that all {len(held)} ranks hold (rounds per rank: "
            f"{[sorted(h) for h in held]}): a rank lost its volume or the world size "
            "changed, and resharding is not built")
    return None


@dataclass(frozen=True)
class StepHeader:
    """What every rank told the others at the start of a step."""

    examples: np.ndarray  # per rank
    stop: bool  # any rank asked to stop
    done: int  # events trained or dead-lettered by all ranks, this step included
    watermark: float  # shared event-time watermark (-inf until any rank has one)
    sweep: bool  # rank 0's decisions, taken by all
    checkpoint: bool


class RankedTrainer(Trainer):
    """One rank of the trainer: its partitions, its buckets, the shared dense model."""

    def __init__(self, settings: Settings, config: ModelConfig, ranks: Ranks,
                 metrics: TrainerMetrics | None = None,
                 hooks: list[BatchHook] | None = None) -> None:
        audit = settings.trainer_audit_log
        settings = settings.model_copy(update={
            "trainer_checkpoint_dir": settings.trainer_checkpoint_dir / f"rank-{ranks.rank}",
            "trainer_audit_log": None if audit is None
            else audit.with_name(f"{audit.name}.rank-{ranks.rank}")})
        learner = ShardedLearner(config, ranks, seed=settings.trainer_seed,
                                 micro_batch=settings.trainer_micro_batch)
        super().__init__(settings, config, metrics, hooks=hooks, learner=learner)
        self.ranks = ranks
        self.steps = 0
        self.empty_steps = 0
        # The global checkpoint this rank's state belongs to (None before the first one).
        self.round: int | None = None

    # --- global checkpoints --------------------------------------------------------------

    def restore(self) -> bool:
        """Restore the newest global checkpoint: the newest round *every* rank completed.

        Collective. A rank that saved round N+1 before another rank died holds a checkpoint
        the others lack; it restores round N (kept by the prune) and drops N+1, so the ranks'
        rows, dense weights and offsets all belong to one step. Nothing is shared on disk (in
        k8s each rank has its own volume): the ranks exchange which rounds they hold.
        """
        on_disk = [c for c in self.checkpointer.complete() if "round" in c.manifest]
        held = {int(c.manifest["round"]): c for c in on_disk
                if c.manifest.get("world") == self.ranks.world}
        everyone: list[tuple[set[int], int] | None] = [None] * self.ranks.world
        dist.all_gather_object(everyone, (set(held), max(
            (int(c.manifest["round"]) for c in on_disk), default=-1)))
        chosen = global_round([h for h, _ in everyone],  # type: ignore[misc]
                              [newest for _, newest in everyone])  # type: ignore[misc]
        if chosen is None:
            return False
        self.checkpointer.rewind(held[chosen])
        self._load_checkpoint(held[chosen])
        self.round = chosen
        return True

    def ensure_checkpoint(self) -> None:
        """Round 0, the initial state, on every rank (collective) when nothing was restored."""
        if self.round is None:
            self.checkpoint()

    def checkpoint(self) -> None:
        """A global checkpoint: every rank saves the same round at the same step, and only
        once all have saved does any rank commit its offsets.

        Called by every rank at the step rank 0 chose (and at the end). A rank that dies before
        the barrier leaves round N+1 incomplete: the restart restores round N everywhere, whose
        offsets are at or behind every offset committed so far.
        """
        started = time.perf_counter()
        nxt = 0 if self.round is None else self.round + 1
        self._save_checkpoint({"round": nxt, "rank": self.ranks.rank,
                               "world": self.ranks.world})
        dist.barrier()
        self.round = nxt
        self._commit_checkpointed(started)

    # --- one step ------------------------------------------------------------------------

    def _header(self, examples: int, stop: bool, now: float) -> StepHeader:
        clock = self.clock.now
        mine = torch.tensor([
            examples, float(stop), self.trained + self.dead_lettered + examples,
            clock if math.isfinite(clock) else math.nan,
            float(now - self._last_sweep >= self.settings.trainer_sweep_interval_s),
            float(now - self._last_checkpoint >= self.settings.trainer_checkpoint_interval_s),
        ], dtype=torch.float64)
        everyone = [torch.empty_like(mine) for _ in range(self.ranks.world)]
        dist.all_gather(everyone, mine)
        h = torch.stack(everyone).numpy()
        clocks = h[:, 3][np.isfinite(h[:, 3])]
        return StepHeader(examples=h[:, 0].astype(np.int64), stop=bool(h[:, 1].any()),
                          done=int(h[:, 2].sum()),
                          watermark=float(clocks.min()) if len(clocks) else -math.inf,
                          sweep=bool(h[0, 4]), checkpoint=bool(h[0, 5]))

    def _read(self) -> tuple[list[Message], LabeledBatch | None]:
        """Consume for at most the batch wait and scan what came: the wire scanner's batch,
        or ``None`` when there is nothing clean to scan. Changes no state, so it runs while the
        previous step is still in flight."""
        self.metrics.heartbeat.beat()
        messages = self._consumer.consume(num_messages=self.settings.trainer_batch_max_events,
                                          timeout=self.settings.trainer_batch_max_wait_ms / 1e3)
        return messages, (self._scan_clean(messages, time.time()) if messages else None)

    def _admit(self, messages: list[Message], batch: LabeledBatch | None
               ) -> LabeledBatch | None:
        """Make a read batch this rank's share of the next step: advance the offsets past it,
        or parse it (the decoder, else one by one, dead-lettering what is bad), as one process
        reads a batch. Only between steps: it changes the offsets a checkpoint saves."""
        if batch is not None:
            self._advance_offsets(messages)
            return batch
        if not messages:
            return None
        wall = time.time()
        parsed = self._parse_clean(messages, wall)
        events = parsed if parsed is not None else self._parse_each(messages, wall)[0]
        return LabeledBatch.of_events(events, self.learner.featurizer) if events else None

    def _take_step(self, batch: LabeledBatch | None, stop: bool, started: float,
                   consumed: bool) -> StepHeader:
        """The step every rank takes together: the header, then this rank's share learned (an
        idle rank joins every collective of the step with an empty share)."""
        header = self._header(0 if batch is None else len(batch), stop, time.monotonic())
        self.learner.step_counts = header.examples
        if batch is not None and len(batch):
            self.learn(batch)
        else:
            self.empty_steps += 1
            empty = LabeledBatch.of_events([], self.learner.featurizer)
            self.learner.step_batch(empty.sparse, empty.labels, empty.ts)
            for hook in self.hooks:
                hook.on_batch(empty, self.learner)
        self.steps += 1
        self._dlq.poll(0)
        if consumed:
            self.metrics.batch_seconds.observe(time.perf_counter() - started)
        return header

    def _housekeeping(self, header: StepHeader) -> None:
        now = time.monotonic()
        if self.publisher is not None:
            self.publisher.maybe_publish()
        if header.sweep:
            self.sweep(header.watermark)
            self._last_sweep = now
        if now - self._last_gauges >= 1.0:
            self._update_gauges()
            self._rewind_truncated()
            self._last_gauges = now
        if header.checkpoint:
            self.checkpoint()

    # --- the loop ------------------------------------------------------------------------

    def assign(self) -> list[int]:
        """Assign this rank's partitions of the events topic, from the checkpoint's offsets."""
        topic = self.settings.topic_events
        meta = self._consumer.list_topics(topic, timeout=10).topics[topic]
        mine = self.ranks.partitions(len(meta.partitions))
        assign_from(self._consumer, [TopicPartition(topic, p) for p in mine], self.offsets)
        log.info("rank %d/%d: partitions %s, %d buckets of %d", self.ranks.rank,
                 self.ranks.world, mine, len(self.ranks.owned_buckets()),
                 self.ranks.n_buckets)
        return mine

    def run(self, stop: threading.Event | None = None, max_events: int | None = None) -> None:
        """Take steps with the other ranks until any rank is stopped (or ``max_events`` are
        done over all ranks); checkpoint on the way out."""
        stop = stop or threading.Event()
        self.assign()
        self.ensure_checkpoint()
        self.learner.warm_up()
        warm_up_scanner(self._wire_plan)
        for hook in self.hooks:
            if hasattr(hook, "warm_up"):
                hook.warm_up()
        # Pipelined like one process: the step (its collectives, the learning, the hooks) runs
        # on a stepper thread while this thread consumes and scans the next batch; the
        # collectives wait with the GIL released. Everything that changes what a checkpoint
        # saves (offsets, dead letters, the housekeeping and its checkpoint) runs here, between
        # steps, so a rank's steps and checkpoints keep the order of the serial loop.
        stepper = ThreadPoolExecutor(1, thread_name_prefix="freshrec-rank-step")
        in_flight: Future[StepHeader] | None = None
        try:
            while True:
                started = time.perf_counter()
                messages, scanned = self._read()
                if in_flight is not None:
                    header = in_flight.result()
                    in_flight = None
                    self._housekeeping(header)
                    if header.stop or (max_events is not None and header.done >= max_events):
                        break  # the batch just read was not admitted: it is read again later
                batch = self._admit(messages, scanned)
                in_flight = stepper.submit(self._take_step, batch, stop.is_set(), started,
                                           bool(messages))
        except BaseException:
            # The state may be half-learned, or the other ranks gone: no checkpoint of it.
            # Every rank restarts from its last checkpoint, which all ranks took at one step.
            stepper.shutdown(wait=True, cancel_futures=True)
            self._release()
            raise
        stepper.shutdown(wait=True)
        # The last global checkpoint, taken by every rank (an idle one too: it owns rows).
        self.checkpoint()
        self._release()


def rank_hooks(settings: Settings, config: ModelConfig, ranks: Ranks,
               metrics: TrainerMetrics | None = None) -> list[BatchHook]:
    """The rank's exploration hook (:mod:`trainer.rank_exploration`), as one process has its
    own (:func:`trainer.main.build_trainer`)."""
    from trainer.rank_exploration import RankExploration

    hook = RankExploration.from_settings(settings, config, metrics)
    hook.ranks = ranks
    return [hook]


def build_ranked_trainer(settings: Settings, ranks: Ranks,
                         metrics: TrainerMetrics | None = None) -> RankedTrainer:
    """Join the process group, then a rank restored from its own checkpoint, publishing its
    buckets when the snapshot layout is bucketed."""
    join_process_group(ranks, settings.trainer_collective_timeout_s)
    config = load_model_config(settings.model_config_path)
    metrics = metrics or TrainerMetrics()
    trainer = RankedTrainer(settings, config, ranks, metrics,
                            hooks=rank_hooks(settings, config, ranks, metrics))
    trainer.restore()
    if settings.snapshot_buckets:
        from trainer.publisher import make_publisher

        trainer.publisher = make_publisher(settings, trainer, trainer.metrics, ranks)
    return trainer


def loopback_rank_trainer(settings: Settings, rank: int, world: int, port: int
                          ) -> RankedTrainer:
    """Rank ``rank`` of ``world`` processes on this machine (``torch.multiprocessing.spawn``
    targets in tests and benchmarks): torchrun's variables set for a loopback rendezvous on
    ``port``, then the trainer ``freshrec trainer`` builds from them."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))
    ranks = ranks_from_env(settings)
    if ranks is None:
        raise ValueError(f"a world of {world} process(es) has no ranks")
    return build_ranked_trainer(settings, ranks)
