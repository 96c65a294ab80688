"""The online trainer's loop: consume a batch, dead-letter the bad, learn from the good, repeat.

Per batch (up to ``trainer_batch_max_events`` messages or ``trainer_batch_max_wait_ms``): parse
and validate every message (a bad one goes to the DLQ with the reason and its source
partition/offset in headers), predict-then-learn on the rest (progressive metrics), update the
exploration statistics, then give the publisher a chance to push a delta to Redis. Every
checkpoint interval, on partition revocation and on shutdown: a durable checkpoint holding the
state and the next offset of every partition, *then* the offsets are committed to Kafka.

Failure handling: a batch that fails before it changed any state is isolated event by event and
the culprit dead-lettered. A batch that fails after state changed (part-way through learning),
or leaves a non-finite model, is never retried on top of that state and never published: the
trainer rolls back to the last checkpoint, re-reads from its offsets, learns the suspect events
one by one, and dead-letters the one that fails (see docs/trainer.md, "Failures").

Event time is untrusted: events dated beyond wall clock + ``event_max_future_skew_s`` are
dead-lettered, and expiry follows :class:`freshrec.eventclock.EventClock`, a watermark no single
event can push, with at most ``trainer_max_expiry_fraction`` of a table expired per sweep.

One writer at a time: a step (on the stepper thread in :meth:`Trainer.run`) and its hooks
change the learner's state; the training thread reads or changes it (publishing, sweeps,
checkpoints, rollbacks) only while no step runs.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from operator import add, attrgetter, is_not
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson
import torch
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from featurestore.events import (
    AnyLabeledEvent,
    EventRejected,
    decode_labeled_events,
    parse_labeled_event,
)
from featurestore.labeled_batch import LabeledBatch
from featurestore.schema import ModelConfig
from featurestore.table import TableSet
from featurestore.wire_scan import WirePlan, scan_labeled_events
from featurestore.wire_scan import warm_up as warm_up_scanner
from freshrec.eventclock import EventClock, future_skew_reason
from freshrec.kafka import (
    DeliveryTracker,
    TruncationWatch,
    assign_from,
    commit_offsets,
    consumer_config,
    dead_letter_headers,
    producer_config,
)
from freshrec.metrics import TrainerMetrics
from freshrec.settings import Settings
from joiner.join import log_odds_correction
from trainer.checkpoint import Checkpoint, Checkpointer, load_arrays, save_arrays
from trainer.learner import OnlineLearner, StepResult
from trainer.model import (
    load_model_arrays,
    load_optimizer_arrays,
    model_arrays,
    optimizer_arrays,
)
from trainer.progressive import ProgressiveWindow

log = logging.getLogger("freshrec.trainer")
# Field readers of parsed events (C-level, for whole-batch passes).
_EVENT_ID, _LABEL, _TS, _SAMPLE_RATE = map(attrgetter, ("event_id", "label", "ts", "sample_rate"))
_MSG_ERROR, _MSG_VALUE, _MSG_TOPIC, _MSG_PARTITION, _MSG_OFFSET = (
    Message.error, Message.value, Message.topic, Message.partition, Message.offset)

MAX_DLQ_VALUE_BYTES = 256 * 1024
# Below this many rows a table is small enough that expiring it all in one sweep is no threat.
_MIN_CAPPED_ROWS = 1000


class ModelDiverged(RuntimeError):
    """The model holds non-finite predictions or weights after a step."""


class StateDamaged(RuntimeError):
    """Learning failed after it had changed state: the in-memory model cannot be trusted."""


@dataclass
class _Step:
    """A batch on its way through :meth:`Trainer.learn`: what the step needs, and what a
    failure needs to tell a clean failure from a half-applied one."""

    batch: LabeledBatch
    logit_offset: np.ndarray | None
    mutations: int  # the learner's count before the step
    clock: dict[str, Any] | None  # the event clock before the step (restored on a clean failure)
    started: float


@dataclass
class _InFlight:
    """A scanned batch whose step runs on the stepper thread (see :meth:`Trainer.run`)."""

    step: _Step
    messages: list[Message]
    outcome: Future


class BatchHook(Protocol):
    """Something that learns from each trained batch too (exploration statistics)."""

    def on_batch(self, batch: LabeledBatch, learner: OnlineLearner) -> None: ...
    def save(self, directory: Path) -> None: ...
    def load(self, directory: Path) -> None: ...


class PublishHook(Protocol):
    """The snapshot publisher, driven from the training thread between batches."""

    def maybe_publish(self, now: float | None = None) -> bool: ...
    def due(self, now: float | None = None) -> bool: ...
    def close(self) -> None: ...


class Trainer:
    """Consumes ``topic_events``, trains, dead-letters, checkpoints and commits."""

    def __init__(self, settings: Settings, config: ModelConfig,
                 metrics: TrainerMetrics | None = None,
                 hooks: list[BatchHook] | None = None,
                 learner: OnlineLearner | None = None) -> None:
        self.settings = settings
        self.config = config
        self.metrics = metrics or TrainerMetrics()
        self.learner = learner or OnlineLearner(config, seed=settings.trainer_seed,
                                                micro_batch=settings.trainer_micro_batch)
        self._wire_plan = WirePlan.of(config)
        # The pipelined loop's stepper thread and the batch on it (see run()).
        self._stepper: ThreadPoolExecutor | None = None
        self._in_flight: _InFlight | None = None
        self.window = ProgressiveWindow(settings.trainer_progressive_window)
        self.hooks: list[BatchHook] = list(hooks or [])
        self.publisher: PublishHook | None = None
        self.checkpointer = Checkpointer(settings.trainer_checkpoint_dir)
        # (topic, partition) -> next offset to consume; what checkpoints store and commit.
        self.offsets: dict[tuple[str, int], int] = {}
        self.trained = 0
        self.dead_lettered = 0
        self.max_event_ts = 0.0
        self.clock = EventClock()
        # Event ids of a batch that failed after changing state (learned one by one on replay)
        # and the single events found to break training (dead-lettered on replay), with why.
        self._suspects: set[str] = set()
        self._culprits: dict[str, str] = {}
        for hook in self.hooks:
            if hasattr(hook, "clock"):
                hook.clock = self.clock
        self._restored_offsets: dict[tuple[str, int], int] = {}
        self._dlq_tracker = DeliveryTracker()
        self._dlq = Producer(producer_config(settings.kafka_bootstrap))
        self._consumer = Consumer(consumer_config(
            settings.kafka_bootstrap, settings.trainer_group_id,
            # Eager assignment: on_assign receives the full assignment, which we seek to the
            # checkpoint's offsets before any message is fetched.
            **{"partition.assignment.strategy": "range"}))
        self._last_checkpoint = time.monotonic()
        self._last_sweep = time.monotonic()
        self._last_gauges = 0.0
        self._truncations = TruncationWatch()
        self._audit = None
        if settings.trainer_audit_log is not None:
            settings.trainer_audit_log.parent.mkdir(parents=True, exist_ok=True)
            self._audit = open(settings.trainer_audit_log, "ab")  # noqa: SIM115

    # --- state ---------------------------------------------------------------------------

    @property
    def tables(self) -> TableSet:
        return self.learner.tables

    def restore(self) -> bool:
        """Load the latest checkpoint (state + offsets); False if there is none."""
        ckpt = self.checkpointer.latest()
        if ckpt is None:
            return False
        self._load_checkpoint(ckpt)
        return True

    def _load_checkpoint(self, ckpt: Checkpoint) -> None:
        """State, offsets, clock and counters from ``ckpt``."""
        if ckpt.manifest.get("schema_hash") != self.config.schema_hash:
            raise RuntimeError(f"{ckpt.path}: written for another model config "
                               f"({ckpt.manifest.get('schema_hash')} != {self.config.schema_hash})")
        self.learner.tables = TableSet.load(ckpt.path / "tables", self.config)
        load_model_arrays(self.learner.model, load_arrays(ckpt.path / "dense"))
        load_optimizer_arrays(self.learner.optimizer, load_arrays(ckpt.path / "optimizer"),
                              orjson.loads((ckpt.path / "optimizer" / "param_groups.json")
                                           .read_bytes()))
        for i, hook in enumerate(self.hooks):
            hook.load(ckpt.path / f"hook-{i}")
            if hasattr(hook, "clock"):
                hook.clock = self.clock
        self.offsets = {(t, p): o for t, parts in ckpt.offsets.items() for p, o in parts.items()}
        self._restored_offsets = dict(self.offsets)
        self._restore_clock(ckpt.manifest)
        self.trained = int(ckpt.manifest.get("trained", 0))
        self.dead_lettered = int(ckpt.manifest.get("dead_lettered", 0))
        log.info("restored %s (offsets %s)", ckpt.path.name, self.offsets)

    def _restore_clock(self, manifest: dict[str, Any]) -> None:
        """The event clock of a checkpoint, capped at wall clock + skew.

        A checkpoint written before events were skew-checked would otherwise carry a 2096 clock
        into every restart, and every row would expire at the first sweep.
        """
        saved = manifest.get("event_clock")
        # Older checkpoints kept only the newest event time, which one event could set: it is
        # not trusted as a clock. The clock starts empty and the next events set it (no sweep
        # expires anything before that).
        self.clock = EventClock.from_state(saved) if isinstance(saved, dict) else EventClock()
        upper = time.time() + self.settings.event_max_future_skew_s
        self.clock.clamp(upper)
        self.max_event_ts = min(float(manifest.get("max_event_ts", 0.0)), upper)
        for hook in self.hooks:
            if hasattr(hook, "clock"):
                hook.clock = self.clock

    def checkpoint(self) -> None:
        """Durable checkpoint of everything, then commit its offsets to Kafka."""
        started = time.perf_counter()
        self._save_checkpoint({})
        self._commit_checkpointed(started)

    def _save_checkpoint(self, manifest: dict[str, Any]) -> Checkpoint:
        """The durable checkpoint (``manifest`` adds fields to its manifest); no commit."""
        # Dead letters must be durable before the offsets that skip their sources are:
        # flush() returns how many are still undelivered (timeout), which is a failure too.
        undelivered = self._dlq.flush(30)
        if undelivered or self._dlq_tracker.failed:
            raise RuntimeError(f"dead-letter delivery failed ({undelivered} undelivered): "
                               f"{self._dlq_tracker.errors[:3]}")
        learner = self.learner
        opt_arrays, opt_meta = optimizer_arrays(learner.optimizer)
        writers: dict[str, Callable[[Path], None]] = {
            "tables": learner.tables.save,
            "dense": lambda d: save_arrays(d, model_arrays(learner.model)),
            "optimizer": lambda d: (save_arrays(d, opt_arrays),
                                    (d / "param_groups.json").write_bytes(orjson.dumps(opt_meta))),
        }
        for i, hook in enumerate(self.hooks):
            writers[f"hook-{i}"] = hook.save
        offsets: dict[str, dict[str, int]] = {}
        for (topic, partition), offset in self.offsets.items():
            offsets.setdefault(topic, {})[str(partition)] = offset
        saved = self.checkpointer.save(writers, {
            **manifest, "offsets": offsets, "schema_hash": self.config.schema_hash,
            "max_event_ts": self.max_event_ts, "trained": self.trained,
            "dead_lettered": self.dead_lettered,
            "event_clock": self.clock.state(),
        })
        self._suspects.clear()  # replays now start past them
        return saved

    def _commit_checkpointed(self, started: float) -> None:
        """Commit the offsets of the checkpoint just saved (started at ``started``)."""
        commit_offsets(self._consumer, self.offsets)
        self._last_checkpoint = time.monotonic()
        self.metrics.last_checkpoint.set(time.time())
        self.metrics.checkpoint_seconds.observe(time.perf_counter() - started)

    # --- Kafka ---------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._settle()  # the batch in flight belongs to the positions being assigned from
        assign_from(consumer, partitions, self.offsets)
        log.info("assigned %s", [(tp.topic, tp.partition, tp.offset) for tp in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._settle()  # learn (and checkpoint) the batch in flight before giving it up
        if self.offsets:
            self.checkpoint()
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        self.offsets = {k: v for k, v in self.offsets.items() if k not in revoked}
        consumer.unassign()

    def _dead_letter(self, msg: Message, reason: str) -> None:
        value = msg.value() or b""
        headers = dead_letter_headers(reason, msg.topic(), msg.partition(), msg.offset())
        if len(value) > MAX_DLQ_VALUE_BYTES:  # keep the DLQ producible; the reason says why
            headers.append(("truncated_from_bytes", str(len(value)).encode()))
            value = value[:MAX_DLQ_VALUE_BYTES]
        while True:
            try:
                self._dlq.produce(self.settings.topic_dlq, value=value, key=msg.key(),
                                  headers=headers, on_delivery=self._dlq_tracker)
                break
            except BufferError:
                self._dlq.poll(0.05)
        self.dead_lettered += 1
        self.metrics.events.labels("dead_lettered").inc()

    # --- the loop ------------------------------------------------------------------------

    def process(self, messages: list[Message]) -> int:
        """Parse, dead-letter, learn; returns the number of events trained."""
        # One wall-clock reading per batch: a consumed batch spans milliseconds against a
        # skew of minutes. The reason is worded by future_skew_reason for the events past it.
        wall = time.time()
        batch = self._scan_clean(messages, wall)
        sources = messages
        if batch is not None:
            self._advance_offsets(messages)
        else:
            parsed = self._parse_clean(messages, wall)
            if parsed is None:
                events, sources = self._parse_each(messages, wall)
            else:
                events = parsed
            batch = LabeledBatch.of_events(events, self.learner.featurizer) if events else None
        try:
            trained = self._learn_or_isolate(batch, sources) if batch is not None else 0
        except StateDamaged as exc:
            self._rollback("diverged" if isinstance(exc.__cause__, ModelDiverged) else "failed")
            return 0
        self._dlq.poll(0)
        return trained

    def _clean_batch(self, messages: list[Message]) -> bool:
        """No consumer error in the batch and no culprit of an earlier failure pending."""
        return not (self._culprits
                    or any(map(is_not, map(_MSG_ERROR, messages), repeat(None))))

    def _advance_offsets(self, messages: list[Message]) -> None:
        """Messages of one partition arrive in offset order: the last one's offset wins."""
        partitions = zip(map(_MSG_TOPIC, messages), map(_MSG_PARTITION, messages), strict=True)
        self.offsets.update(zip(partitions, map(add, map(_MSG_OFFSET, messages), repeat(1)),
                                strict=True))

    def _scan_clean(self, messages: list[Message], wall: float) -> LabeledBatch | None:
        """A clean batch read by the compiled wire scanner (columns straight from the message
        bytes, no object per event); else ``None``. Changes nothing: the caller advances the
        offsets (:meth:`_advance_offsets`) when it learns the batch."""
        if not self._clean_batch(messages):
            return None
        batch = scan_labeled_events(list(map(_MSG_VALUE, messages)), self._wire_plan)
        if batch is None or (len(batch) and float(batch.ts.max())
                             > wall + self.settings.event_max_future_skew_s):
            return None
        return batch

    def _parse_clean(self, messages: list[Message], wall: float
                     ) -> list[AnyLabeledEvent] | None:
        """A batch with nothing to dead-letter, parsed in C-level passes; else ``None``.

        The batch the wire scanner leaves (a value outside its subset) and that still has no
        consumer errors, every message valid, none dated past the skew, no culprit of an
        earlier failure pending, needs none of :meth:`_parse_each`'s per-message Python: the
        values decode in one pass and the next offset of every partition is the last
        message's + 1. Anything else returns ``None`` having changed nothing, and
        :meth:`_parse_each` takes the batch message by message (reasons, dead letters).
        """
        if not self._clean_batch(messages):
            return None
        try:
            events = decode_labeled_events(map(_MSG_VALUE, messages))
        except Exception:  # a bad message somewhere: the slow path names it
            return None
        if events and max(map(_TS, events)) > wall + self.settings.event_max_future_skew_s:
            return None
        self._advance_offsets(messages)
        return events

    def _parse_each(self, messages: list[Message], wall: float
                    ) -> tuple[list[AnyLabeledEvent], list[Message]]:
        """Parse message by message, dead-lettering the bad; the good events and sources."""
        events: list[AnyLabeledEvent] = []
        sources: list[Message] = []
        offsets = self.offsets
        skew = self.settings.event_max_future_skew_s
        latest = wall + skew
        culprits = self._culprits
        parse, append, source = parse_labeled_event, events.append, sources.append
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", err)
                continue
            offsets[(msg.topic(), msg.partition())] = msg.offset() + 1
            try:
                event = parse(msg.value() or b"")
            except EventRejected as exc:
                self._dead_letter(msg, exc.reason)
                continue
            if event.ts > latest or culprits:
                reason = (future_skew_reason(event.ts, skew, wall)
                          or culprits.pop(event.event_id, None))
                if reason is not None:
                    self._dead_letter(msg, reason)
                    continue
            append(event)
            source(msg)
        return events, sources

    def _learn_or_isolate(self, batch: LabeledBatch, sources: list[Message],
                          in_flight: _InFlight | None = None) -> int:
        """Learn the batch; if it fails cleanly, learn event by event and dead-letter culprits.

        A valid-looking event that still breaks training (a bug, a pathological value) must not
        crash-loop the trainer on replay: it goes to the DLQ with the exception, the rest of
        the batch is trained. That retry is only sound when the failed attempt changed nothing;
        otherwise :class:`StateDamaged` propagates and the caller rolls back, so no event is
        ever learned twice into the same state. A batch holding suspects of an earlier such
        failure is learned one event at a time, which pins the culprit down. ``in_flight``: the
        batch's step already ran on the stepper thread; this judges its outcome.
        """
        if in_flight is not None or not (
                self._suspects and not self._suspects.isdisjoint(map(_EVENT_ID, batch.events))):
            try:
                if in_flight is None:
                    self.learn(batch)
                else:
                    self._finish(in_flight.step, in_flight.outcome.result())
                return len(batch)
            except StateDamaged:
                self._suspects.update(e.event_id for e in batch.events)
                raise
            except Exception:
                log.exception("batch of %d failed; retrying event by event", len(batch))
        trained = 0
        for event, msg in zip(batch.events, sources, strict=True):
            try:
                self.learn([event])
                trained += 1
            except StateDamaged as exc:
                self._culprits[event.event_id] = _training_reason(exc.__cause__ or exc)
                raise
            except Exception as exc:
                self._dead_letter(msg, _training_reason(exc))
            self._suspects.discard(event.event_id)
        return trained

    def _rollback(self, reason: str) -> None:
        """Fall back to the last checkpoint and re-read from its offsets.

        The in-memory model is not trusted (it diverged, or a batch failed half-applied). The
        publisher sees new table objects and republishes in full; what it published since the
        checkpoint was finite and is simply overwritten.
        """
        self.metrics.rollbacks.labels(reason).inc()
        log.error("rolling back to the last checkpoint (%s); suspects %d, culprits %d",
                  reason, len(self._suspects), len(self._culprits))
        if not self.restore():
            raise RuntimeError("no checkpoint to roll back to") from None
        for tp in self._consumer.assignment():
            offset = self.offsets.get((tp.topic, tp.partition), OFFSET_BEGINNING)
            target = TopicPartition(tp.topic, tp.partition, offset)
            for _ in range(100):
                try:
                    self._consumer.seek(target)
                    break
                except KafkaException:  # not fetching yet: wait for the fetcher to start
                    self._consumer.poll(0.05)

    def _check_finite(self, probs: np.ndarray) -> None:
        """Raise :class:`ModelDiverged` if the step left non-finite predictions or weights.

        The dense weights are small enough to check whole after every batch; embedding rows
        are checked where this batch touched them (no other rows changed).
        """
        if not np.isfinite(probs).all():
            raise ModelDiverged("non-finite prediction")
        for name, param in self.learner.model.named_parameters():
            if not bool(torch.isfinite(param).all()):
                raise ModelDiverged(f"non-finite dense weight {name}")

    def learn(self, batch: LabeledBatch | list[AnyLabeledEvent]) -> None:
        """Predict-then-learn on validated events (or a batch of them); update hooks and metrics.

        Raises :class:`StateDamaged` when learning failed after it had changed state (or left
        a non-finite model); any other exception means nothing changed.
        """
        step = self._begin(batch)
        self._finish(step, self._attempt(step))

    def _begin(self, batch: LabeledBatch | list[AnyLabeledEvent]) -> _Step:
        started = time.perf_counter()
        if not isinstance(batch, LabeledBatch):
            batch = LabeledBatch.of_events(batch, self.learner.featurizer)
        offsets = None
        if batch.sample_rates is not None:
            # Negatives kept at rate r: learn on logit - log r so the served logit stays
            # calibrated (the joiner's log-odds correction, applied at train time).
            offsets = np.array([-log_odds_correction(r) for r in batch.sample_rates.tolist()])
        return _Step(batch, offsets, self.learner.mutations,
                     self.clock.state() if self.hooks else None, started)

    def _attempt(self, step: _Step) -> StepResult | Exception:
        """The learner's step, then the hooks and the finite check (on the stepper thread when
        pipelined, so before the next step starts): its result, or what it raised, for
        :meth:`_finish` to judge on the training thread. After a result, what is left to
        :meth:`_finish` is bookkeeping that reads no learner state, which is what lets
        :meth:`run` start the next step first."""
        try:
            self.clock.observe(step.batch.ts)
            result = self.learner.step_batch(step.batch.sparse, step.batch.labels,
                                             step.batch.ts, logit_offset=step.logit_offset)
            for hook in self.hooks:
                hook.on_batch(step.batch, self.learner)
            self._check_finite(result.probs)
            return result
        except Exception as exc:
            return exc

    def _finish(self, step: _Step, outcome: StepResult | Exception) -> None:
        """Judge a step's outcome, then book it; raises as :meth:`learn` documents.

        Booking a step that succeeded (progressive window, counters, audit log) cannot be
        retried event by event — the events are learned — so its failure is
        :class:`StateDamaged`: the caller rolls back and learns them again, once.
        """
        batch = step.batch
        if isinstance(outcome, Exception):
            if self.learner.mutations != step.mutations or isinstance(outcome, ModelDiverged):
                raise StateDamaged(f"{type(outcome).__name__}: {outcome}") from outcome
            if step.clock is not None:
                self.clock = EventClock.from_state(step.clock)
                for hook in self.hooks:
                    if hasattr(hook, "clock"):
                        hook.clock = self.clock
            raise outcome
        step_seconds = time.perf_counter() - step.started
        try:
            self.window.add(batch.labels, outcome.probs)
            self.trained += len(batch)
            self.max_event_ts = max(self.max_event_ts, float(batch.ts.max()))
            self.metrics.events.labels("trained").inc(len(batch))
            self.metrics.batches.inc()
            self.metrics.step_seconds.observe(step_seconds)
            self.metrics.event_time.set(self.max_event_ts)
            if self._audit is not None:
                self._audit.write(b"".join(e.event_id.encode() + b"\n" for e in batch.events))
                self._audit.flush()
        except Exception as exc:
            raise StateDamaged(f"booking a learned batch: {type(exc).__name__}: {exc}") from exc

    def sweep(self, now: float | None = None) -> dict[str, np.ndarray]:
        """Expire rows by the event clock (or ``now``, a watermark shared by trainer ranks), at
        most ``trainer_max_expiry_fraction`` per table.

        When more would expire, only the oldest share goes (the expiry time is lowered to the
        matching last-seen quantile) and ``expiry_capped_total`` counts it: a genuine catch-up
        (a long outage) completes over a few sweeps, a pushed clock raises an alert before the
        table is gone. Items whose rows expired lose their exploration statistics too.
        """
        now = self.clock.now if now is None else now
        if not math.isfinite(now):
            return {}
        self.metrics.event_clock.set(now)
        evicted: dict[str, np.ndarray] = {}
        frac = self.settings.trainer_max_expiry_fraction
        for name, table in self.tables.items():
            ttl = table.config.ttl_seconds
            seen = table.last_seen_times()
            limit = max(int(frac * len(seen)), _MIN_CAPPED_ROWS)
            at = now
            if int((seen < now - ttl).sum()) > limit:
                at = float(np.partition(seen, limit)[limit]) + ttl  # expires `limit` rows
                self.metrics.expiry_capped.labels(name).inc()
                log.warning("%s: sweep at event time %.0f would expire more than %.0f%% of "
                            "%d rows; expiring the oldest %d", name, now, frac * 100,
                            len(seen), limit)
            gone = table.sweep_expired(at)
            if len(gone):
                evicted[name] = gone
        if evicted:
            item_slot = self.config.item_slot.name
            for hook in self.hooks:
                if hasattr(hook, "on_expired"):
                    hook.on_expired(evicted, item_slot)
        return evicted

    def _update_gauges(self) -> None:
        scores = self.window.scores()
        if not math.isnan(scores.auc):
            self.metrics.auc.set(scores.auc)
        if not math.isnan(scores.logloss):
            self.metrics.logloss.set(scores.logloss)
        if not math.isnan(scores.calibration):
            self.metrics.calibration.set(scores.calibration)
        for slot, st in self.tables.stats().items():
            self.metrics.table_rows.labels(slot).set(st.rows)
            self.metrics.table_bytes.labels(slot).set(st.bytes)
            self.metrics.table_totals(slot, st.admitted_total, st.evicted_total,
                                      st.rejected_total)
        try:
            for tp in self._consumer.assignment():
                _low, high = self._consumer.get_watermark_offsets(tp, cached=True)
                nxt = self.offsets.get((tp.topic, tp.partition))
                if high >= 0 and nxt is not None:
                    self.metrics.lag.labels(str(tp.partition)).set(max(0, high - nxt))
        except Exception as exc:
            log.debug("lag unavailable: %s", exc)

    def _rewind_truncated(self) -> None:
        """Resume from the start of a partition whose log restarted below our position.

        The events in the lost log are gone with it; waiting at the old position would also
        skip every event produced since. The rewound offsets are checkpointed at once, so a
        restart does not park at the old position again.
        """
        rewound = self._truncations.rewind(self._consumer, self.offsets)
        if rewound:
            self.metrics.log_truncations.inc(len(rewound))
            self._last_checkpoint = 0.0

    def housekeeping_due(self, now: float) -> bool:
        """Whether :meth:`housekeeping` at ``now`` would do more than look at the clock."""
        s = self.settings
        return ((self.publisher is not None and self.publisher.due(now))
                or now - self._last_sweep >= s.trainer_sweep_interval_s
                or now - self._last_gauges >= 1.0
                or (bool(self.offsets)
                    and now - self._last_checkpoint >= s.trainer_checkpoint_interval_s))

    def housekeeping(self, force_checkpoint: bool = False) -> None:
        """Publish, sweep expired rows, refresh gauges, checkpoint when due."""
        now = time.monotonic()
        if self.publisher is not None:
            self.publisher.maybe_publish()
        if now - self._last_sweep >= self.settings.trainer_sweep_interval_s:
            self.sweep()
            self._last_sweep = now
        if now - self._last_gauges >= 1.0:
            self._update_gauges()
            self._rewind_truncated()
            self._last_gauges = now
        if force_checkpoint or (
                now - self._last_checkpoint >= self.settings.trainer_checkpoint_interval_s
                and self.offsets):
            self.checkpoint()

    def run(self, stop: threading.Event | None = None, max_events: int | None = None) -> None:
        """Consume until ``stop`` is set (or ``max_events`` trained); checkpoint on the way out.

        Pipelined: a clean batch's learning step (with the hooks and the finite check) runs on
        a stepper thread while this thread consumes and scans the next batch (the step's numba
        kernels and torch ops release the GIL). Everything else — judging the step, dead
        letters, housekeeping, Kafka — stays on this thread, and only after the previous step
        has settled (:meth:`_settle`), so every batch is learned, checked and checkpointed in
        order exactly as the synchronous :meth:`process` would. When the previous step
        succeeded and no housekeeping is due, the next step starts as soon as it ends, and its
        bookkeeping (offsets, progressive window, counters) runs beside the next step: it reads
        no learner state, so the stepper does not wait for it.
        """
        stop = stop or threading.Event()
        self._consumer.subscribe([self.settings.topic_events], on_assign=self._on_assign,
                                 on_revoke=self._on_revoke)
        self.ensure_checkpoint()
        self.learner.warm_up()
        warm_up_scanner(self._wire_plan)
        for hook in self.hooks:
            if hasattr(hook, "warm_up"):
                hook.warm_up()
        wait = self.settings.trainer_batch_max_wait_ms / 1000.0
        size = self.settings.trainer_batch_max_events
        self._stepper = ThreadPoolExecutor(1, thread_name_prefix="freshrec-step")
        try:
            while not stop.is_set():
                self.metrics.heartbeat.beat()
                started = time.perf_counter()
                messages = self._consumer.consume(num_messages=size, timeout=wait)
                batch = (self._scan_clean(messages, time.time())
                         if messages and not self._suspects else None)
                if batch is not None and not self.housekeeping_due(time.monotonic()):
                    rolled_back = self._settle(then=lambda b=batch, m=messages:
                                               self._submit(b, m))
                else:
                    rolled_back = self._settle()
                    self.housekeeping()
                    if messages and not rolled_back:  # after a rollback the consumer re-reads
                        if batch is not None:
                            self._submit(batch, messages)
                        else:
                            self.process(messages)
                if messages and not rolled_back:
                    self.metrics.batch_seconds.observe(time.perf_counter() - started)
                if max_events is not None and self.trained + self.dead_lettered >= max_events:
                    break
        finally:
            try:
                self._settle()
            finally:
                self._stepper.shutdown()
                self._stepper = None
                self.close()

    def _submit(self, batch: LabeledBatch, messages: list[Message]) -> None:
        """Start learning ``batch`` (read from ``messages``) on the stepper thread."""
        step = self._begin(batch)
        self._in_flight = _InFlight(step, messages, self._stepper.submit(self._attempt, step))

    def _settle(self, then: Callable[[], None] | None = None) -> bool:
        """Wait for the batch on the stepper thread, then judge and book it as :meth:`process`
        does (isolating culprits, or rolling back a half-applied step). True if it rolled back.

        ``then`` (start the next step) runs once the stepper is free: at once after a step that
        succeeded, whose booking (offsets, progressive window, counters) then runs beside the
        next step; after the judgement otherwise, and not at all after a rollback.
        """
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            if then is not None:
                then()
            return False
        in_flight.outcome.exception()  # wait; the outcome itself is judged below
        outcome = in_flight.outcome.result()
        if then is not None and not isinstance(outcome, Exception):
            then()
            self._advance_offsets(in_flight.messages)
            try:
                self._finish(in_flight.step, outcome)
            except StateDamaged:
                # Booking failed with the next step already applied: both go back to the last
                # checkpoint and are learned again, once.
                log.exception("booking a learned batch failed")
                self._drop_in_flight()
                self._rollback("failed")
                return True
            self._dlq.poll(0)
            return False
        self._advance_offsets(in_flight.messages)
        try:
            self._learn_or_isolate(in_flight.step.batch, in_flight.messages, in_flight)
        except StateDamaged as exc:
            self._rollback("diverged" if isinstance(exc.__cause__, ModelDiverged) else "failed")
            return True
        self._dlq.poll(0)
        if then is not None:
            then()
        return False

    def _drop_in_flight(self) -> None:
        """Wait for a step started before its predecessor's booking failed, and forget it: the
        rollback replaces its state and the consumer re-reads its messages."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.outcome.exception()

    def close(self) -> None:
        """Final checkpoint and commit, then release Kafka and the publisher."""
        self._settle()
        try:
            if self.offsets:
                self.checkpoint()
        finally:
            self._release()

    def _release(self) -> None:
        """Release Kafka, the publisher and the audit log (no checkpoint)."""
        if self.publisher is not None:
            self.publisher.close()
        self._consumer.close()
        self._dlq.flush(10)
        if self._audit is not None:
            self._audit.close()

    def ensure_checkpoint(self) -> None:
        """Write a first checkpoint of the initial state, so a rollback always has a target."""
        if self.checkpointer.latest() is None:
            self.checkpoint()

    def stats(self) -> dict[str, Any]:
        """Counters for logs and the CLI summary."""
        s = self.window.scores()
        return {"trained": self.trained, "dead_lettered": self.dead_lettered,
                "auc": s.auc, "logloss": s.logloss, "calibration": s.calibration}


def _training_reason(exc: BaseException) -> str:
    return f"<training>: {type(exc).__name__}: {exc}"[:500]
