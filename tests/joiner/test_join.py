"""The online joiner: exactly-once labels, windows, sampling + calibration, bounds, recovery."""

from __future__ import annotations

import math
import random

import msgspec
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featurestore.events import (
    BanditContext,
    Click,
    EventRejected,
    Impression,
    LabeledEvent,
    ShownItem,
    parse_labeled_event,
)
from joiner.join import (
    ClickOutcome,
    Joiner,
    example_id,
    keep_negative,
    log_odds_correction,
)

CTX = BanditContext(clusters=[3, 7], weights=[0.75, 0.25])


def imp(rid: str, ts: float, items: list[str], user: str = "u1",
        features: dict | None = None, item_features: dict | None = None) -> Impression:
    return Impression(
        request_id=rid, ts=ts, user_id=user, model_version=7, context=CTX,
        features=features if features is not None else {"age": "25", "hour": 13},
        items=[ShownItem(item_id=i, position=p, score=1.0 - p / 10, pctr=0.1,
                         features=(item_features or {}).get(i, {"genres": ["Drama"]}))
               for p, i in enumerate(items)])


def click(cid: str, ts: float, item: str, rid: str | None, user: str = "u1") -> Click:
    return Click(event_id=cid, ts=ts, user_id=user, item_id=item, request_id=rid)


def key(e: LabeledEvent) -> tuple[str, str]:
    return (e.request_id or "", e.item_id)


# --- basic semantics -------------------------------------------------------------------------


def test_click_inside_window_emits_positive_at_once_and_suppresses_negative():
    j = Joiner(window_s=60)
    j.add_impression(imp("r1", 100.0, ["a", "b", "c"]))
    res = j.join_click(click("c1", 130.0, "b", "r1"))
    assert res.outcome is ClickOutcome.JOINED and res.request_id == "r1"
    [pos] = res.events
    assert (pos.event_id, pos.label, pos.ts, pos.user_id) == ("r1:b", 1, 130.0, "u1")
    assert msgspec.to_builtins(pos.context) == CTX.model_dump()
    assert j.advance(159.9) == []  # window is [ts, ts + window_s)
    negs = j.advance(160.0)
    assert [(e.event_id, e.label, e.ts) for e in negs] == [("r1:a", 0, 160.0), ("r1:c", 0, 160.0)]
    c = j.counts()
    assert (c.impressions, c.clicks_joined, c.negatives_emitted, c.pending) == (1, 1, 2, 0)


def test_item_features_win_over_request_features_on_conflict():
    j = Joiner(window_s=10)
    j.add_impression(imp("r1", 0.0, ["a", "b"], features={"hour": 13, "age": "25"},
                         item_features={"a": {"hour": 99, "genres": ["X"]}, "b": {}}))
    [pos] = j.add_click(click("c", 1.0, "a", "r1"))
    assert pos.features == {"hour": 99, "age": "25", "genres": ["X"]}
    [neg] = j.advance(10.0)
    assert neg.features == {"hour": 13, "age": "25"}


def test_emitted_events_survive_wire_validation():
    # The joiner builds events without re-validating; they must still be valid on the wire.
    j = Joiner(window_s=10, negative_sample_rate=0.999999)
    j.add_impression(imp("r1", 5.0, ["a", "b"]))
    out = j.add_click(click("c", 6.0, "a", "r1")) + j.advance(100.0)
    assert len(out) == 2
    for e in out:
        assert parse_labeled_event(e.to_json()) == e
        # ... by both schemas: the hot path's and the HTTP contract's
        assert LabeledEvent.model_validate_json(e.to_json()).to_json() == e.to_json()


def test_long_ids_get_a_hashed_event_id_within_the_wire_limit():
    rid, iid = "r" * 128, "i" * 128
    j = Joiner(window_s=10)
    j.add_impression(imp(rid, 0.0, [iid]))
    [e] = j.advance(10.0)
    assert e.event_id == example_id(rid, iid) and len(e.event_id) <= 128
    assert parse_labeled_event(e.to_json()) == e


def test_merged_features_over_the_limit_are_rejected_on_impression():
    j = Joiner(window_s=10)
    req = {f"r{i}": i for i in range(40)}
    items = {"a": {f"i{i}": i for i in range(30)}}
    with pytest.raises(EventRejected, match="features"):
        j.add_impression(imp("r1", 0.0, ["a"], features=req, item_features=items))
    assert j.counts().impressions_rejected == 1 and j.pending == 0


