"""k8s/: rendered by real kustomize with its default load restrictor, every manifest validates
against a pinned Kubernetes schema, and the references between them (ConfigMaps, Secrets,
ports, paths, selectors, writable volumes) and to the code's settings hold."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import PurePosixPath
from urllib.parse import urlparse

import pytest

from freshrec.settings import Settings
from tests.ops import DASHBOARDS, K8S_VERSION, ROOT, render_kustomization
from trainer.ranks import ranks_from_env
from trainer.sharded import DEFAULT_RANK_BUCKETS, Ranks

K8S = ROOT / "k8s"
SECRET = "freshrec-secrets"
WORKLOADS = (("Deployment", "freshrec-service"), ("StatefulSet", "freshrec-trainer"),
             ("StatefulSet", "freshrec-joiner"))


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return render_kustomization(K8S)


def _get(docs: list[dict], kind: str, name: str) -> dict:
    """One object by kind and name (a generated ConfigMap's name carries a content hash)."""
    hashed = re.compile(rf"{re.escape(name)}-[a-z0-9]{{10}}")
    found = [d for d in docs if d["kind"] == kind and (
        d["metadata"]["name"] == name
        or (kind == "ConfigMap" and hashed.fullmatch(d["metadata"]["name"])))]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _settings_env(docs: list[dict]) -> dict[str, str]:
    return _get(docs, "ConfigMap", "freshrec-settings")["data"]


def _container(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]["containers"][0]


def _env(workload: dict) -> dict[str, dict]:
    return {v["name"]: v for v in _container(workload).get("env", [])}


def _settings(docs: list[dict]) -> Settings:
    return Settings(**{k.removeprefix("FRESHREC_").lower(): v
                       for k, v in _settings_env(docs).items()})


def test_copies_in_k8s_equal_their_sources() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "sync_k8s.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"run scripts/sync_k8s.py: {result.stdout}"


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
            for name in _env(doc):
                assert not name.startswith("FRESHREC_") or name in known, name


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
    s = _settings(docs)
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
    # The Redis URL (with its password) lives in the Secret; the one the instructions in
    # kustomization.yaml put there must name the in-namespace redis Service and its port.
    example = re.search(r'FRESHREC_REDIS_URL="([^"]+)"', (K8S / "kustomization.yaml").read_text())
    url = urlparse(example.group(1))
    assert url.password, "the Redis URL must carry the password"
    redis = _get(docs, "Service", url.hostname)
    assert redis["spec"]["type"] == "ExternalName"
    assert url.port in [p["port"] for p in redis["spec"]["ports"]]


def test_credentials_come_from_the_secret_and_only_where_needed(docs: list[dict]) -> None:
    settings = _settings_env(docs)
    assert "FRESHREC_SERVICE_API_TOKEN" not in settings and "FRESHREC_REDIS_URL" not in settings
    needs = {"freshrec-service": {"FRESHREC_SERVICE_API_TOKEN", "FRESHREC_REDIS_URL"},
             "freshrec-trainer": {"FRESHREC_REDIS_URL"}, "freshrec-joiner": set()}
    for kind, name in WORKLOADS:
        from_secret = {}
        for var_name, var in _env(_get(docs, kind, name)).items():
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None:
                assert ref["name"] == SECRET and ref["key"] == var_name, var
                from_secret[var_name] = ref.get("optional", False)
        required = {k for k, optional in from_secret.items() if not optional}
        assert required == needs[name], name
        if name == "freshrec-service":  # pipeline-only fields: a second, optional credential
            assert from_secret.get("FRESHREC_SERVICE_INTERNAL_TOKEN") is True
        assert "envFrom" not in _container(_get(docs, kind, name)) or all(
            "secretRef" not in e for e in _container(_get(docs, kind, name))["envFrom"]), name


def test_thread_budget_follows_each_pods_cpu_request(docs: list[dict]) -> None:
    for kind, name in WORKLOADS:
        container = _container(_get(docs, kind, name))
        ref = _env(_get(docs, kind, name))["FRESHREC_CPU_THREADS"]["valueFrom"]["resourceFieldRef"]
        assert ref["resource"] == "requests.cpu" and str(ref["divisor"]) == "1", name
        assert float(container["resources"]["requests"]["cpu"]) >= 1, name
    service = _get(docs, "Deployment", "freshrec-service")
    workers = int(_env(service)["WEB_CONCURRENCY"]["value"])
    # one thread per worker and pool, as measured by bench/serve.py
    assert float(_container(service)["resources"]["requests"]["cpu"]) == workers


def _writable_mount(workload: dict, path: str) -> str | None:
    """The writable volume (emptyDir or claim) mounted at or above ``path``, if any."""
    pod = workload["spec"]["template"]["spec"]
    kinds = {v["name"]: v for v in pod.get("volumes", [])}
    claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
    best = None
    for m in _container(workload).get("volumeMounts", []):
        if m.get("readOnly"):
            continue
        volume = kinds.get(m["name"], {})
        if "emptyDir" not in volume and m["name"] not in claims:
            continue
        mount = PurePosixPath(m["mountPath"])
        if (PurePosixPath(path) == mount or mount in PurePosixPath(path).parents) and (
                best is None or len(mount.parts) > len(PurePosixPath(best).parts)):
            best = str(mount)
    return best


def test_numba_cache_and_metrics_directory_are_writable(docs: list[dict]) -> None:
    for kind, name in WORKLOADS:
        workload = _get(docs, kind, name)
        container = _container(workload)
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
        cache = _env(workload)["NUMBA_CACHE_DIR"]["value"]
        assert _writable_mount(workload, cache), f"{name}: NUMBA_CACHE_DIR {cache} not writable"
    service = _get(docs, "Deployment", "freshrec-service")
    directory = _env(service)["PROMETHEUS_MULTIPROC_DIR"]["value"]
    assert _writable_mount(service, directory), f"PROMETHEUS_MULTIPROC_DIR {directory}"


def test_trainer_and_joiner_liveness_follows_their_loops(docs: list[dict]) -> None:
    for name in ("freshrec-trainer", "freshrec-joiner"):
        container = _container(_get(docs, "StatefulSet", name))
        for probe in ("startupProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert (get["path"], get["port"]) == ("/healthz", "metrics"), (name, probe)
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, name


def test_model_config_and_checkpoint_paths_are_mounted(docs: list[dict]) -> None:
    s = _settings(docs)
    model = _get(docs, "ConfigMap", "freshrec-model-config")
    assert model["data"][s.model_config_path.name] == \
        (ROOT / "freshrec/configs/movielens.toml").read_text()
    assert model["data"][s.model_config_path.name] == (K8S / "model/movielens.toml").read_text()
    for kind, name in (("Deployment", "freshrec-service"), ("StatefulSet", "freshrec-trainer")):
        mounts = {m["name"]: m["mountPath"] for m in
                  _container(_get(docs, kind, name)).get("volumeMounts", [])}
        assert mounts["model-config"] == str(s.model_config_path.parent), name
    for name, directory, interval in (
            ("freshrec-trainer", s.trainer_checkpoint_dir, s.trainer_checkpoint_interval_s),
            ("freshrec-joiner", s.joiner_checkpoint_dir, s.joiner_checkpoint_interval_s)):
        workload = _get(docs, "StatefulSet", name)
        mounts = {m["name"]: m["mountPath"] for m in _container(workload)["volumeMounts"]}
        claims = [c["metadata"]["name"] for c in workload["spec"]["volumeClaimTemplates"]]
        assert mounts["checkpoints"] == str(directory), name
        assert "checkpoints" in claims
        # the final checkpoint after SIGTERM must fit in the grace period
        grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= 4 * interval, name


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
    for kind, name in WORKLOADS:
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


# --- the trainer as ranks (deploy/k8s-ranks over k8s/) ------------------------------------------

@pytest.fixture(scope="module")
def ranked() -> list[dict]:
    return render_kustomization(ROOT / "deploy" / "k8s-ranks")


def test_ranks_overlay_validates(ranked: list[dict]) -> None:
    pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    _validate(ranked)


def test_ranks_are_pods_of_one_world_that_meet_at_pod_0(ranked: list[dict],
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """What trainer/ranks.py reads names one world: WORLD_SIZE = replicas, RANK = the pod's
    stable index (its own volume follows it), MASTER_ADDR = pod 0 through the headless
    Service, which publishes it before it is ready (the ranks meet before either can be
    ready), MASTER_PORT a port of the pod and the Service; every rank gets a partition."""
    sts = _get(ranked, "StatefulSet", "freshrec-trainer")
    env = _env(sts)
    replicas = sts["spec"]["replicas"]
    assert replicas >= 2
    assert int(env["WORLD_SIZE"]["value"]) == replicas
    assert env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['apps.kubernetes.io/pod-index']"
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    service = _get(ranked, "Service", sts["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert env["MASTER_ADDR"]["value"] == \
        f"{sts['metadata']['name']}-0.{sts['spec']['serviceName']}"
    port = int(env["MASTER_PORT"]["value"])
    container_ports = {p["name"]: p["containerPort"] for p in _container(sts)["ports"]}
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    named = next(name for name, p in container_ports.items() if p == port)
    assert service_ports[named]["port"] == port and service_ports[named]["targetPort"] == named
    # the metrics port the ServiceMonitor scrapes is unchanged
    s = _settings(ranked)
    assert container_ports["metrics"] == service_ports["metrics"]["port"] == \
        s.trainer_metrics_port
    assert s.topic_partitions >= replicas, "a rank without a partition"
    claims = [c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]]
    assert "checkpoints" in claims  # one volume per pod, so per rank
    for rank in range(replicas):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", env["WORLD_SIZE"]["value"])
        assert ranks_from_env(s) == Ranks(rank, replicas,
                                          s.snapshot_buckets or DEFAULT_RANK_BUCKETS)
    # ranks publish their own buckets: the shared settings name the bucketed layout, which
    # the ranks require and the service reads
    assert s.snapshot_buckets >= replicas
    # everything else is the base: the other workloads are untouched
    base = render_kustomization(K8S)

    def unranked(docs: list[dict]) -> str:
        others = [d for d in docs if d["kind"] not in ("StatefulSet", "Service")]
        for d in others:
            if d["kind"] == "ConfigMap":
                d.get("data", {}).pop("FRESHREC_SNAPSHOT_BUCKETS", None)
        # the settings ConfigMap's generated name carries a hash of its content
        return re.sub(r"freshrec-settings-[a-z0-9]+", "freshrec-settings", json.dumps(others))

    assert unranked(ranked) == unranked(base)
