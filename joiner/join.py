"""Online joiner: impressions + bare clicks -> exactly one labeled example per shown item.

Clients only send clicks; the negatives are what was shown and not clicked. Like Monolith's online
joiner, every shown item waits in an event-time window: a click inside the window emits a positive
at once (freshness is the product), and when the watermark passes the end of the window an
unclicked item becomes a negative, optionally down-sampled. This module is the pure logic: no
Kafka, no clock. The caller feeds parsed messages, advances the watermark and produces what comes
back; ``state()``/``restore()`` make the whole thing part of its checkpoint.

Exactly-once labels under at-least-once input: a shown item is keyed by ``(request_id, item_id)``,
its label carries the deterministic ``event_id`` ``"{request_id}:{item_id}"``, duplicate
impressions and clicks are recognised (also after the window closed, via bounded tombstones), and
the negative sampling decision is a hash of the event id, so a replay makes the same choice.

Example:

    >>> from featurestore.events import Click, Impression, ShownItem
    >>> j = Joiner(window_s=60.0)
    >>> j.add_impression(Impression(request_id="r1", ts=100.0, user_id="u1", model_version=3,
    ...     items=[ShownItem(item_id="m1", position=0, score=1.0, pctr=0.1),
    ...            ShownItem(item_id="m2", position=1, score=0.5, pctr=0.05)]))
    >>> [(e.event_id, e.label) for e in j.add_click(
    ...     Click(event_id="c1", ts=110.0, user_id="u1", item_id="m2", request_id="r1"))]
    [('r1:m2', 1)]
    >>> [(e.event_id, e.label) for e in j.advance(160.0)]
    [('r1:m1', 0)]
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import Any

import msgspec
import numpy as np
import orjson
import xxhash
from pydantic import TypeAdapter

from featurestore.events import (
    MAX_FEATURES,
    MAX_ID_LEN,
    AnyClick,
    AnyImpression,
    BanditContext,
    BanditContextMsg,
    EventRejected,
    Features,
    Id,
    LabeledEventMsg,
    decode_labeled_events,
)

STATE_VERSION = 1
_U64 = float(1 << 64)
_LATE_SUFFIX = ":late"

# Per-item click state inside a request record.
_CLICKED = 1  # joined inside the window: the positive went out, no negative later
_LATE = 2  # seen after the window: the item still gets (or got) its negative


# --------------------------------------------------------------------------------------------
# pure helpers


def log_odds_correction(sample_rate: float) -> float:
    """What to add to a logit trained on down-sampled negatives to get the population logit.

    Keeping negatives with probability ``r`` multiplies the odds seen in training by ``1/r``:
    ``P(y=1 | x, kept) = p / (p + (1 - p) r)``, so ``logit_trained = logit_true - log r``.
    Hence ``logit_served = logit_trained + log_odds_correction(r)`` with the correction
    ``log r`` (<= 0: down-sampling negatives inflates CTR, this pulls it back). Monolith applies
    the same fact at train time instead: feed ``f(x) - log r`` to the loss for every example of
    the sampled stream (positives too) and serve ``f(x)`` as is.
    """
    if not (0.0 < sample_rate <= 1.0) or math.isnan(sample_rate):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    return math.log(sample_rate)


def example_id(request_id: str, item_id: str) -> str:
    """The deterministic event id of the label of one shown item.

    Deterministic so that downstream dedup by event id absorbs a replay. Ids longer than the wire
    limit are replaced by a 128-bit hash, since the joiner builds events without re-validating.
    """
    eid = f"{request_id}:{item_id}"
    return eid if len(eid) <= MAX_ID_LEN else _hashed_id(eid)


def _hashed_id(eid: str) -> str:
    return "h:" + xxhash.xxh3_128_hexdigest(eid.encode())


def keep_negative(event_id: str, sample_rate: float, seed: int = 0) -> bool:
    """Whether a negative is kept at ``sample_rate``: a pure function of the id, not an RNG draw.

    A pure function means a replay after a crash, or a second joiner replica, decides the same.
    """
    if sample_rate >= 1.0:
        return True
    return xxhash.xxh64_intdigest(event_id.encode(), seed) < sample_rate * _U64


# --------------------------------------------------------------------------------------------
# labels on the wire, built from already-validated values

# A label as it goes to the events topic: (Kafka key = the user id, value = LabeledEvent JSON).
Label = tuple[bytes, bytes]

_encode = msgspec.json.Encoder().encode


# The label of one shown item: event id, then _LabelTemplate.middle (ts, user id), item id,
# label, the item's features part and _LabelTemplate.tail (request id, context, sample rate).
_LABEL = b'{"event_id":%b%b%b%b%b%b'
_FEATURES_KEY = b',"features":'
_CONTEXT_KEY = b',"context":'


class _LabelTemplate:
    """The bytes that the labels of one request share, so a label costs a few concatenations.

    The emitted value is exactly ``LabeledEventMsg(...).to_json()`` (same field order, the same
    omitted defaults, the same msgspec encoding of every value; ``tests/joiner`` checks it
    byte for byte), but the request's ids, time and bandit context are encoded once per request,
    and each item's features once when its impression arrives (see :func:`_features_parts`):
    building a struct and a merged dict per label and encoding them was the joiner's largest
    cost after parsing.
    """

    __slots__ = ("key", "label", "middle", "tail")

    def __init__(self, rec: _Request, ts: float, label: int, sample_rate: float | None) -> None:
        self.key = rec.user_id.encode()
        self.middle = b',"ts":%b,"user_id":%b,"item_id":' % (_encode(ts), _encode(rec.user_id))
        self.label = b',"label":%d' % label
        rate = b"" if sample_rate is None else b',"sample_rate":' + _encode(sample_rate)
        self.tail = b',"request_id":%b%b%b}' % (_encode(rec.request_id), rec.context or b"", rate)

    def value(self, eid: str, iid: str, features_part: bytes) -> bytes:
        """The JSON of the label of item ``iid`` with event id ``eid``."""
        return _LABEL % (_encode(eid), self.middle, _encode(iid), self.label, features_part,
                         self.tail)


def _features_parts(req: Features, items: Iterable[tuple[str, Features]]) -> dict[str, bytes]:
    """Item id -> the ``,"features":{...}`` part of its labels (``b""`` when there are none).

    The request's features merged with the item's (the item's win, in the request's key order),
    encoded once when the impression arrives: the window then holds bytes, which CPython's
    cyclic GC never scans, instead of two dicts and a list per shown item. When no key is in
    common (the usual case) the merged JSON is the two objects spliced, with no merged dict.
    An item listed twice in one response is one shown item: its first occurrence wins.
    """
    parts: dict[str, bytes] = {}
    if req:
        req_json = _encode(req)
        req_part = _FEATURES_KEY + req_json
        head = req_part[:-1] + b","
        keys = req.keys()
        for iid, f in items:
            if iid in parts:
                continue
            if not f:
                parts[iid] = req_part
            elif keys.isdisjoint(f):
                parts[iid] = head + _encode(f)[1:]
            else:
                parts[iid] = _FEATURES_KEY + _encode(req | f)
    else:
        for iid, f in items:
            if iid not in parts:
                parts[iid] = _FEATURES_KEY + _encode(f) if f else b""
    return parts


def _decode_part(part: bytes, key: bytes) -> Any:
    """The value of a ``key`` part (``,"features":{...}``) as builtins; ``{}``/None if empty."""
    return msgspec.json.decode(part[len(key):]) if part else None


def decode_labels(labels: list[Label]) -> list[LabeledEventMsg]:
    """The structs of wire labels (for inspection and tests; the process produces the bytes)."""
    return decode_labeled_events(value for _, value in labels)


def _context_part(ctx: BanditContext | BanditContextMsg | None) -> bytes:
    """The ``,"context":{...}`` part of a request's labels (``b""`` without a context)."""
    if ctx is None:
        return b""
    if not isinstance(ctx, BanditContextMsg):  # impressions parsed by pydantic carry its form
        ctx = BanditContextMsg(list(ctx.clusters), list(ctx.weights))
    return _CONTEXT_KEY + _encode(ctx)


