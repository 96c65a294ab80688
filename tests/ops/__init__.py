"""Operations tests: Dockerfile, compose, k8s manifests, alert rules and dashboards.

Shared helpers live here: the repository root, the set of metric names freshrec exports (from
``freshrec/metrics.py`` itself, so a renamed metric breaks the dashboards' tests, not production),
the dashboards' queries, and a small kustomize renderer for machines without ``kubectl``.
"""

from __future__ import annotations

import json
import re
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


# --- a small kustomize renderer (namespace, labels, resources, configMapGenerator, images) ----

_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                   "StorageClass", "CustomResourceDefinition"}


def _read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def _generate_config_map(base: Path, gen: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, str] = {}
    for env in gen.get("envs", []):
        data.update(_read_env_file(base / env))
    for literal in gen.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    for spec in gen.get("files", []):
        key, sep, src = spec.partition("=")
        if not sep:
            key, src = Path(spec).name, spec
        data[key] = (base / src).read_text()
    options = gen.get("options", {})
    meta: dict[str, Any] = {"name": gen["name"]}
    if options.get("labels"):
        meta["labels"] = dict(options["labels"])
    if options.get("annotations"):
        meta["annotations"] = dict(options["annotations"])
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def _set_images(node: Any, images: dict[str, dict[str, str]]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                name = value.split(":", 1)[0]
                if name in images:
                    new = images[name]
                    node[key] = f"{new.get('newName', name)}:{new['newTag']}" \
                        if "newTag" in new else new.get("newName", name)
            else:
                _set_images(value, images)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, images)


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """Render ``directory/kustomization.yaml`` without kustomize (no name-hash suffixes).

    Supports what k8s/ uses: resources, namespace, labels, configMapGenerator and images.
    """
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for resource in kust.get("resources", []):
        docs.extend(d for d in yaml.safe_load_all((directory / resource).read_text()) if d)
    docs.extend(_generate_config_map(directory, gen) for gen in kust.get("configMapGenerator", []))
    images = {i["name"]: i for i in kust.get("images", [])}
    for doc in docs:
        meta = doc.setdefault("metadata", {})
        if kust.get("namespace") and doc["kind"] not in _CLUSTER_SCOPED:
            meta["namespace"] = kust["namespace"]
        for entry in kust.get("labels", []):
            meta.setdefault("labels", {}).update(entry["pairs"])
        _set_images(doc, images)
    return docs
