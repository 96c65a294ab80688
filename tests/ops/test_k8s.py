"""k8s/: every rendered manifest validates against a pinned Kubernetes schema, and the
references between them (ConfigMaps, ports, paths, selectors) and to the code's settings hold."""

from __future__ import annotations

import re
import shutil
import subprocess
from urllib.parse import urlparse

import pytest
import yaml

from freshrec.settings import Settings
from tests.ops import DASHBOARDS, K8S_VERSION, ROOT, render_kustomization

K8S = ROOT / "k8s"


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return render_kustomization(K8S)


def _get(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _settings_env(docs: list[dict]) -> dict[str, str]:
    return _get(docs, "ConfigMap", "freshrec-settings")["data"]


def _container(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]["containers"][0]


def test_kubectl_kustomize_renders_the_same_objects(docs: list[dict]) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: manifests checked with the built-in renderer only")
    result = subprocess.run([kubectl, "kustomize", "--load-restrictor", "LoadRestrictionsNone",
                             str(K8S)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]

    def key(d: dict) -> tuple[str, str]:
        name = d["metadata"]["name"]
        if d["kind"] == "ConfigMap":
            name = re.sub(r"-[a-z0-9]{10}$", "", name)  # kustomize's content-hash suffix
        return d["kind"], name

    assert sorted(map(key, rendered)) == sorted(map(key, docs))
    _validate(rendered)


def _validate(docs: list[dict]) -> None:
    import kubernetes_validate

    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked structurally in test_service_monitor_selects_both_services
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {exc.path}")


def test_every_manifest_validates_against_kubernetes_schema(docs: list[dict]) -> None:
    pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "Deployment", "StatefulSet", "Service", "HorizontalPodAutoscaler",
            "ConfigMap", "ServiceMonitor"} <= kinds
    _validate(docs)


def test_settings_configmap_holds_only_real_settings_with_valid_values(docs: list[dict]) -> None:
    env = _settings_env(docs)
    known = {"FRESHREC_" + name.upper() for name in Settings.model_fields}
    assert set(env) <= known, sorted(set(env) - known)
    Settings(**{k.removeprefix("FRESHREC_").lower(): v for k, v in env.items()})
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for var in _container(doc).get("env", []):
                assert var["name"] in known, var["name"]


def test_config_maps_referenced_by_pods_exist(docs: list[dict]) -> None:
    config_maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = doc["spec"]["template"]["spec"]
        refs = [e["configMapRef"]["name"] for e in _container(doc).get("envFrom", [])]
        refs += [v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v]
        assert refs and set(refs) <= config_maps, (doc["metadata"]["name"], refs)


def test_ports_agree_with_settings_and_external_services(docs: list[dict]) -> None:
    s = Settings(**{k.removeprefix("FRESHREC_").lower(): v
                    for k, v in _settings_env(docs).items()})
    assert s.service_host == "0.0.0.0"
    service = _get(docs, "Deployment", "freshrec-service")
    assert _container(service)["ports"][0]["containerPort"] == s.service_port
    svc = _get(docs, "Service", "freshrec-service")
    assert svc["spec"]["ports"][0]["port"] == s.service_port
    trainer = _get(docs, "StatefulSet", "freshrec-trainer")
    assert _container(trainer)["ports"][0]["containerPort"] == s.trainer_metrics_port
    assert _get(docs, "Service", "freshrec-trainer")["spec"]["ports"][0]["port"] \
        == s.trainer_metrics_port
    joiner = _get(docs, "StatefulSet", "freshrec-joiner")
    assert _container(joiner)["ports"][0]["containerPort"] == s.joiner_metrics_port
    assert _get(docs, "Service", "freshrec-joiner")["spec"]["ports"][0]["port"] \
        == s.joiner_metrics_port

    host, port = s.kafka_bootstrap.rsplit(":", 1)
    kafka = _get(docs, "Service", host)
    assert kafka["spec"]["type"] == "ExternalName"
    assert int(port) in [p["port"] for p in kafka["spec"]["ports"]]
    url = urlparse(s.redis_url)
    redis = _get(docs, "Service", url.hostname)
    assert redis["spec"]["type"] == "ExternalName"
    assert url.port in [p["port"] for p in redis["spec"]["ports"]]


def test_model_config_and_checkpoint_paths_are_mounted(docs: list[dict]) -> None:
    s = Settings(**{k.removeprefix("FRESHREC_").lower(): v
                    for k, v in _settings_env(docs).items()})
    model = _get(docs, "ConfigMap", "freshrec-model-config")
    assert model["data"][s.model_config_path.name] == \
        (ROOT / "freshrec/configs/movielens.toml").read_text()
    for kind, name in (("Deployment", "freshrec-service"), ("StatefulSet", "freshrec-trainer")):
        mounts = {m["name"]: m["mountPath"] for m in
                  _container(_get(docs, kind, name)).get("volumeMounts", [])}
        assert mounts["model-config"] == str(s.model_config_path.parent), name
    for name, directory in (("freshrec-trainer", s.trainer_checkpoint_dir),
                            ("freshrec-joiner", s.joiner_checkpoint_dir)):
        workload = _get(docs, "StatefulSet", name)
        mounts = {m["name"]: m["mountPath"] for m in _container(workload)["volumeMounts"]}
        claims = [c["metadata"]["name"] for c in workload["spec"]["volumeClaimTemplates"]]
        assert mounts["checkpoints"] == str(directory), name
        assert "checkpoints" in claims
        # the final checkpoint after SIGTERM must fit in the grace period
        grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= 4 * s.trainer_checkpoint_interval_s, name


def test_service_probes_and_autoscaler(docs: list[dict]) -> None:
    container = _container(_get(docs, "Deployment", "freshrec-service"))
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]["cpu"]  # the HPA needs a CPU request
    hpa = _get(docs, "HorizontalPodAutoscaler", "freshrec-service")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "freshrec-service")


def test_services_select_their_pods(docs: list[dict]) -> None:
    for kind, name in (("Deployment", "freshrec-service"), ("StatefulSet", "freshrec-trainer"),
                       ("StatefulSet", "freshrec-joiner")):
        labels = _get(docs, kind, name)["spec"]["template"]["metadata"]["labels"]
        selector = _get(docs, "Service", name)["spec"]["selector"]
        assert selector.items() <= labels.items(), name


def test_service_monitor_selects_every_component(docs: list[dict]) -> None:
    monitor = _get(docs, "ServiceMonitor", "freshrec")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    wanted = monitor["spec"]["selector"]["matchLabels"]
    selected = [d for d in docs if d["kind"] == "Service"
                and wanted.items() <= d["metadata"].get("labels", {}).items()]
    assert sorted(d["metadata"]["name"] for d in selected) == \
        ["freshrec-joiner", "freshrec-service", "freshrec-trainer"]
    ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    for svc in selected:
        assert ports & {p["name"] for p in svc["spec"]["ports"]}, svc["metadata"]["name"]


def test_dashboards_configmap_is_the_repository_dashboards(docs: list[dict]) -> None:
    cm = _get(docs, "ConfigMap", "freshrec-dashboards")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"] == {p.name: p.read_text() for p in DASHBOARDS}