# --------------------------------------------------------------------------------------------
# public types


class ClickOutcome(StrEnum):
    """What happened to one click; the values are the ``outcome`` label of the clicks metric."""

    JOINED = "joined"
    DUPLICATE = "duplicate"
    ORPHAN = "orphan"
    LATE = "late"


@dataclass(frozen=True, slots=True)
class ClickResult:
    """One click's outcome, the labels to produce (a positive, a late correction, or none), and
    the request it was attributed to (``None`` for orphans and duplicates of orphans)."""

    outcome: ClickOutcome
    labels: list[Label]
    request_id: str | None = None

    @property
    def events(self) -> list[LabeledEventMsg]:
        """The labels as structs."""
        return decode_labels(self.labels)


@dataclass(slots=True)
class JoinerCounts:
    """Cumulative outcome counters (``pending`` is a gauge: shown items waiting in the window).

    Items, not requests, except ``impressions``/``duplicate_impressions``/``impressions_rejected``
    which count impression messages.
    """

    impressions: int = 0
    duplicate_impressions: int = 0
    impressions_rejected: int = 0
    impressions_too_late: int = 0
    clicks_joined: int = 0
    clicks_duplicate: int = 0
    clicks_orphan: int = 0
    clicks_late: int = 0
    late_corrections: int = 0
    negatives_emitted: int = 0
    negatives_dropped_by_sampling: int = 0
    evicted_early: int = 0
    # Closed shown items and those clicked in their window, split by the server's ``explored``
    # flag: the explored-vs-exploited CTR that prices exploration (docs/exploration.md).
    shown_explored: int = 0
    shown_exploited: int = 0
    clicked_explored: int = 0
    clicked_exploited: int = 0
    pending: int = 0


