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


def test_expected_partitions_hold_the_clock_until_they_deliver_or_are_forgotten() -> None:
    from freshrec.eventclock import PartitionedClock

    c = PartitionedClock(window=4)
    c.expect([0, 1])
    assert c.observe(0, 100.0) == float("-inf")  # partition 1 has not delivered yet
    c.forget_empty()
    assert c.now == 100.0
    c.expect([1])
    assert c.now == float("-inf")
    assert c.observe(1, 50.0) == 50.0
    assert c.partition_times() == {0: 100.0, 1: 50.0}
