"""TruncationWatch: when a consumer parked past the end of a partition's log must rewind."""

from __future__ import annotations

from freshrec.kafka import TruncationWatch

KEY = ("events", 0)


def test_a_watermark_growing_below_an_unchanged_position_is_a_truncation() -> None:
    watch = TruncationWatch(stuck_after_s=30)
    assert not watch.observe(KEY, 5000, 10, now=0.0)
    assert not watch.observe(KEY, 5000, 10, now=1.0)
    assert watch.observe(KEY, 5000, 40, now=2.0)


def test_a_short_last_batch_behind_a_trailing_watermark_is_not() -> None:
    """Position 170 after a batch at 150..169 while a watermark reads 151: we received records
    between the checks (the position moved), so the growth proves nothing."""
    watch = TruncationWatch(stuck_after_s=30)
    assert not watch.observe(KEY, 150, 131, now=0.0)
    assert not watch.observe(KEY, 170, 151, now=1.0)
    assert not watch.observe(KEY, 170, 151, now=2.0)
    assert not watch.observe(KEY, 170, 171, now=3.0)  # records arrived: not parked any more
    assert not watch.observe(KEY, 171, 171, now=4.0)


def test_a_watermark_below_the_position_for_the_grace_period_is_a_truncation() -> None:
    watch = TruncationWatch(stuck_after_s=30)
    assert not watch.observe(KEY, 5000, 10, now=0.0)
    assert not watch.observe(KEY, 5000, 10, now=29.0)
    assert watch.observe(KEY, 5000, 10, now=30.0)


def test_a_caught_up_or_unknown_partition_is_never_parked() -> None:
    watch = TruncationWatch(stuck_after_s=0)
    for now in range(5):
        assert not watch.observe(KEY, 100, 100, now=float(now))
        assert not watch.observe(KEY, 100, -1, now=float(now))  # no fetch response yet


def test_a_watermark_that_fell_again_restarts_the_comparison() -> None:
    """A second restart while parked: growth is measured from the lower watermark."""
    watch = TruncationWatch(stuck_after_s=30)
    assert not watch.observe(KEY, 5000, 300, now=0.0)
    assert not watch.observe(KEY, 5000, 0, now=1.0)
    assert watch.observe(KEY, 5000, 20, now=2.0)


def test_partitions_are_watched_separately() -> None:
    watch = TruncationWatch(stuck_after_s=30)
    other = ("events", 1)
    assert not watch.observe(KEY, 5000, 10, now=0.0)
    assert not watch.observe(other, 7, 7, now=0.0)
    assert not watch.observe(other, 9, 9, now=1.0)
    assert watch.observe(KEY, 5000, 11, now=1.0)