def test_item_listed_twice_in_one_response_is_one_shown_item():
    j = Joiner(window_s=10)
    j.add_impression(imp("r1", 0.0, ["a", "b", "a"]))
    assert j.pending == 2
    assert [e.item_id for e in j.advance(10.0)] == ["a", "b"]


def test_click_without_request_id_joins_most_recent_impression_of_user_and_item():
    j = Joiner(window_s=100)
    j.add_impression(imp("r1", 10.0, ["a", "b"]))
    j.add_impression(imp("r2", 20.0, ["a"]))
    j.add_impression(imp("r3", 30.0, ["b"]))
    j.add_impression(imp("rx", 25.0, ["a"], user="u2"))  # other user: never chosen
    j.add_impression(imp("r4", 90.0, ["a"]))  # after the click: not what was clicked
    res = j.join_click(click("c1", 40.0, "a", None))
    assert res.outcome is ClickOutcome.JOINED and res.request_id == "r2"
    assert res.events[0].event_id == "r2:a"
    # A second click on the same shown item is a duplicate, not a click on an older impression.
    assert j.join_click(click("c2", 41.0, "a", None)).outcome is ClickOutcome.DUPLICATE
    # Click clock behind the server's: fall back to the earliest impression after it.
    assert j.join_click(click("c3", 5.0, "b", None)).request_id == "r1"


# --- duplicates, orphans, late clicks --------------------------------------------------------


def test_duplicate_impressions_and_clicks_are_dropped_and_counted():
    j = Joiner(window_s=60)
    j.add_impression(imp("r1", 0.0, ["a", "b"]))
    j.add_impression(imp("r1", 0.0, ["a", "b"]))
    assert len(j.add_click(click("c1", 1.0, "a", "r1"))) == 1
    assert j.add_click(click("c1", 1.0, "a", "r1")) == []  # same click redelivered
    assert j.add_click(click("c2", 2.0, "a", "r1")) == []  # second click, same shown item
    out = j.advance(60.0)
    assert [e.event_id for e in out] == ["r1:b"]
    # After the window closed the tombstone still recognises redeliveries.
    j.add_impression(imp("r1", 0.0, ["a", "b"]))
    assert j.join_click(click("c1", 1.0, "a", "r1")).outcome is ClickOutcome.DUPLICATE
    assert j.join_click(click("c3", 3.0, "a", "r1")).outcome is ClickOutcome.DUPLICATE
    c = j.counts()
    assert (c.duplicate_impressions, c.clicks_duplicate, c.clicks_joined) == (2, 4, 1)
    assert j.advance(1e9) == []


def test_orphan_clicks_are_reported_for_dead_lettering():
    j = Joiner(window_s=60)
    j.add_impression(imp("r1", 0.0, ["a"]))
    for clk in (click("c1", 1.0, "zzz", "r1"),  # item not shown in that request
                click("c2", 1.0, "a", "nope"),  # unknown request
                click("c3", 1.0, "a", None, user="stranger")):  # no impression for the user
        res = j.join_click(clk)
        assert res.outcome is ClickOutcome.ORPHAN and res.events == []
    assert j.join_click(click("c2", 1.0, "a", "nope")).outcome is ClickOutcome.DUPLICATE
    assert j.counts().clicks_orphan == 3


@pytest.mark.parametrize("corrections", [False, True])
def test_late_clicks_are_counted_and_optionally_corrected(corrections):
    j = Joiner(window_s=60, emit_late_corrections=corrections)
    j.add_impression(imp("r1", 0.0, ["a", "b"]))
    # Late in event time while still pending: the item keeps its negative.
    res_a = j.join_click(click("c1", 61.0, "a", "r1"))
    negs = j.advance(60.0)
    assert sorted(e.event_id for e in negs) == ["r1:a", "r1:b"]
    # Inside the window in event time, but after the watermark closed it: late too.
    res_b = j.join_click(click("c2", 30.0, "b", "r1"))
    for res in (res_a, res_b):
        assert res.outcome is ClickOutcome.LATE
        if corrections:
            [e] = res.events
            assert e.label == 1 and e.event_id.endswith(":late") and e.features
            assert parse_labeled_event(e.to_json()) == e
        else:
            assert res.events == []
    assert j.join_click(click("c3", 31.0, "b", "r1")).outcome is ClickOutcome.DUPLICATE
    c = j.counts()
    assert (c.clicks_late, c.late_corrections) == (2, 2 if corrections else 0)


