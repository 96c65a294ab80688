"""Alert rules: promtool accepts them, every alert has a firing test case and a runbook entry,
and every metric they use is one freshrec exports."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.ops import ROOT, exported_metric_names, metric_names_in

PROM_DIR = ROOT / "deploy/prometheus"


def _alerts() -> list[dict]:
    groups = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool not installed (CI: apt-get install prometheus)")
    return subprocess.run([binary, *args], cwd=PROM_DIR, capture_output=True, text=True,
                          timeout=120)


def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config() -> None:
    result = _promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    result = _promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_test_case() -> None:
    tests = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())["tests"]
    firing = {case["alertname"] for test in tests for case in test["alert_rule_test"]
              if case.get("exp_alerts")}
    missing = sorted({a["alert"] for a in _alerts()} - firing)
    assert not missing, f"alerts without a firing test case: {missing}"


def test_required_alerts_exist() -> None:
    names = {a["alert"] for a in _alerts()}
    assert {"FreshrecFreshnessSLOBreached", "FreshrecTrainerStalled",
            "FreshrecDeadLetterRateHigh", "FreshrecConsumerLagGrowing",
            "FreshrecServiceNotReady"} <= names


def test_alerts_use_only_exported_metrics() -> None:
    known = exported_metric_names()
    for alert in _alerts():
        unknown = metric_names_in(alert["expr"]) - known
        assert not unknown, f"{alert['alert']}: unknown metrics {sorted(unknown)}"


def test_every_alert_has_a_runbook_entry() -> None:
    doc = (ROOT / "docs/operations.md").read_text()
    for alert in _alerts():
        anchor = alert["annotations"]["runbook_url"].split("#", 1)[1]
        assert anchor == alert["alert"].lower()
        assert f"### {alert['alert']}" in doc, f"docs/operations.md lacks ### {alert['alert']}"
