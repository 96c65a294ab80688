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


def test_observe_many_buckets_as_observe_does() -> None:
    import numpy as np
    from prometheus_client import CollectorRegistry, Histogram

    from freshrec.metrics import observe_many

    values = np.array([0.05, 0.1, 0.1000001, 1.0, 7.0, 5000.0, -3.0])
    one, many = (Histogram(name, "h", buckets=(0.1, 1, 5, 30), registry=CollectorRegistry())
                 for name in ("one", "many"))
    for v in values:
        one.observe(float(v))
    observe_many(many, values)
    samples = [[(s.name.split("_", 1)[1], s.labels, s.value) for s in h.collect()[0].samples
                if not s.name.endswith("_created")] for h in (one, many)]
    assert samples[0] == samples[1]