def test_redelivery_after_tombstone_is_forgotten_is_dropped_not_labeled_twice():
    j = Joiner(window_s=10, tombstone_s=5)
    j.add_impression(imp("r1", 0.0, ["a"]))
    assert len(j.advance(10.0)) == 1
    j.add_impression(imp("r2", 12.0, ["a"]))
    j.advance(15.0)  # r1's tombstone is forgotten at ts + window + tombstone_s
    j.add_impression(imp("r1", 0.0, ["a"]))
    j.add_impression(imp("r0", -0.0, ["a"]))  # unknown but older than a forgotten one: too
    assert j.advance(1e9)[0].request_id == "r2"
    c = j.counts()
    assert (c.impressions, c.impressions_too_late, c.duplicate_impressions) == (2, 2, 0)


def test_tombstones_are_bounded_in_time_and_count():
    j = Joiner(window_s=10, tombstone_s=5, max_tombstones=3)
    for i in range(5):
        j.add_impression(imp(f"r{i}", float(i), ["a"]))
    j.advance(14.0)  # closes r0..r4, keeps the 3 newest tombstones
    assert j.join_click(click("c0", 1.0, "a", "r0")).outcome is ClickOutcome.ORPHAN
    assert j.join_click(click("c4", 1.0, "a", "r4")).outcome is ClickOutcome.LATE
    j.advance(10.0 + 5 + 4)  # r4's tombstone expires at ts + window + tombstone_s
    assert j.join_click(click("c5", 1.0, "a", "r4")).outcome is ClickOutcome.ORPHAN


# --- exactly once under at-least-once input --------------------------------------------------


@st.composite
def streams(draw):
    """Impressions, clicks (some on unshown items, some late, some without request id),
    redeliveries of both, and watermark advances, in an arbitrary interleaving."""
    n_req = draw(st.integers(1, 8))
    msgs: list[tuple] = []
    for r in range(n_req):
        ts = draw(st.floats(0, 100, allow_nan=False))
        items = draw(st.lists(st.sampled_from("abcdef"), min_size=1, max_size=4, unique=True))
        user = draw(st.sampled_from(["u1", "u2"]))
        msgs.append(("imp", imp(f"r{r}", ts, items, user=user)))
        for i, item in enumerate(draw(st.lists(st.sampled_from("abcdefg"), max_size=3))):
            dt = draw(st.floats(0, 30, allow_nan=False))
            rid = draw(st.sampled_from([f"r{r}", f"r{r}", None]))
            msgs.append(("click", click(f"c{r}.{i}", ts + dt, item, rid, user=user)))
    for _ in range(draw(st.integers(0, 6))):
        msgs.append(draw(st.sampled_from(msgs)))  # redelivery
    for _ in range(draw(st.integers(0, 5))):
        msgs.append(("advance", draw(st.floats(0, 140, allow_nan=False))))
    order = draw(st.permutations(range(len(msgs))))
    return [msgs[i] for i in order]


