"""Dashboards: valid Grafana JSON on the fixed datasource, queries that parse as PromQL and use
only metrics freshrec exports."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.ops import (
    DASHBOARDS,
    DATASOURCE_UID,
    dashboard_queries,
    exported_metric_names,
    grafana_to_promql,
    load_dashboard,
    metric_names_in,
    panels,
)


def test_the_three_dashboards_exist_with_unique_uids() -> None:
    names = {p.stem for p in DASHBOARDS}
    assert {"overview", "trainer", "exploration"} <= names
    uids = [load_dashboard(p)["uid"] for p in DASHBOARDS]
    assert len(set(uids)) == len(uids)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_panel_uses_the_fixed_datasource(path) -> None:
    dashboard = load_dashboard(path)
    found = list(panels(dashboard))
    assert found
    for panel in found:
        assert panel["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(set(ids)) == len(ids), "duplicate panel ids"


def test_queries_use_only_exported_metrics() -> None:
    known = exported_metric_names()
    for dashboard, title, expr in dashboard_queries():
        used = metric_names_in(expr)
        assert used, f"{dashboard} / {title}: no freshrec metric in {expr!r}"
        assert used <= known, f"{dashboard} / {title}: unknown {sorted(used - known)}"


def test_required_panels_are_present() -> None:
    exprs = " ".join(expr for _, _, expr in dashboard_queries())
    for metric in ("freshrec_trainer_last_publish_timestamp_seconds",
                   "freshrec_service_snapshot_age_seconds",
                   "freshrec_service_request_seconds_bucket",
                   "freshrec_service_responses_total", "freshrec_service_snapshot_version",
                   "freshrec_trainer_events_total", "freshrec_trainer_consumer_lag",
                   "freshrec_trainer_progressive_auc", "freshrec_trainer_progressive_logloss",
                   "freshrec_trainer_table_rows", "freshrec_trainer_table_admitted_total",
                   "freshrec_trainer_table_evicted_total",
                   "freshrec_trainer_last_checkpoint_timestamp_seconds",
                   "freshrec_service_explored_items_total",
                   "freshrec_service_exploration_bonus_bucket"):
        assert metric in exprs, metric


def test_queries_parse_as_promql(tmp_path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (CI: apt-get install prometheus)")
    rules = [{"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)}
             for i, (_, _, expr) in enumerate(dashboard_queries())]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
