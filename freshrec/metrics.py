"""Every Prometheus metric freshrec exports, in one place.

Names follow Prometheus conventions (``_total`` counters, ``_seconds`` in base units); cumulative
figures are Counters, never Gauges. Label sets are bounded: slot names, partitions, outcomes,
routes, status codes and thread pools, never IDs. Each process registers only the group it uses,
in its own registry, so tests can build several in one process.

Several service workers (``WEB_CONCURRENCY``) share one ``/metrics``: ``freshrec service`` then
sets ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode, a fresh directory per
start), every worker writes its values there, and :meth:`ServiceMetrics.exposition` of whichever
worker answers the scrape sums them. Each gauge says how workers combine (``multiprocess_mode``).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from freshrec.health import Heartbeat

_STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


@dataclass
class TrainerMetrics:
    """Online trainer: consumption, learning quality, table health, publishing, checkpoints."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r, p = self.registry, "freshrec_trainer_"
        self.events = Counter(p + "events_total", "Events consumed, by outcome.", ["outcome"],
                              registry=r)
        self.batches = Counter(p + "batches_total", "Training batches applied.", registry=r)
        self.batch_seconds = Histogram(p + "batch_seconds", "Wall time of one whole batch.",
                                       buckets=_STEP_BUCKETS, registry=r)
        self.step_seconds = Histogram(p + "step_seconds", "Wall time of forward+backward+update.",
                                      buckets=_STEP_BUCKETS, registry=r)
        self.auc = Gauge(p + "progressive_auc", "Windowed progressive-validation AUC.", registry=r)
        self.logloss = Gauge(p + "progressive_logloss", "Windowed progressive logloss.",
                             registry=r)
        self.calibration = Gauge(p + "progressive_calibration",
                                 "Windowed mean prediction / observed positive rate.", registry=r)
        self.table_rows = Gauge(p + "table_rows", "Live rows per slot.", ["slot"], registry=r)
        self.table_bytes = Gauge(p + "table_bytes", "Bytes held per slot table.", ["slot"],
                                 registry=r)
        self.admitted = Counter(p + "table_admitted", "IDs admitted per slot.", ["slot"],
                                registry=r)
        self.evicted = Counter(p + "table_evicted", "Rows evicted per slot.", ["slot"],
                               registry=r)
        self.rejected = Counter(p + "table_rejected",
                                "Lookups of not-yet-admitted IDs per slot.", ["slot"],
                                registry=r)
        self._table_totals: dict[tuple[str, str], int] = {}
        self.lag = Gauge(p + "consumer_lag", "Messages behind the high watermark.", ["partition"],
                         registry=r)
        self.event_time = Gauge(p + "last_event_timestamp_seconds",
                                "Event time of the newest trained event.", registry=r)
        self.publish_seconds = Histogram(p + "publish_seconds", "Wall time of one publish.",
                                         buckets=_STEP_BUCKETS, registry=r)
        self.publish_rows = Histogram(p + "publish_rows", "Rows written per publish.",
                                      buckets=(0, 10, 100, 1e3, 1e4, 1e5, 1e6), registry=r)
        self.publishes = Counter(p + "publishes_total",
                                 "Publishes, by kind (delta/full/dense/image/error).",
                                 ["kind"], registry=r)
        self.snapshot_version = Gauge(p + "snapshot_version", "Last published version.",
                                      registry=r)
        self.last_publish = Gauge(p + "last_publish_timestamp_seconds",
                                  "Wall time of the last publish.", registry=r)
        self.publish_queue_depth = Gauge(p + "publish_queue_depth",
                                         "Gathered changes waiting for the publisher thread.",
                                         registry=r)
        self.publish_failures = Counter(p + "publish_failures_total",
                                        "Publishes Redis did not confirm (retried merged).",
                                        registry=r)
        self.publish_merged = Counter(p + "publish_merged_deltas_total",
                                      "Deltas merged into one still waiting for Redis.",
                                      registry=r)
        self.publish_pending_rows = Gauge(p + "publish_pending_rows",
                                          "Rows of the merged delta waiting for Redis.",
                                          registry=r)
        self.publish_overflows = Counter(p + "publish_overflows_total",
                                         "Merged deltas dropped for a full snapshot (too big).",
                                         registry=r)
        self.publish_skipped = Counter(p + "publish_skipped_total",
                                       "Publish cycles skipped because the queue was full.",
                                       registry=r)
        self.last_checkpoint = Gauge(p + "last_checkpoint_timestamp_seconds",
                                     "Wall time of the last durable checkpoint.", registry=r)
        self.checkpoint_seconds = Histogram(p + "checkpoint_seconds", "Wall time of a checkpoint.",
                                            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30),
                                            registry=r)
        self.bandit_items = Gauge(p + "bandit_items", "Items with exploration statistics.",
                                  registry=r)
        self.cluster_assigned = Counter(p + "bandit_cluster_assigned_total",
                                        "Users placed by the user clusters after a full init.",
                                        registry=r)
        self.cluster_reassigned = Counter(
            p + "bandit_cluster_reassigned_total",
            "Users whose nearest cluster changed with their own batch's centroid update.",
            registry=r)
        self.cluster_reseeded = Counter(p + "bandit_cluster_reseeded_total",
                                        "User clusters re-seeded after emptying.", registry=r)
        self.threads = thread_pool_gauge(p, r)
        self.heartbeat = Heartbeat()  # beaten by the training loop, read by /healthz
        self.event_clock = Gauge(p + "event_clock_seconds",
                                 "Event-time watermark that drives TTL expiry and decay.",
                                 registry=r)
        self.expiry_capped = Counter(p + "expiry_capped_total",
                                     "TTL sweeps cut short because they would have expired more "
                                     "than trainer_max_expiry_fraction of a table.", ["slot"],
                                     registry=r)
        self.rollbacks = Counter(p + "rollbacks_total",
                                 "Falls back to the last good checkpoint, by reason "
                                 "(diverged: non-finite model; failed: a batch failed part-way).",
                                 ["reason"], registry=r)
        self.log_truncations = Counter(p + "log_truncations_total",
                                       "Partitions found restarted below the trainer's position "
                                       "(topic recreated, broker data lost) and rewound to "
                                       "their start.", registry=r)

    def table_totals(self, slot: str, admitted: int, evicted: int, rejected: int) -> None:
        """Advance the slot's counters to the table's cumulative figures.

        The table keeps the totals (they survive checkpoints); the counters move by the
        difference since the last call. A total that went down (a table restored from an older
        checkpoint) becomes the new baseline.
        """
        for name, counter, total in (("admitted", self.admitted, admitted),
                                     ("evicted", self.evicted, evicted),
                                     ("rejected", self.rejected, rejected)):
            child = counter.labels(slot)  # exported from the start, also while still 0
            last = self._table_totals.get((name, slot), 0)
            if total > last:
                child.inc(total - last)
            self._table_totals[(name, slot)] = total