def run(j: Joiner, msgs: list[tuple], end: float | None = 1e9) -> list[LabeledEvent]:
    out: list[LabeledEvent] = []
    for kind, m in msgs:
        if kind == "imp":
            j.add_impression(m)
        elif kind == "click":
            out += j.add_click(m)
        else:
            out += j.advance(m)
    if end is not None:
        out += j.advance(end)
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_each_shown_item_gets_exactly_one_label_under_redelivery(msgs):
    window = 20.0
    j = Joiner(window_s=window)
    out = run(j, msgs)
    labels = [e for e in out if not e.event_id.endswith(":late")]
    keys = [key(e) for e in labels]
    assert len(keys) == len(set(keys)), "a shown item was labeled twice"
    assert len({e.event_id for e in labels}) == len(labels)

    # Every distinct shown item got a label, and it is positive exactly for the items whose
    # first attributed click arrived inside the window while the item was still pending.
    # Exception: a request first delivered after its tombstone could have been forgotten is
    # dropped whole (counted), since it cannot be told apart from a redelivery.
    c = j.counts()
    labeled_rids = {rid for rid, _ in keys}
    shown = {(m.request_id, it.item_id) for k, m in msgs if k == "imp" for it in m.items
             if m.request_id in labeled_rids}
    assert set(keys) == shown
    all_rids = {m.request_id for k, m in msgs if k == "imp"}
    assert len(all_rids - labeled_rids) <= c.impressions_too_late
    if c.impressions_too_late == 0:
        assert labeled_rids == all_rids
    positives = {key(e) for e in labels if e.label == 1}
    assert len(positives) == c.clicks_joined
    assert c.negatives_emitted == len(shown) - len(positives)
    assert c.pending == 0 and c.negatives_dropped_by_sampling == 0

    n_imp = sum(k == "imp" for k, _ in msgs)
    n_click = sum(k == "click" for k, _ in msgs)
    assert c.impressions + c.duplicate_impressions + c.impressions_too_late == n_imp
    assert c.impressions == len(labeled_rids)
    assert c.clicks_joined + c.clicks_duplicate + c.clicks_orphan + c.clicks_late == n_click

    # Oracle for clicks with a request id: joined iff after the impression, before the
    # watermark closed the window, and inside the window in event time.
    first_imp: dict[str, tuple[int, Impression]] = {}
    closed_at: dict[str, int] = {}
    wm = -math.inf
    for idx, (k, m) in enumerate(msgs):
        if k == "imp":
            first_imp.setdefault(m.request_id, (idx, m))
        elif k == "advance":
            wm = max(wm, m)
        for rid, (_, im) in first_imp.items():
            if rid not in closed_at and im.ts + window <= wm:
                closed_at[rid] = idx
    seen_clicks: set[str] = set()
    for idx, (k, m) in enumerate(msgs):
        if k != "click" or m.event_id in seen_clicks:
            continue
        seen_clicks.add(m.event_id)
        if m.request_id is None or m.request_id not in labeled_rids:
            continue
        i0, im = first_imp[m.request_id]
        in_time = (i0 < idx < closed_at.get(m.request_id, math.inf)
                   and m.ts < im.ts + window and m.item_id in {it.item_id for it in im.items})
        if in_time:
            assert (m.request_id, m.item_id) in positives


@settings(max_examples=100, deadline=None)
@given(streams(), st.floats(0.05, 0.95))
def test_sampling_keeps_at_most_one_label_and_accounts_for_every_item(msgs, rate):
    j = Joiner(window_s=20.0, negative_sample_rate=rate)
    out = run(j, msgs)
    keys = [key(e) for e in out]
    assert len(keys) == len(set(keys))
    c = j.counts()
    shown = {(m.request_id, it.item_id) for k, m in msgs if k == "imp" for it in m.items}
    accounted = c.clicks_joined + c.negatives_emitted + c.negatives_dropped_by_sampling
    if c.impressions_too_late == 0:
        assert accounted == len(shown)
    else:
        assert accounted <= len(shown)  # too-late ones may have been redeliveries
    assert all(e.sample_rate == rate for e in out if e.label == 0)
    assert all(e.sample_rate == rate for e in out if e.label == 1)  # correction applies to all


# --- down-sampling and calibration -----------------------------------------------------------


