"""``freshrec joiner``: impressions + clicks from Kafka -> labeled examples on ``freshrec.events``.

A process of its own rather than a stage inside the trainer: the trainer's loop is CPU-bound on
one core (torch step + table updates), the join is dict work on another, and the events topic
between them is the durable hand-off both sides already checkpoint against. See docs/joiner.md.

Time: event times are untrusted (see freshrec/eventclock.py). An impression or click dated beyond
wall clock + ``event_max_future_skew_s`` is dead-lettered, and each stream's clock is a
:class:`~freshrec.eventclock.PartitionedClock` (per partition the median of its recent event
times, monotone; the stream's clock is the slowest partition's) rather than its newest event
time, so one skewed event cannot close every window at once, and a partition read ahead of
another (backlog after a restart) does not release clicks before their impressions are read.
The two topics are consumed independently, so a click can be read before its impression.
Such a click waits (saved with the state in checkpoints) until the impressions stream passes its
time. Windows close on the watermark: the older of the two streams' clocks, minus
``joiner_lateness_s``. A click partition is waited for while its clock moves; one whose clock
has not moved for ``joiner_click_idle_s`` (read to its end, or silent) counts as one window
behind the impressions, so windows still close when clicks stop. When input stops for a whole
window while partitions are assigned, the watermark moves on with wall time, so the last
impressions' windows still close; waiting for a partition assignment is not quiet input.

Flow control: catching up a backlog, the consumer reads the two topics at different speeds.
An impression partition whose clock runs more than a window ahead of the click partitions that
are still moving is paused until they come within half a window (Kafka Streams aligns its
inputs' stream times the same way); the click stream's own progress, not the broker's high
watermark, tells a lagging click stream from a finished one.

Delivery: examples and dead letters are flushed before a checkpoint stores the joiner state and
the consumed offsets, and only then are offsets committed — a crash re-reads input that the
restored state has not seen, and the joiner's duplicate detection absorbs the overlap.
"""

from __future__ import annotations

import heapq
import logging
import math
import signal
import threading
import time
from pathlib import Path

import orjson
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from featurestore.events import (
    AnyClick,
    EventRejected,
    parse_click,
    parse_impression,
)
from freshrec.eventclock import PartitionedClock, future_skew_reason
from freshrec.health import serve_metrics_and_health
from freshrec.kafka import (
    DeliveryTracker,
    TruncationWatch,
    assign_from,
    commit_offsets,
    consumer_config,
    create_topics,
    producer_config,
    records,
)
from freshrec.metrics import JoinerMetrics, report_thread_pools
from freshrec.runtime import apply_thread_budget, cpu_budget, tune_gc
from freshrec.settings import Settings
from joiner.join import ClickOutcome, Joiner, Label
from trainer.checkpoint import Checkpointer

log = logging.getLogger("freshrec.joiner")
# Each partition's clock: the median of its last 256 event times. Smaller than the trainer's window
# because the joiner's lag (about 128 events) delays negatives, and 128 coordinated events are
# still far beyond one bad client timestamp.
CLOCK_WINDOW = 256
# Clicks waiting for the impressions stream (a bound on memory; beyond it the oldest is joined
# at once, which at worst makes it an orphan in the DLQ).
MAX_EARLY_CLICKS = 100_000


def _clock_from(saved: object, upper: float) -> PartitionedClock:
    """A stream clock from a checkpoint, capped at ``upper``.

    An older checkpoint's bare newest time is not trusted (one event could have set it): the
    clock starts empty, and idle time or the next events move it.
    """
    clock = PartitionedClock.from_state(saved, window=CLOCK_WINDOW)
    clock.clamp(upper)
    return clock


