"""Labels go out as bytes built from per-request parts: they must be, byte for byte, what
``LabeledEventMsg(...).to_json()`` of the joined values gives, whatever the ids and features."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from featurestore.events import (
    BanditContext,
    BanditContextMsg,
    Click,
    Impression,
    LabeledEventMsg,
    ShownItem,
)
from joiner.join import Joiner, example_id

# Ids and feature names with characters JSON escapes, non-ASCII, and lengths around the limit
# where an event id is replaced by its hash.
_ID_CHARS = st.characters(codec="utf-8", exclude_categories=["Cs"])
ids = st.one_of(st.text(_ID_CHARS, min_size=1, max_size=8), st.text("ab\"\\", min_size=60,
                                                                     max_size=128))
names = st.sampled_from(["age", "hour", "genres", "zip", 'q"uote', "é"])
values = st.one_of(st.text(_ID_CHARS, max_size=6), st.integers(-(1 << 63), (1 << 63) - 1),
                   st.floats(allow_nan=False, allow_infinity=False),
                   st.lists(st.text(_ID_CHARS, max_size=4), max_size=3))
features = st.dictionaries(names, values, max_size=4)


@st.composite
def impressions(draw: st.DrawFn) -> Impression:
    items = draw(st.lists(st.tuples(ids, features), min_size=1, max_size=5))
    ctx = draw(st.none() | st.just(BanditContext(clusters=[3, 7], weights=[0.75, 0.25])))
    return Impression(
        request_id=draw(ids), ts=draw(st.floats(0, 4e9)), user_id=draw(ids), model_version=1,
        features=draw(features), context=ctx,
        items=[ShownItem(item_id=i, position=p, score=0.5, pctr=0.1, features=f)
               for p, (i, f) in enumerate(items)])


def expected(imp: Impression, item_id: str, ts: float, label: int, rate: float | None,
             event_id: str | None = None) -> bytes:
    """The label as a struct built from the joined values, encoded the reference way."""
    f = next(it.features for it in imp.items if it.item_id == item_id)
    ctx = None if imp.context is None else BanditContextMsg(list(imp.context.clusters),
                                                            list(imp.context.weights))
    return LabeledEventMsg(event_id or example_id(imp.request_id, item_id), ts, imp.user_id,
                           item_id, label, imp.features | f, imp.request_id, ctx, None,
                           rate).to_json()


@settings(max_examples=150, deadline=None)
@given(impressions(), st.sampled_from([1.0, 0.5]), st.booleans(), st.booleans())
def test_wire_labels_are_the_structs_encoding(imp: Impression, rate: float, clicked: bool,
                                              restored: bool) -> None:
    j = Joiner(window_s=10.0, negative_sample_rate=rate, emit_late_corrections=True)
    j.add_impression(imp)
    if restored:  # a checkpoint in between changes nothing on the wire
        j = Joiner.restore(j.state())
    sampled = rate if rate < 1.0 else None
    first = imp.items[0].item_id
    out = []
    if clicked:
        res = j.join_click(Click(event_id="c1", ts=imp.ts + 1.0, user_id=imp.user_id,
                                 item_id=first, request_id=imp.request_id))
        assert [v for _, v in res.labels] == [expected(imp, first, imp.ts + 1.0, 1, sampled)]
        out += res.labels
    negatives = j.advance_labels(imp.ts + 10.0)
    shown = list(dict.fromkeys(it.item_id for it in imp.items))
    want = [expected(imp, i, imp.ts + 10.0, 0, sampled) for i in shown
            if not (clicked and i == first)]
    assert set(v for _, v in negatives) <= set(want)
    assert len(negatives) + j.counts().negatives_dropped_by_sampling == len(want)
    out += negatives
    late = j.join_click(Click(event_id="c2", ts=imp.ts + 11.0, user_id=imp.user_id,
                              item_id=shown[-1], request_id=imp.request_id))
    if late.labels:  # a late correction carries no sample rate
        eid = example_id(imp.request_id, shown[-1]) + ":late"
        if len(eid) > 128:
            eid = late.events[0].event_id
        assert [v for _, v in late.labels] == [expected(imp, shown[-1], imp.ts + 11.0, 1, None,
                                                        eid)]
        out += late.labels
    assert all(k == imp.user_id.encode() for k, _ in out)