def test_negative_sampling_rate_is_honoured_and_deterministic():
    rate, n = 0.2, 20_000
    decisions = []
    for seed in (0, 0, 1):
        j = Joiner(window_s=1, negative_sample_rate=rate, seed=seed)
        for r in range(n // 10):
            j.add_impression(imp(f"r{r}", 0.0, [f"i{k}" for k in range(10)]))
        out = j.advance(1.0)
        decisions.append({e.event_id for e in out})
        c = j.counts()
        assert c.negatives_emitted + c.negatives_dropped_by_sampling == n
        # Binomial(20000, 0.2): sd ~ 57, so 5 sd is 0.014 of the rate.
        assert abs(c.negatives_emitted / n - rate) < 0.015
        assert {e.sample_rate for e in out} == {rate}
    assert decisions[0] == decisions[1], "a replay must make the same sampling decisions"
    assert decisions[0] != decisions[2], "the seed must matter"
    assert all(keep_negative(eid, rate, 0) for eid in decisions[0])


def test_log_odds_correction_values():
    assert log_odds_correction(1.0) == 0.0
    assert log_odds_correction(0.1) == pytest.approx(math.log(0.1))
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            log_odds_correction(bad)


@pytest.mark.parametrize("rate", [0.5, 0.1, 0.03])
def test_log_odds_correction_recovers_true_click_probability(rate):
    """Simulated stream with known p per segment: the logit fit on the down-sampled training
    counts, plus the correction, gives back p; uncorrected it is badly inflated."""
    rng = np.random.default_rng(7)
    true_p = {"s0": 0.01, "s1": 0.05, "s2": 0.2}
    j = Joiner(window_s=10, negative_sample_rate=rate)
    n_req = 60_000
    out: list[LabeledEvent] = []
    for r in range(n_req):
        seg = f"s{r % 3}"
        ts = r * 0.001
        j.add_impression(imp(f"r{r}", ts, [seg]))
        if rng.random() < true_p[seg]:
            out += j.add_click(click(f"c{r}", ts + 1.0, seg, f"r{r}"))
        if r % 1000 == 0:
            out += j.advance(ts - 2.0)
    out += j.advance(1e9)
    for seg, p in true_p.items():
        pos = sum(1 for e in out if e.item_id == seg and e.label == 1)
        neg = sum(1 for e in out if e.item_id == seg and e.label == 0)
        logit_trained = math.log(pos / neg)  # the logistic MLE of one-parameter segment model
        corrected = 1 / (1 + math.exp(-(logit_trained + log_odds_correction(rate))))
        # Tolerance: 4 standard errors of the corrected estimate (delta method on log-odds).
        se_logit = math.sqrt(1 / pos + 1 / neg)
        tol = 4 * se_logit * p * (1 - p)
        assert abs(corrected - p) < tol, (seg, corrected, p, tol)
        naive = pos / (pos + neg)
        if rate <= 0.1:
            assert naive > 1.5 * p  # without correction the model would be miscalibrated
        # Importance weighting by 1/sample_rate gives the same estimate.
        weighted = pos / (pos + sum(1 / e.sample_rate for e in out
                                    if e.item_id == seg and e.label == 0))
        assert weighted == pytest.approx(corrected, rel=1e-9)


# --- memory bound ------------------------------------------------------------------------------


def test_max_pending_evicts_oldest_requests_as_negatives():
    j = Joiner(window_s=1000, max_pending=10)
    for r in range(5):
        j.add_impression(imp(f"r{r}", float(r), ["a", "b", "c"]))
        assert j.pending <= 10
    j.add_click(click("c", 0.5, "a", "r0"))  # r0 was evicted already: too late
    out = j.advance(0.0)
    assert [e.request_id for e in out] == ["r0"] * 3 + ["r1"] * 3
    c = j.counts()
    assert (c.evicted_early, c.pending, c.clicks_late) == (6, 9, 1)
    # Evicted requests stay recognisable: their redelivery is a duplicate.
    j.add_impression(imp("r0", 0.0, ["a", "b", "c"]))
    assert j.counts().duplicate_impressions == 1


# --- crash safety --------------------------------------------------------------------------


def random_stream(seed: int, n_req: int = 400) -> list[tuple]:
    """Time-ordered impressions and clicks with redeliveries and periodic watermark moves."""
    rng = random.Random(seed)
    msgs: list[tuple] = []
    t = 0.0
    for r in range(n_req):
        t += rng.expovariate(2.0)
        user = f"u{rng.randrange(20)}"
        items = rng.sample([f"m{k}" for k in range(30)], 5)
        im = imp(f"r{r}", t, items, user=user)
        msgs.append((t, "imp", im))
        if rng.random() < 0.05:
            msgs.append((t + rng.uniform(0, 50), "imp", im))  # redelivered later
        for it in items:
            if rng.random() < 0.1:
                ct = t + rng.expovariate(1 / 8)  # some beyond the 20 s window
                clk = click(f"c{r}{it}", ct, it, f"r{r}" if rng.random() < 0.8 else None, user)
                msgs.append((ct, "click", clk))
                if rng.random() < 0.1:
                    msgs.append((ct + rng.uniform(0, 40), "click", clk))
        if rng.random() < 0.02:
            ct = t + 1
            msgs.append((ct, "click", click(f"o{r}", ct, "nope", f"r{r}", user)))  # orphan
    msgs.sort(key=lambda m: m[0])
    out: list[tuple] = []
    for i, (ts, kind, m) in enumerate(msgs):
        out.append((kind, m))
        if i % 25 == 24:
            out.append(("advance", ts - 5.0))  # allowed lateness 5 s
    return out


@pytest.mark.parametrize("config", [
    {},
    {"negative_sample_rate": 0.3, "emit_late_corrections": True},
    {"max_pending": 40, "tombstone_s": 3.0, "max_tombstones": 50},
])
def test_snapshot_restore_mid_window_gives_identical_labels(config):
    msgs = random_stream(seed=11)
    reference_joiner = Joiner(window_s=20.0, seed=5, **config)
    reference = run(reference_joiner, msgs)
    assert any(e.label == 1 for e in reference) and any(e.label == 0 for e in reference)
    for cut in (1, len(msgs) // 3, len(msgs) // 2 + 7, len(msgs) - 2):
        first = Joiner(window_s=20.0, seed=5, **config)
        out = run(first, msgs[:cut], end=None)
        assert first.pending > 0 or cut in (1, len(msgs) - 2)
        blob = first.state()
        assert isinstance(orjson.loads(blob), dict)  # plain JSON, no pickle
        del first  # the crash
        second = Joiner.restore(blob)
        out += run(second, msgs[cut:])
        assert [e.to_json() for e in out] == [e.to_json() for e in reference], cut
        assert second.counts() == reference_joiner.counts()


def test_restore_overrides_config_and_rejects_unknown_versions():
    j = Joiner(window_s=10)
    j.add_impression(imp("r1", 0.0, ["a"]))
    k = Joiner.restore(j.state(), window_s=5)
    assert k.window_s == 5 and [e.ts for e in k.advance(5.0)] == [5.0]
    doc = orjson.loads(j.state())
    doc["version"] = 99
    with pytest.raises(ValueError, match="version"):
        Joiner.restore(orjson.dumps(doc))


# --- watermark and delays ----------------------------------------------------------------------


def test_watermark_is_monotone():
    j = Joiner(window_s=10)
    j.add_impression(imp("r1", 0.0, ["a"]))
    assert j.advance(5.0) == []
    assert j.advance(2.0) == [] and j.watermark == 5.0
    assert len(j.advance(10.0)) == 1


def test_join_delays_are_event_time_from_impression_to_emission():
    j = Joiner(window_s=10)
    j.add_impression(imp("r1", 100.0, ["a", "b"]))
    j.add_click(click("c", 103.0, "a", "r1"))
    j.advance(112.0)
    np.testing.assert_allclose(j.drain_join_delays(), [3.0, 12.0])
    assert j.drain_join_delays().size == 0


def test_invalid_configuration_is_rejected():
    for kwargs in ({"window_s": 0}, {"window_s": 1, "negative_sample_rate": 0},
                   {"window_s": 1, "max_pending": 0}, {"window_s": math.inf}):
        with pytest.raises(ValueError):
            Joiner(**kwargs)


def test_closed_items_are_counted_by_explored_flag_across_a_restore():
    j = Joiner(window_s=60)
    shown = imp("r1", 100.0, ["a", "b", "c", "d"])
    items = [it.model_copy(update={"explored": it.item_id in ("b", "c")}) for it in shown.items]
    j.add_impression(shown.model_copy(update={"items": items}))
    j.join_click(click("c1", 110.0, "b", "r1"))  # an explored item clicked
    j.join_click(click("c2", 111.0, "a", "r1"))  # an exploited item clicked
    j = Joiner.restore(j.state())  # the explored set is part of the open record's state
    assert j.exploration_counts() == (0, 0, 0, 0)  # counted when the window closes
    j.advance(160.0)
    assert j.exploration_counts() == (2, 2, 1, 1)
    c = j.counts()
    assert (c.shown_explored, c.shown_exploited, c.clicked_explored, c.clicked_exploited) == (
        2, 2, 1, 1)
    j.add_impression(imp("r2", 200.0, ["a", "e"]))  # nothing explored, one click
    j.join_click(click("c3", 201.0, "e", "r2"))
    j.advance(300.0)
    assert j.exploration_counts() == (2, 4, 1, 2)