@dataclass
class JoinerMetrics:
    """Online joiner: impressions + clicks -> labeled examples."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r, p = self.registry, "freshrec_joiner_"
        self.impressions = Counter(p + "impressions_total", "Impressions consumed.", registry=r)
        self.clicks = Counter(p + "clicks_total", "Clicks consumed, by outcome.", ["outcome"],
                              registry=r)
        self.examples = Counter(p + "examples_total", "Labeled examples emitted, by label.",
                                ["label"], registry=r)
        self.pending = Gauge(p + "window_pending", "Shown items waiting in the window.",
                             registry=r)
        # explored = "true" | "false": the server's flag on the shown item. Their ratio gives
        # the share of explored impressions and the CTR of explored vs exploited ones.
        self.shown_items = Counter(p + "shown_items_total",
                                   "Shown items whose attribution window closed, by explored.",
                                   ["explored"], registry=r)
        self.clicked_items = Counter(p + "clicked_items_total",
                                     "Shown items clicked inside their window, by explored.",
                                     ["explored"], registry=r)
        for explored in ("true", "false"):  # exported from zero, so rate() sees the first one
            self.shown_items.labels(explored)
            self.clicked_items.labels(explored)
        self.early_clicks = Gauge(p + "early_clicks", "Clicks waiting for the impressions "
                                  "stream to reach their time.", registry=r)
        self.paused_partitions = Gauge(p + "paused_partitions", "Impression partitions paused "
                                       "because they ran more than a window ahead of the "
                                       "clicks (catching up a backlog).", registry=r)
        self.dropped = Counter(p + "dropped_total", "Input dropped to keep memory bounded, by "
                               "reason (early_clicks_full: the click was joined before its "
                               "time).", ["reason"], registry=r)
        self.join_delay = BulkHistogram(p + "join_delay_seconds",
                                        "Event-time delay from impression to emitted example.",
                                        buckets=(0.1, 1, 5, 15, 30, 60, 120, 300, 600, 1800),
                                        registry=r)
        self.log_truncations = Counter(p + "log_truncations_total",
                                       "Partitions found restarted below the joiner's position "
                                       "(topic recreated, broker data lost) and rewound to "
                                       "their start, by topic.", ["topic"], registry=r)
        self.threads = thread_pool_gauge(p, r)
        self.heartbeat = Heartbeat()  # beaten by the joining loop, read by /healthz


class HistogramTally:
    """Observations of one histogram, kept in plain Python until :meth:`flush` observes them.

    In multiprocess mode every ``observe`` takes a lock, checks the pid and writes an mmap; a
    request appends to a list instead, and the flush (about once a second, off the request
    path) replays the values through the histogram's public ``observe``. The result is exactly
    one ``observe`` per value. Not thread-safe: one thread (the event loop) observes and flushes.
    """

    __slots__ = ("_histogram", "_values")

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._values: list[float] = []

    def observe(self, value: float) -> None:
        self._values.append(value)

    def flush(self) -> None:
        values, self._values = self._values, []
        observe = self._histogram.observe
        for v in values:
            observe(v)


class BulkHistogram(Collector):
    """A histogram fed whole numpy arrays at a time, exposed through the public collector API.

    The joiner observes one join delay per label, tens of thousands a second; one
    ``Histogram.observe`` takes a lock (~1.5 us) per value, and adding to a Histogram's bucket
    values directly would write prometheus_client's private fields. Here a batch is bucketed in
    one numpy pass under one lock, and :meth:`collect` yields the usual ``_bucket``/``_count``/
    ``_sum`` samples (cumulative, ``le`` bounds as ``Histogram`` formats them). For one
    process' registry (the joiner's); multiprocess mode only aggregates ``Histogram``.
    """

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...],
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = np.array(sorted(float(b) for b in buckets if b != float("inf")))
        self._counts = np.zeros(len(self.bounds) + 1, dtype=np.int64)  # the last: +Inf only
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: np.ndarray) -> None:
        """Observe every value: bucket = the first bound >= the value (as ``observe``); a NaN
        adds to the sum only, as in ``Histogram``."""
        values = np.asarray(values, dtype=np.float64)
        if not len(values):
            return
        finite = values[~np.isnan(values)]
        counts = np.bincount(np.searchsorted(self.bounds, finite, side="left"),
                             minlength=len(self._counts))
        with self._lock:
            self._counts += counts
            self._sum += float(values.sum())

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            counts, total = self._counts.copy(), self._sum
        cumulative = np.cumsum(counts).tolist()
        labels = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        family = HistogramMetricFamily(self.name, self.documentation,
                                       buckets=list(zip(labels, cumulative, strict=True)),
                                       sum_value=total)
        yield family


class ScoreTally:
    """The per-request figures of ``/v1/score``, written to their metrics about once a second.

    In multiprocess mode every metric update takes a lock, checks the pid and writes an mmap
    (~2-5 us); four per request were ~2 % of a worker's CPU at 1,000 requests/s. Here a request
    adds to plain Python numbers and the metrics are updated in bulk when ``interval_s`` has
    passed, before every exposition, and by :meth:`ServiceMetrics.flush_every`. The metric
    names and what they count are unchanged; a scrape may miss the last second of one worker.
    """

    def __init__(self, metrics: ServiceMetrics, interval_s: float = 1.0) -> None:
        self._candidates = HistogramTally(metrics.candidates)
        self._bonus = HistogramTally(metrics.bonus)
        self._served_items, self._explored_items = metrics.served_items, metrics.explored_items
        self._served = self._explored = 0
        self._interval_s = interval_s
        self._due = time.monotonic() + interval_s

    def add(self, candidates: int, served: int, explored: int, bonus: float | None) -> None:
        """One scored request: its candidates, items served and explored, mean bonus (if any)."""
        self._candidates.observe(candidates)
        self._served += served
        self._explored += explored
        if bonus is not None:
            self._bonus.observe(bonus)
        if time.monotonic() >= self._due:
            self.flush()

    def flush(self) -> None:
        self._candidates.flush()
        self._bonus.flush()
        if self._served:
            self._served_items.inc(self._served)
        if self._explored:
            self._explored_items.inc(self._explored)
        self._served = self._explored = 0
        self._due = time.monotonic() + self._interval_s


@dataclass
class ServiceMetrics:
    """Scoring service: latency, load, snapshot freshness, exploration, impressions."""

    slo_seconds: float = 0.02
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r, p = self.registry, "freshrec_service_"
        buckets = sorted({0.001, 0.002, 0.005, 0.01, self.slo_seconds, 0.05, 0.1, 0.25, 0.5, 1.0})
        self.request_seconds = Histogram(p + "request_seconds", "Request wall time by route.",
                                         ["route"], buckets=buckets, registry=r)
        self.responses = Counter(p + "responses_total", "Responses by route and status.",
                                 ["route", "status"], registry=r)
        self.candidates = Histogram(p + "candidates", "Candidates per score request.",
                                    buckets=(1, 10, 50, 100, 200, 500, 1000, 5000), registry=r)
        # Across workers: the oldest snapshot is what the replica guarantees.
        self.snapshot_version = Gauge(p + "snapshot_version", "Version of the served snapshot.",
                                      registry=r, multiprocess_mode="livemin")
        self.snapshot_age = Gauge(p + "snapshot_age_seconds",
                                  "Seconds since the served snapshot was published.", registry=r,
                                  multiprocess_mode="livemax")
        self.snapshot_updates = Counter(p + "snapshot_updates_total",
                                        "Update-stream entries applied, by kind.", ["kind"],
                                        registry=r)
        self.ready = Gauge(p + "ready", "1 once a valid snapshot is loaded.", registry=r,
                           multiprocess_mode="livemin")
        self.impressions = Counter(p + "impressions_total", "Impressions by outcome.",
                                   ["outcome"], registry=r)
        self.producer_renewals = Counter(
            p + "producer_renewals_total",
            "Kafka producers replaced after a fatal error (e.g. a broker that lost its state).",
            registry=r)
        self.explored_items = Counter(p + "explored_items_total",
                                      "Served items promoted by exploration.", registry=r)
        self.served_items = Counter(p + "served_items_total", "Served items.", registry=r)
        self.bonus = Histogram(p + "exploration_bonus",
                               "Mean exploration bonus of the items one request served.",
                               buckets=(0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2), registry=r)
        self.events_accepted = Counter(p + "events_total", "Events accepted on /v1/events.",
                                       registry=r)
        self.events_dead_lettered = Counter(
            p + "events_dead_lettered_total",
            "Events refused on /v1/events and sent to the dead-letter topic, by reason.",
            ["reason"], registry=r)
        self.follower_restarts = Counter(
            p + "snapshot_follower_restarts_total",
            "Restarts of the snapshot follower after it died with an error.", registry=r)
        self.threads = thread_pool_gauge(p, r)
        self.scored = ScoreTally(self)

    async def flush_every(self, interval_s: float = 1.0) -> None:
        """Write what :attr:`scored` holds every ``interval_s`` (a task of the service's loop),
        so a worker that stops receiving requests does not keep its last second to itself."""
        while True:
            await asyncio.sleep(interval_s)
            self.scored.flush()

    def exposition(self) -> bytes:
        """Prometheus text of this replica: every worker's values in multiprocess mode."""
        self.scored.flush()
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not directory:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
        return generate_latest(registry)


def thread_pool_gauge(prefix: str, registry: CollectorRegistry) -> Gauge:
    """``<prefix>thread_pool_size{pool}``: what :func:`freshrec.runtime.thread_pools` reports.

    Per worker in multiprocess mode (a ``pid`` label), so each worker's sizing is visible.
    """
    return Gauge(prefix + "thread_pool_size", "Threads a native pool of the process may use.",
                 ["pool"], registry=registry, multiprocess_mode="liveall")


def report_thread_pools(gauge: Gauge, pools: dict[str, int]) -> None:
    """Set the gauge from a :func:`freshrec.runtime.thread_pools` report."""
    for pool, size in pools.items():
        gauge.labels(pool).set(size)


def scrape(url: str, timeout: float = 2.0) -> dict[str, float]:
    """Samples of a ``/metrics`` endpoint as ``{'name{label=value,...}': value}``.

    For the CLI's progress display, benchmarks and tests that watch a running process; an
    unreachable endpoint gives an empty dict (the process may still be starting).
    """
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out
