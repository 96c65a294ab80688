"""The event clock: one event time at a time gives the same watermark as arrays of them."""

from __future__ import annotations

import math

import numpy as np

from freshrec.eventclock import EventClock


def test_observe_one_matches_observe_of_arrays() -> None:
    rng = np.random.default_rng(3)
    times = rng.normal(1000.0, 50.0, 600)
    times[[5, 77]] = [math.inf, math.nan]  # not event times: skipped by both
    one, arrays = EventClock(window=64), EventClock(window=64)
    for k, t in enumerate(times):
        assert one.observe_one(float(t)) == arrays.observe([t]), k
    assert one.state() == arrays.state()
    assert np.nanmin(times) < one.now < np.nanmax(times[np.isfinite(times)])
