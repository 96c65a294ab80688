"""Metric semantics: cumulative figures are Counters that follow the tables' totals."""

from __future__ import annotations

from prometheus_client import generate_latest

from freshrec.metrics import TrainerMetrics


def _value(m: TrainerMetrics, line_start: str) -> float:
    for line in generate_latest(m.registry).decode().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_start} not exported")


def test_table_totals_are_counters_that_follow_the_tables() -> None:
    m = TrainerMetrics()
    types = {f.name: f.type for f in m.registry.collect()}
    for name in ("admitted", "evicted", "rejected"):
        assert types[f"freshrec_trainer_table_{name}"] == "counter"
    m.table_totals("user", admitted=5, evicted=0, rejected=7)
    assert _value(m, 'freshrec_trainer_table_evicted_total{slot="user"}') == 0  # exported at 0
    m.table_totals("user", admitted=9, evicted=2, rejected=7)
    assert _value(m, 'freshrec_trainer_table_admitted_total{slot="user"}') == 9
    assert _value(m, 'freshrec_trainer_table_evicted_total{slot="user"}') == 2
    # A table restored from an older checkpoint reports smaller totals: the counter never goes
    # back, and counts again from the new baseline.
    m.table_totals("user", admitted=4, evicted=2, rejected=7)
    m.table_totals("user", admitted=6, evicted=2, rejected=7)
    assert _value(m, 'freshrec_trainer_table_admitted_total{slot="user"}') == 11


def test_a_bulk_histogram_exposes_what_a_histogram_observing_each_value_does() -> None:
    import numpy as np
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from freshrec.metrics import BulkHistogram

    values = np.array([0.05, 0.1, 0.1000001, 1.0, 7.0, 5000.0, -3.0, np.nan])
    one_reg, bulk_reg = CollectorRegistry(), CollectorRegistry()
    one = Histogram("d_seconds", "h", buckets=(0.1, 1, 5, 30), registry=one_reg)
    bulk = BulkHistogram("d_seconds", "h", buckets=(0.1, 1, 5, 30), registry=bulk_reg)
    for v in values:
        one.observe(float(v))
    bulk.observe_many(values[:3])
    bulk.observe_many(values[3:])
    bulk.observe_many(np.array([]))

    def lines(r: CollectorRegistry) -> list[str]:
        return [x for x in generate_latest(r).decode().splitlines() if "_created" not in x]

    assert lines(bulk_reg) == lines(one_reg)