class JoinerProcess:
    """The Kafka side of :class:`joiner.join.Joiner`."""

    def __init__(self, settings: Settings, metrics: JoinerMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or JoinerMetrics()
        self.joiner = Joiner(settings.joiner_window_s, settings.joiner_negative_sample_rate,
                             settings.joiner_max_pending)
        self.checkpointer = Checkpointer(settings.joiner_checkpoint_dir)
        self.offsets: dict[tuple[str, int], int] = {}
        self.emitted = 0
        self._imp_clock = PartitionedClock(CLOCK_WINDOW)
        self._click_clock = PartitionedClock(CLOCK_WINDOW)
        self.max_early_clicks = MAX_EARLY_CLICKS
        # Clicks read before the impressions stream reached their time: (ts, seq, raw message,
        # key, source, the parsed click or None after a restore).
        self._early: list[tuple[float, int, bytes, bytes | None, str, int, int,
                                AnyClick | None]] = []
        self._early_seq = 0
        # Monotonic time, injectable: idleness is measured in it. Wall time, injectable: the
        # future-skew check (and its dead-letter reason) compares event times with it.
        self._monotonic = time.monotonic
        self._wall = time.time
        self._last_input = self._monotonic()
        self._idle_advance = 0.0
        self._assigned = False
        # Per click partition: when its clock last moved (or it was assigned), and its clock then.
        self._click_moved: dict[int, float] = {}
        self._click_seen: dict[int, float] = {}
        # Impression partitions paused because they ran ahead of the clicks (flow control).
        self._paused: set[int] = set()
        self._imp_partitions: set[int] = set()
        self._expecting_since: float | None = None
        # Metric increments of the current batch, added once per batch: a prometheus_client
        # increment takes a lock (~1.5 us), more than the join of one shown item.
        self._click_outcomes: dict[str, int] = {}
        self._examples_by_label = [0, 0]
        # Labels of the current batch or tick, produced together by _send_labels.
        self._outbox: list[Label] = []
        self._tracker = DeliveryTracker()
        # Delivery reports for failures only: one callback per label cost more than building
        # it, and the checkpoint's flush + failure count is what guards delivery.
        config = producer_config(
            settings.kafka_bootstrap, **{"linger.ms": 2, "delivery.report.only.error": True})
        self._queue_max = int(config["queue.buffering.max.messages"])  # type: ignore[call-overload]
        self._producer = Producer(config)
        self._consumer = Consumer(consumer_config(
            settings.kafka_bootstrap, settings.joiner_group_id,
            **{"partition.assignment.strategy": "range"}))
        self._last_checkpoint = time.monotonic()
        self._truncations = TruncationWatch()
        self._last_truncation_check = 0.0
        self._restore()
        # Exported so far (a restored joiner's counts were exported by its predecessor).
        self._exploration_seen = self.joiner.exploration_counts()

    def _restore(self) -> None:
        ckpt = self.checkpointer.latest()
        if ckpt is None:
            return
        s = self.settings
        self.joiner = Joiner.restore((ckpt.path / "joiner" / "state.json").read_bytes(),
                                     window_s=s.joiner_window_s,
                                     negative_sample_rate=s.joiner_negative_sample_rate,
                                     max_pending=s.joiner_max_pending)
        self.offsets = {(t, p): o for t, parts in ckpt.offsets.items() for p, o in parts.items()}
        clocks = ckpt.manifest.get("clocks", {})
        upper = self._wall() + s.event_max_future_skew_s
        self._imp_clock = _clock_from(clocks.get("impressions"), upper)
        self._click_clock = _clock_from(clocks.get("clicks"), upper)
        early = orjson.loads((ckpt.path / "joiner" / "early_clicks.json").read_bytes())
        for ts, raw, key, topic, partition, offset in early:
            self._defer(ts, raw.encode(), key.encode() if key else None, topic, partition, offset,
                        None)
        log.info("restored %s", ckpt.path.name)

    def checkpoint(self) -> None:
        """Flush outputs, store state + offsets durably, then commit the offsets."""
        self._send_labels()
        if self._producer.flush(30) or self._tracker.failed:
            raise RuntimeError(f"joiner output delivery failed: {self._tracker.errors[:3]}")
        state = self.joiner.state()
        early = orjson.dumps([(ts, raw.decode(), key.decode() if key else None, t, p, o)
                              for ts, _seq, raw, key, t, p, o, _click in self._early])

        def write(directory: Path) -> None:
            directory.mkdir(parents=True)
            (directory / "state.json").write_bytes(state)
            (directory / "early_clicks.json").write_bytes(early)

        offsets: dict[str, dict[str, int]] = {}
        for (topic, partition), offset in self.offsets.items():
            offsets.setdefault(topic, {})[str(partition)] = offset
        clocks = {"impressions": self._imp_clock.state(), "clicks": self._click_clock.state()}
        self.checkpointer.save({"joiner": write}, {"offsets": offsets, "clocks": clocks})
        commit_offsets(self._consumer, self.offsets)
        self._last_checkpoint = time.monotonic()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        assign_from(consumer, partitions, self.offsets)
        # Idle time only counts once we can read: waiting for a group join is not quiet input.
        now = self._monotonic()
        self._last_input = now
        self._idle_advance = 0.0
        self._assigned = True
        # A new assignment is unpaused. Every assigned click partition is waited for until its
        # clock has stood still for joiner_click_idle_s: a backlog's clicks are not read yet.
        s = self.settings
        self._paused.clear()
        self._imp_partitions = {tp.partition for tp in partitions
                                if tp.topic == s.topic_impressions}
        self._click_moved = {tp.partition: now for tp in partitions
                             if tp.topic == s.topic_clicks}
        # Until they deliver (or stay silent for joiner_click_idle_s), the assigned partitions
        # hold both clocks back: a partition read first must not release clicks, or close
        # windows, ahead of another whose backlog is not read yet.
        self._imp_clock.expect(sorted(self._imp_partitions))
        self._click_clock.expect(sorted(self._click_moved))
        self._expecting_since = now

    def _produce(self, topic: str, value: bytes, key: bytes | None,
                 headers: list[tuple[str, bytes]] | None = None) -> None:
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, headers=headers,
                                       on_delivery=self._tracker)
                return
            except BufferError:
                self._producer.poll(0.05)

    def _emit(self, labels: list[Label], label: int) -> None:
        """Queue ``labels`` (all with ``label``) for the next :meth:`_send_labels`."""
        self._outbox += labels
        self._examples_by_label[label] += len(labels)
        self.emitted += len(labels)

    def _send_labels(self) -> None:
        """Hand the queued labels to the producer in one call.

        One ``produce_batch`` instead of a ``produce`` per label: per call, librdkafka locks
        the partition queue and may wake its broker thread, and on a busy machine that, not
        the copy, was most of the measured ~10 us per label.
        """
        if self._outbox:
            labels, self._outbox = self._outbox, []
            self._produce_batch(self.settings.topic_events, labels)

    def _produce_batch(self, topic: str, labels: list[Label]) -> None:
        """Produce ``(key, value)`` pairs in order, waiting for room in the producer's queue.

        The batch is cut to the room left in the queue's message count, so it does not
        overflow it and the order of the labels (per key, the order the trainer learns them in)
        is kept. Refused for want of room anyway (the queue's byte bound), the rest is retried
        after a poll; refused for any other reason, it fails as one ``produce`` would: raising.
        """
        producer = self._producer
        pending = [{"key": k, "value": v} for k, v in labels]
        while pending:
            room = self._queue_max - len(producer)
            if room <= 0:
                producer.poll(0.05)
                continue
            chunk, pending = pending[:room], pending[room:]
            if producer.produce_batch(topic, chunk, on_delivery=self._tracker) == len(chunk):
                continue
            refused = [m for m in chunk if "_error" in m]
            for m in refused:
                if m["_error"].code() != KafkaError._QUEUE_FULL:
                    raise KafkaException(m["_error"])
                del m["_error"]
            producer.poll(0.05)
            pending = refused + pending

    def _count_click(self, outcome: str) -> None:
        self._click_outcomes[outcome] = self._click_outcomes.get(outcome, 0) + 1

    def _flush_counts(self) -> None:
        """Add the batch's click outcomes and examples to their counters."""
        for outcome, n in self._click_outcomes.items():
            self.metrics.clicks.labels(outcome).inc(n)
        self._click_outcomes.clear()
        for label, n in enumerate(self._examples_by_label):
            if n:
                self.metrics.examples.labels(str(label)).inc(n)
                self._examples_by_label[label] = 0

    def _dead_letter(self, raw: bytes, key: bytes | None, source: tuple[str, int, int],
                     reason: str) -> None:
        topic, partition, offset = source
        self._produce(self.settings.topic_dlq, raw, key, [
            ("reason", reason.encode()[:1024]), ("source_topic", topic.encode()),
            ("source_partition", str(partition).encode()),
            ("source_offset", str(offset).encode())])

    def _defer(self, ts: float, raw: bytes, key: bytes | None, topic: str, partition: int,
               offset: int, click: AnyClick | None) -> None:
        heapq.heappush(self._early,
                       (ts, self._early_seq, raw, key, topic, partition, offset, click))
        self._early_seq += 1
        if len(self._early) > self.max_early_clicks:
            # Memory is bounded: the oldest waiting click is joined now (its impression has
            # most likely been read already; if not, it goes to the DLQ as an orphan).
            self.metrics.dropped.labels("early_clicks_full").inc()
            self._join_early(heapq.heappop(self._early))

    def _join_early(self, early: tuple[float, int, bytes, bytes | None, str, int, int,
                                       AnyClick | None]) -> None:
        _ts, _seq, raw, key, topic, partition, offset, click = early
        self._join(parse_click(raw) if click is None else click, raw, key,
                   (topic, partition, offset))

    def handle(self, msg: Message) -> None:
        """One impression or click (a click ahead of the impressions stream waits)."""
        self.handle_batch([msg])

    def handle_batch(self, messages: list[Message]) -> None:
        """Consumed messages in order; consumer errors are logged and skipped.

        Per message only what differs per message is done: the wall clock of the skew check is
        read once per batch (a batch takes milliseconds, the allowed skew is minutes) and the
        counters are added once, at the end.
        """
        s = self.settings
        imp_topic, click_topic = s.topic_impressions, s.topic_clicks
        skew = s.event_max_future_skew_s
        wall = self._wall()
        newest = wall + skew  # the newest event time accepted
        offsets, early = self.offsets, self._early
        add_impression = self.joiner.add_impression
        imp_clock, click_clock = self._imp_clock, self._click_clock
        impressions = 0
        try:
            for msg in records(messages, log):
                topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
                offsets[(topic, partition)] = offset + 1
                raw = msg.value() or b""
                try:
                    if topic == imp_topic:
                        imp = parse_impression(raw)
                        if imp.ts > newest:
                            raise EventRejected(future_skew_reason(imp.ts, skew, wall) or "")
                        add_impression(imp)
                        impressions += 1
                        upto = imp_clock.observe(partition, imp.ts)
                        if early and early[0][0] <= upto:
                            self._release_early(upto)
                        continue
                    click = parse_click(raw)
                    if click.ts > newest:
                        raise EventRejected(future_skew_reason(click.ts, skew, wall) or "")
                except EventRejected as exc:  # invalid, or valid alone but unusable as a label
                    self._dead_letter(raw, msg.key(), (topic, partition, offset), exc.reason)
                    if topic == click_topic:
                        self._count_click("invalid")
                    continue
                click_clock.observe(partition, click.ts)
                if click.ts > imp_clock.now:
                    # Its impression may simply not have been read yet (topics are consumed
                    # independently): wait until the impressions stream passes the click's time.
                    self._defer(click.ts, raw, msg.key(), topic, partition, offset, click)
                    continue
                self._join(click, raw, msg.key(), (topic, partition, offset))
        finally:
            if impressions:
                self.metrics.impressions.inc(impressions)
            self._flush_counts()
            self._send_labels()

    def _join(self, click: AnyClick, raw: bytes, key: bytes | None,
              source: tuple[str, int, int]) -> None:
        result = self.joiner.join_click(click)
        self._count_click(result.outcome.value)
        if result.outcome is ClickOutcome.ORPHAN:
            self._dead_letter(raw, key, source,
                              "orphan click: no impression of this item in the window")
        if result.labels:
            self._emit(result.labels, 1)

    def _export_exploration(self) -> None:
        """Add what closed since the last tick to the explored/exploited counters."""
        now = self.joiner.exploration_counts()
        last, self._exploration_seen = self._exploration_seen, now
        m = self.metrics
        for counter, flag, new, old in ((m.shown_items, "true", now[0], last[0]),
                                        (m.shown_items, "false", now[1], last[1]),
                                        (m.clicked_items, "true", now[2], last[2]),
                                        (m.clicked_items, "false", now[3], last[3])):
            if new > old:
                counter.labels(flag).inc(new - old)

    def _release_early(self, upto_ts: float) -> None:
        while self._early and self._early[0][0] <= upto_ts:
            self._join_early(heapq.heappop(self._early))

    def tick(self) -> None:
        """Advance the watermark, emit closed windows, refresh gauges, checkpoint when due."""
        now = self._monotonic()
        idle = now - self._last_input
        # Quiet for a whole window: nothing in flight can still join, let wall time close it.
        quiet = max(self.settings.joiner_lateness_s, self.settings.joiner_window_s)
        if self._assigned and idle > quiet:
            self._idle_advance = idle - quiet
        if self._idle_advance > 0:
            self._release_early(float("inf"))  # quiet for a window: no impression is coming
        if (self._expecting_since is not None
                and now - self._expecting_since >= self.settings.joiner_click_idle_s):
            self._imp_clock.forget_empty()  # assigned partitions with nothing to read
            self._click_clock.forget_empty()
            self._expecting_since = None
            if self._early:
                self._release_early(self._imp_clock.now)
        # Both streams must have passed a window's end before it closes; an idle click partition
        # is assumed at most one window behind the impressions.
        s = self.settings
        imp_at = self._imp_clock.now
        moving_at = self._moving_clicks_at(now)
        clicks_at = min(moving_at, max(self._click_clock.now, imp_at - s.joiner_window_s))
        watermark = min(imp_at, clicks_at) - s.joiner_lateness_s + self._idle_advance
        self._align(moving_at)
        self._emit(self.joiner.advance_labels(watermark), 0)
        self._flush_counts()
        self._send_labels()
        self.metrics.pending.set(self.joiner.pending)
        self._export_exploration()
        self.metrics.early_clicks.set(len(self._early))
        self.metrics.join_delay.observe_many(self.joiner.drain_join_delays())
        self._producer.poll(0)
        if now - self._last_truncation_check >= 1.0:
            self._rewind_truncated()
            self._last_truncation_check = now
        if now - self._last_checkpoint >= self.settings.joiner_checkpoint_interval_s:
            self.checkpoint()

    def _moving_clicks_at(self, now: float) -> float:
        """The oldest clock among the click partitions still waited for (``inf`` if none).

        A click partition is waited for while its clock moves (it moved within
        ``joiner_click_idle_s``) and, for at most a window after it last moved (or was
        assigned), while it is known to hold records we have not read or its end is not known
        yet: its first fetch can come seconds after the impressions'. The high watermark is
        only taken as proof of unread records (above our position), never as proof of having
        read everything: some brokers report it low. Called once per batch.
        """
        idle_s, window = self.settings.joiner_click_idle_s, self.settings.joiner_window_s
        seen, moved = self._click_seen, self._click_moved
        for partition, at in self._click_clock.partition_times().items():
            if at > seen.get(partition, -math.inf):
                seen[partition] = at
                moved[partition] = now
        oldest = math.inf
        topic = self.settings.topic_clicks
        for partition, when in moved.items():
            still = now - when
            if still >= idle_s and (still >= window or not self._unread(topic, partition)):
                continue
            oldest = min(oldest, seen.get(partition, -math.inf))
        return oldest

    def _unread(self, topic: str, partition: int) -> bool:
        """Whether ``partition`` may hold records beyond our position: its high watermark (as
        last fetched) is above it, or not known yet. False when not assigned here."""
        if not self._assigned:
            return False
        try:
            low, high = self._consumer.get_watermark_offsets(
                TopicPartition(topic, partition), cached=True)
        except KafkaException:
            return False
        if high < 0:
            return True  # nothing fetched yet
        return high > self.offsets.get((topic, partition), max(low, 0))

    def _align(self, moving_clicks_at: float) -> None:
        """Pause impression partitions more than a window ahead of the moving click partitions;
        resume them within half a window, or when no click partition moves any more.

        Only moving clicks hold impressions back, so a stalled or finished click stream cannot
        park them. Paused partitions keep their position (librdkafka resumes after the last
        message handed out), and whatever was consumed before the pause is still handled.
        """
        if not self._assigned:
            return
        window = self.settings.joiner_window_s
        topic = self.settings.topic_impressions
        pause, resume = [], []
        for partition, at in self._imp_clock.partition_times().items():
            if partition not in self._imp_partitions:
                continue
            if partition in self._paused:
                if at - moving_clicks_at <= window / 2:
                    resume.append(partition)
            elif at - moving_clicks_at > window:
                pause.append(partition)
        if pause:
            self._consumer.pause([TopicPartition(topic, p) for p in pause])
            self._paused.update(pause)
        if resume:
            self._consumer.resume([TopicPartition(topic, p) for p in resume])
            self._paused.difference_update(resume)
        self.metrics.paused_partitions.set(len(self._paused))

    def _rewind_truncated(self) -> None:
        """Resume from the start of an input partition whose log restarted below our position.

        Waiting at the old position would ignore every impression and click produced since;
        the rewound offsets are checkpointed at once so a restart does not park there again.
        """
        rewound = self._truncations.rewind(self._consumer, self.offsets)
        for partition in rewound:
            self.metrics.log_truncations.labels(partition.topic).inc()
        if rewound:
            self._last_checkpoint = 0.0

    def run(self, stop: threading.Event) -> None:
        """Consume both topics until ``stop``; checkpoint on the way out."""
        s = self.settings
        self._consumer.subscribe([s.topic_impressions, s.topic_clicks], on_assign=self._on_assign)
        try:
            while not stop.is_set():
                self.metrics.heartbeat.beat()
                messages = self._consumer.consume(10_000, timeout=0.05)
                self.handle_batch(messages)
                if messages:
                    self._last_input = self._monotonic()
                    self._idle_advance = 0.0
                self.tick()
        finally:
            try:
                self.checkpoint()
            finally:
                self._consumer.close()


def run(settings: Settings, stop: threading.Event | None = None) -> int:
    """Size the thread pools, serve metrics and /healthz, and join until SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    pools = apply_thread_budget(cpu_budget(settings.cpu_threads))
    create_topics(settings.kafka_bootstrap, [settings.topic_impressions, settings.topic_clicks,
                                             settings.topic_events, settings.topic_dlq],
                  settings.topic_partitions)
    metrics = JoinerMetrics()
    report_thread_pools(metrics.threads, pools)
    if settings.joiner_metrics_port:
        serve_metrics_and_health(settings.joiner_metrics_port, metrics.registry,
                                 metrics.heartbeat, settings.joiner_liveness_timeout_s)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    process = JoinerProcess(settings, metrics)
    tune_gc()
    process.run(stop)
    log.info("joiner stopped: %s", process.joiner.counts())
    return 0