class _Request:
    """One impression's shown items while they wait (open) or after, as a tombstone (closed).

    One record per request, not per item: the window opens and closes for all items of a
    request together, so expiry costs one heap operation per request instead of per item.
    Only what a label needs is kept (ids, times, and the features and bandit context as the
    JSON their labels carry), not the parsed Impression: every container held here is rescanned
    by CPython's cyclic GC for as long as the window lasts, and that, not the join itself,
    dominated the measured cost. Bytes are not containers.
    """

    __slots__ = ("clicks", "context", "explored", "features", "items", "model_version", "open",
                 "request_id", "seq", "ts", "user_id")

    def __init__(self, request_id: str, ts: float, user_id: str, model_version: int, seq: int,
                 features: bytes | None, context: bytes | None, items: dict[str, bytes | None],
                 explored: frozenset[str] | None = None) -> None:
        self.request_id = request_id
        self.ts = ts
        self.user_id = user_id
        self.model_version = model_version  # kept for the state; LabeledEvent has no field yet
        self.seq = seq  # arrival order: the tie-breaker that makes expiry order total
        self.features = features  # request features' JSON; None once closed w/o corrections
        self.context = context  # the labels' ,"context":{...} part (b"": none)
        # item_id -> its labels' ,"features":{...} part (see _features_parts); None when closed
        self.items = items
        self.clicks: dict[str, int] | None = None  # item_id -> _CLICKED | _LATE, created lazily
        self.open = True
        self.explored = explored  # items shown thanks to the exploration bonus (None: none)

    def close(self, keep_features: bool) -> None:
        self.open = False
        self.explored = None  # counted when the window closed
        if not keep_features:  # a tombstone needs ids and click flags only
            self.features = None
            self.context = None
            self.items = dict.fromkeys(self.items)

    def to_json(self) -> dict[str, Any]:
        # Items carry their labels' merged features: restored, merging the request's features
        # into them again gives the same labels.
        has_features = self.features is not None
        return {"request_id": self.request_id, "ts": self.ts, "user_id": self.user_id,
                "model_version": self.model_version, "seq": self.seq, "open": self.open,
                "features": msgspec.json.decode(self.features) if has_features else None,
                "context": _decode_part(self.context or b"", _CONTEXT_KEY),
                "items": [(iid, _decode_part(p, _FEATURES_KEY) or {} if has_features else None)
                          for iid, p in self.items.items()],
                "clicks": self.clicks,
                "explored": None if self.explored is None else sorted(self.explored)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> _Request:
        # A checkpoint is trusted less than code: re-validate what would go on the wire.
        has_features = d["features"] is not None
        items: dict[str, bytes | None]
        if has_features:
            req = _FEATURES.validate_python(d["features"])
            items = dict(_features_parts(req, [(_ID.validate_python(iid),
                                                _FEATURES.validate_python(f))
                                               for iid, f in d["items"]]))
        else:
            req, items = None, {_ID.validate_python(iid): None for iid, _ in d["items"]}
        rec = cls(_ID.validate_python(d["request_id"]), float(d["ts"]),
                  _ID.validate_python(d["user_id"]), int(d["model_version"]), int(d["seq"]),
                  None if req is None else _encode(req),
                  _context_part(None if d["context"] is None
                                else BanditContext.model_validate(d["context"])),
                  items)
        explored = d.get("explored")
        if explored:
            rec.explored = frozenset(_ID.validate_python(i) for i in explored) & items.keys()
        rec.clicks = d["clicks"]
        rec.open = bool(d["open"])
        return rec


_FEATURES: TypeAdapter[dict[str, Any]] = TypeAdapter(Features)
_ID: TypeAdapter[str] = TypeAdapter(Id)


# --------------------------------------------------------------------------------------------
# the joiner


class Joiner:
    """Joins impressions and clicks in event time into labeled examples. See the module doc.

    ``window_s``: attribution window; a click at ``ts < impression.ts + window_s`` is a positive.
    ``negative_sample_rate``: probability a negative is kept (deterministic per event id).
    ``max_pending``: bound on shown items waiting; beyond it the oldest requests are closed early
    and their unclicked items emitted as negatives (by the next :meth:`advance`).
    ``emit_late_corrections``: a click after its window also emits a positive ``"...:late"``
    (the item keeps its negative; the trainer sees a fake negative followed by the correction).
    ``tombstone_s``/``max_tombstones``: how long (event time after the window) and how many
    closed requests and click ids are remembered, so late duplicates are recognised as such.
    ``max_join_delays``: bound on the join-delay buffer between :meth:`drain_join_delays` calls.
    """

    def __init__(self, window_s: float, negative_sample_rate: float = 1.0,
                 max_pending: int = 2_000_000, seed: int = 0, *,
                 emit_late_corrections: bool = False, tombstone_s: float | None = None,
                 max_tombstones: int = 200_000, max_join_delays: int = 1_000_000) -> None:
        if not (window_s > 0 and math.isfinite(window_s)):
            raise ValueError(f"window_s must be positive and finite, got {window_s!r}")
        log_odds_correction(negative_sample_rate)  # validates the rate
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending!r}")
        if max_tombstones < 0 or max_join_delays < 1:
            raise ValueError("max_tombstones must be >= 0 and max_join_delays >= 1")
        self.window_s = float(window_s)
        self.negative_sample_rate = float(negative_sample_rate)
        self.max_pending = int(max_pending)
        self.seed = int(seed)
        self.emit_late_corrections = bool(emit_late_corrections)
        self.tombstone_s = float(window_s if tombstone_s is None else tombstone_s)
        if not self.tombstone_s >= 0:
            raise ValueError(f"tombstone_s must be >= 0, got {tombstone_s!r}")
        self.max_tombstones = int(max_tombstones)
        self.max_join_delays = int(max_join_delays)

        self._watermark = -math.inf
        # Newest ts among forgotten tombstones: an unknown request at or before it might be a
        # redelivery we can no longer recognise, so it is dropped rather than labeled twice.
        self._forgotten_ts = -math.inf
        self._seq = 0
        self._counts = JoinerCounts()
        self._pending = 0  # shown items in open records
        # request_id -> record, open or tombstoned: one lookup answers join/late/duplicate.
        self._requests: dict[str, _Request] = {}
        # (deadline, seq, record) of open records; deadline = ts + window_s.
        self._heap: list[tuple[float, int, _Request]] = []
        # Closed records in closing order; pruned from the left by age and count.
        self._tombs: deque[_Request] = deque()
        # user_id -> records (open and tombstoned) for clicks that carry no request_id.
        self._by_user: dict[str, list[_Request]] = {}
        # click event_id -> event time when seen (insertion order ~ time order).
        self._click_ids: dict[str, float] = {}
        # Negatives of early-evicted requests, emitted by the next advance().
        self._ready: list[Label] = []
        self._delays: list[float] = []

    # -- inspection ---------------------------------------------------------------------------

    @property
    def watermark(self) -> float:
        """The event-time watermark (``-inf`` before the first :meth:`advance`)."""
        return self._watermark

    @property
    def pending(self) -> int:
        """Shown items waiting in the window."""
        return self._pending

    def exploration_counts(self) -> tuple[int, int, int, int]:
        """Cumulative ``(shown_explored, shown_exploited, clicked_explored, clicked_exploited)``
        over closed windows (cheaper than :meth:`counts` for a per-tick metrics refresh)."""
        c = self._counts
        return c.shown_explored, c.shown_exploited, c.clicked_explored, c.clicked_exploited

    def counts(self) -> JoinerCounts:
        """A copy of the outcome counters, with ``pending`` filled in."""
        c = JoinerCounts(**asdict(self._counts))
        c.pending = self._pending
        return c

    def drain_join_delays(self) -> np.ndarray:
        """Event-time delays (s) from impression to each emitted example since the last drain.

        Positives: ``click.ts - impression.ts``; negatives: ``watermark - impression.ts`` at
        emission (>= window_s unless evicted early). Bounded: when the buffer overflows, the
        oldest half is dropped, so drain at least as often as metrics are scraped.
        """
        out = np.asarray(self._delays, dtype=np.float64)
        self._delays = []
        return out

    # -- input --------------------------------------------------------------------------------

    def add_impression(self, imp: AnyImpression) -> None:
        """Open the window for every item shown by one response.

        A request id seen before (open or still tombstoned) is a redelivery: dropped and
        counted. An unknown request no newer than the newest forgotten tombstone is dropped as
        ``impressions_too_late``: it may be a redelivery whose tombstone was pruned, and a
        second label would break exactly-once (its window is long closed anyway).

        Raises :class:`EventRejected` if merging request and item features would exceed the wire
        limit, because the emitted examples would then be rejected by the trainer.
        """
        rid = imp.request_id
        if rid in self._requests:
            self._counts.duplicate_impressions += 1
            return
        if imp.ts <= self._forgotten_ts:
            self._counts.impressions_too_late += 1
            return
        n_req = len(imp.features)
        if n_req:
            for it in imp.items:
                if (n_req + len(it.features) > MAX_FEATURES
                        and len(imp.features | it.features) > MAX_FEATURES):
                    self._counts.impressions_rejected += 1
                    raise EventRejected(
                        f"items.{it.item_id}.features: request and item features merge to more "
                        f"than {MAX_FEATURES} keys")
        items = _features_parts(imp.features, [(it.item_id, it.features) for it in imp.items])
        seq = self._seq
        self._seq = seq + 1
        explored = frozenset(it.item_id for it in imp.items if it.explored)
        rec = _Request(rid, imp.ts, imp.user_id, imp.model_version, seq, _encode(imp.features),
                       _context_part(imp.context), items, explored or None)
        self._requests[rid] = rec
        heapq.heappush(self._heap, (imp.ts + self.window_s, seq, rec))
        by_user = self._by_user.get(imp.user_id)
        if by_user is None:
            self._by_user[imp.user_id] = [rec]
        else:
            by_user.append(rec)
        self._pending += len(items)
        self._counts.impressions += 1
        if self._pending > self.max_pending:
            self._evict()

    def join_click(self, click: AnyClick) -> ClickResult:
        """Attribute one click to its shown item and say what happened.

        With a ``request_id`` the key is ``(request_id, item_id)``; without, the most recent
        impression of ``(user_id, item_id)`` at or before the click (or, if the click's clock is
        behind, the earliest after it). Joined clicks emit their positive now.
        """
        c = self._counts
        cid = click.event_id
        if cid in self._click_ids:
            c.clicks_duplicate += 1
            return ClickResult(ClickOutcome.DUPLICATE, [])
        # Age click ids by the watermark when seen (the click's own ts before the first advance),
        # so pruning from the front of the insertion-ordered dict is pruning the oldest.
        wm = self._watermark
        self._click_ids[cid] = wm if wm != -math.inf else click.ts
        iid = click.item_id
        rid = click.request_id
        rec = self._requests.get(rid) if rid is not None else self._find_for_user(click)
        if rec is None or iid not in rec.items:
            c.clicks_orphan += 1
            return ClickResult(ClickOutcome.ORPHAN, [])
        clicks = rec.clicks
        if clicks is None:
            clicks = rec.clicks = {}
        in_window = rec.open and click.ts < rec.ts + self.window_s
        state = clicks.get(iid)
        # A late click seen first does not hide an in-window click that arrives after it (out of
        # order), as long as the item is still pending: the label is what happened in the window.
        if state == _CLICKED or (state == _LATE and not in_window):
            c.clicks_duplicate += 1
            return ClickResult(ClickOutcome.DUPLICATE, [], rec.request_id)
        eid = example_id(rec.request_id, iid)
        if in_window:
            clicks[iid] = _CLICKED
            c.clicks_joined += 1
            self._record_delay(max(0.0, click.ts - rec.ts), 1)
            # Positives carry the stream's negative rate too: the log-odds correction applies to
            # every example of a down-sampled stream, not only to the negatives.
            rate = self.negative_sample_rate if self.negative_sample_rate < 1.0 else None
            return ClickResult(ClickOutcome.JOINED,
                               [self._positive(rec, iid, eid, click.ts, rate)], rec.request_id)
        clicks[iid] = _LATE
        c.clicks_late += 1
        if not (self.emit_late_corrections and rec.features is not None):
            return ClickResult(ClickOutcome.LATE, [], rec.request_id)
        c.late_corrections += 1
        eid = eid + _LATE_SUFFIX
        if len(eid) > MAX_ID_LEN:
            eid = _hashed_id(eid)
        self._record_delay(max(0.0, click.ts - rec.ts), 1)
        return ClickResult(ClickOutcome.LATE, [self._positive(rec, iid, eid, click.ts, None)],
                           rec.request_id)

    def add_click(self, click: AnyClick) -> list[LabeledEventMsg]:
        """:meth:`join_click`, returning only the events (use ``join_click`` to dead-letter)."""
        return self.join_click(click).events

    def advance(self, now: float) -> list[LabeledEventMsg]:
        """:meth:`advance_labels`, as structs."""
        return decode_labels(self.advance_labels(now))

    def advance_labels(self, now: float) -> list[Label]:
        """Move the watermark to ``now`` and emit the negatives whose window closed.

        ``now`` is the event time below which no more input is expected (max event time seen
        minus allowed lateness). A smaller value than the current watermark is ignored: the
        watermark only moves forward. Also returns negatives of requests evicted early by
        ``max_pending`` since the last call, and prunes tombstones.
        """
        if now > self._watermark:
            self._watermark = now
        wm = self._watermark
        out = self._ready
        self._ready = []
        heap = self._heap
        while heap and heap[0][0] <= wm:
            self._close(heapq.heappop(heap)[2], wm, out)
        self._prune(wm)
        return out

    # -- internals ----------------------------------------------------------------------------

    def _find_for_user(self, click: AnyClick) -> _Request | None:
        recs = self._by_user.get(click.user_id)
        if not recs:
            return None
        iid, t = click.item_id, click.ts
        before: _Request | None = None
        after: _Request | None = None
        for rec in recs:
            if iid not in rec.items:
                continue
            if rec.ts <= t:
                if before is None or (rec.ts, rec.seq) > (before.ts, before.seq):
                    before = rec
            elif after is None or (rec.ts, rec.seq) < (after.ts, after.seq):
                after = rec
        return before if before is not None else after

    @staticmethod
    def _positive(rec: _Request, iid: str, eid: str, ts: float, sample_rate: float | None
                  ) -> Label:
        part = rec.items[iid]
        assert part is not None
        tpl = _LabelTemplate(rec, ts, 1, sample_rate)
        return tpl.key, tpl.value(eid, iid, part)

    def _close(self, rec: _Request, now: float, out: list[Label]) -> int:
        """Emit the negatives of one record and turn it into a tombstone; returns items closed."""
        items = rec.items
        clicks = rec.clicks
        rate = self.negative_sample_rate
        sampled = rate < 1.0
        sample_rate = rate if sampled else None
        seed = self.seed
        # Label time: when the negative became certain. Independent of the advance() cadence,
        # so a restored joiner and an uninterrupted one emit identical events.
        ts = rec.ts + self.window_s
        rid = rec.request_id
        tpl = _LabelTemplate(rec, ts, 0, sample_rate)
        # _LabelTemplate.value inlined: this loop runs once per shown item.
        key, middle, label, tail = tpl.key, tpl.middle, tpl.label, tpl.tail
        append, threshold, encode = out.append, rate * _U64, _encode
        emitted = dropped = 0
        for iid, part in items.items():  # open records: item id -> its features part
            if clicks is not None and clicks.get(iid) == _CLICKED:
                continue
            eid = f"{rid}:{iid}"
            if len(eid) > MAX_ID_LEN:
                eid = _hashed_id(eid)
            if sampled and xxhash.xxh64_intdigest(eid.encode(), seed) >= threshold:
                dropped += 1
                continue
            append((key, _LABEL % (encode(eid), middle, encode(iid), label, part, tail)))
            emitted += 1
        c = self._counts
        c.negatives_emitted += emitted
        c.negatives_dropped_by_sampling += dropped
        n_explored = clicked_explored = 0
        if rec.explored is not None:
            n_explored = len(rec.explored)
            if clicks is not None:
                clicked_explored = sum(clicks.get(i) == _CLICKED for i in rec.explored)
        c.shown_explored += n_explored
        c.shown_exploited += len(items) - n_explored
        c.clicked_explored += clicked_explored
        c.clicked_exploited += len(items) - emitted - dropped - clicked_explored
        if emitted:
            self._record_delay(max(0.0, now - rec.ts), emitted)
        n = len(items)
        self._pending -= n
        rec.close(keep_features=self.emit_late_corrections)
        self._tombs.append(rec)
        return n

    def _evict(self) -> None:
        heap = self._heap
        wm = self._watermark
        while self._pending > self.max_pending and heap:
            self._counts.evicted_early += self._close(heapq.heappop(heap)[2], wm, self._ready)
        self._prune(wm)

    def _prune(self, wm: float) -> None:
        horizon = self.window_s + self.tombstone_s
        tombs, cap = self._tombs, self.max_tombstones
        while tombs and (len(tombs) > cap or tombs[0].ts + horizon <= wm):
            rec = tombs.popleft()
            if rec.ts > self._forgotten_ts:
                self._forgotten_ts = rec.ts
            if self._requests.get(rec.request_id) is rec:
                del self._requests[rec.request_id]
            recs = self._by_user.get(rec.user_id)
            if recs is not None:
                recs.remove(rec)
                if not recs:
                    del self._by_user[rec.user_id]
        ids = self._click_ids
        while ids:
            cid, seen = next(iter(ids.items()))
            if len(ids) <= cap and seen + horizon > wm:
                break
            del ids[cid]

    def _record_delay(self, delay: float, n: int) -> None:
        d = self._delays
        if n == 1:
            d.append(delay)
        else:
            d.extend([delay] * n)
        if len(d) > self.max_join_delays:
            del d[: len(d) - self.max_join_delays // 2]

    # -- crash safety -------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {
            "window_s": self.window_s, "negative_sample_rate": self.negative_sample_rate,
            "max_pending": self.max_pending, "seed": self.seed,
            "emit_late_corrections": self.emit_late_corrections,
            "tombstone_s": self.tombstone_s, "max_tombstones": self.max_tombstones,
            "max_join_delays": self.max_join_delays,
        }

    def state(self) -> bytes:
        """Everything needed to continue exactly where this joiner is, as JSON bytes.

        Open records (whole impressions plus click flags), tombstones, click ids, the watermark,
        counters and not-yet-returned evictions. JSON rather than pickle so a checkpoint is
        inspectable and cannot execute code on load. Join delays are metrics, not state.
        """
        open_recs = sorted((e[2] for e in self._heap), key=lambda r: r.seq)
        wm = self._watermark
        return orjson.dumps({
            "version": STATE_VERSION,
            "config": self._config(),
            "watermark": None if wm == -math.inf else wm,
            "forgotten_ts": None if self._forgotten_ts == -math.inf else self._forgotten_ts,
            "seq": self._seq,
            "counts": asdict(self._counts),
            "open": [r.to_json() for r in open_recs],
            "tombstones": [r.to_json() for r in self._tombs],
            "click_ids": list(self._click_ids.items()),
            "ready": [orjson.loads(value) for _, value in self._ready],
        })

    @classmethod
    def restore(cls, data: bytes, *, window_s: float | None = None,
                negative_sample_rate: float | None = None, max_pending: int | None = None,
                seed: int | None = None, emit_late_corrections: bool | None = None,
                tombstone_s: float | None = None, max_tombstones: int | None = None,
                max_join_delays: int | None = None) -> Joiner:
        """Rebuild a joiner from :meth:`state`; keyword arguments override the saved config.

        Overriding the rate or seed changes the sampling decisions of negatives not yet emitted;
        overriding the window re-times every open request.
        """
        doc = orjson.loads(data)
        if doc.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported joiner state version {doc.get('version')!r}")
        cfg = dict(doc["config"])
        overrides = {"window_s": window_s, "negative_sample_rate": negative_sample_rate,
                     "max_pending": max_pending, "seed": seed,
                     "emit_late_corrections": emit_late_corrections, "tombstone_s": tombstone_s,
                     "max_tombstones": max_tombstones, "max_join_delays": max_join_delays}
        cfg.update({k: v for k, v in overrides.items() if v is not None})
        j = cls(**cfg)
        wm = doc["watermark"]
        j._watermark = -math.inf if wm is None else float(wm)
        ft = doc["forgotten_ts"]
        j._forgotten_ts = -math.inf if ft is None else float(ft)
        j._seq = int(doc["seq"])
        known = {f.name for f in fields(JoinerCounts)}
        j._counts = JoinerCounts(**{k: v for k, v in doc["counts"].items() if k in known})
        records: list[_Request] = []
        for t in doc["tombstones"]:
            rec = _Request.from_json(t)
            j._tombs.append(rec)
            records.append(rec)
        for o in doc["open"]:
            rec = _Request.from_json(o)
            j._heap.append((rec.ts + j.window_s, rec.seq, rec))
            j._pending += len(rec.items)
            records.append(rec)
        heapq.heapify(j._heap)
        for rec in sorted(records, key=lambda r: r.seq):
            j._requests[rec.request_id] = rec
            j._by_user.setdefault(rec.user_id, []).append(rec)
        j._click_ids = {cid: float(seen) for cid, seen in doc["click_ids"]}
        ready = [msgspec.convert(e, LabeledEventMsg) for e in doc["ready"]]
        j._ready = [(e.user_id.encode(), e.to_json()) for e in ready]
        return j
