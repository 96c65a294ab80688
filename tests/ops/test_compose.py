"""docker-compose.yml and the Dockerfile: valid, and consistent with the code's settings."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import tomllib
from urllib.parse import urlparse

import pytest
import yaml

from bench import SHIPPED_EXTRAS, extra_requirements
from freshrec.settings import Settings
from tests.ops import DATASOURCE_UID, ROOT
from trainer.ranks import ranks_from_env
from trainer.sharded import DEFAULT_RANK_BUCKETS, Ranks

COMPOSE = ROOT / "docker-compose.yml"
RANKS = ROOT / "docker-compose.ranks.yml"  # the trainer as ranks, over COMPOSE
FRESHREC_SERVICES = ("trainer", "joiner", "service", "replay")


# What ./scripts/compose-env would put in .env (compose interpolates ${VAR} from it).
DOT_ENV = {"REDIS_PASSWORD": "sample-redis-password", "FRESHREC_SERVICE_API_TOKEN": "sample-token",
           "FRESHREC_SERVICE_INTERNAL_TOKEN": "sample-internal-token"}
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?[?-][^}]*)?\}")


def _interpolate(text: str) -> str:
    return _INTERPOLATION.sub(lambda m: DOT_ENV[m.group(1)], text)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(_interpolate(COMPOSE.read_text()))


def _env(compose: dict, name: str) -> dict[str, str]:
    return {k: str(v) for k, v in compose["services"][name].get("environment", {}).items()}


def _scrape_targets() -> dict[str, list[str]]:
    """Prometheus's targets per job (static, or DNS names with their port)."""
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    out = {}
    for job in prom["scrape_configs"]:
        if "static_configs" in job:
            out[job["job_name"]] = job["static_configs"][0]["targets"]
        else:
            sd = job["dns_sd_configs"][0]
            out[job["job_name"]] = [f"{name}:{sd['port']}" for name in sd["names"]]
    return out


def _settings_from(env: dict[str, str]) -> Settings:
    prefix = "FRESHREC_"
    return Settings(**{k[len(prefix):].lower(): v for k, v in env.items() if k.startswith(prefix)})


def test_docker_compose_config_is_valid() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed (CI: apt-get install docker-compose)")
    result = subprocess.run([binary, "-f", str(COMPOSE), "config", "-q"], cwd=ROOT,
                            env={**os.environ, **DOT_ENV}, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


def test_every_freshrec_variable_is_a_real_setting_with_a_valid_value(compose: dict) -> None:
    known = {"FRESHREC_" + name.upper() for name in Settings.model_fields}
    for name in FRESHREC_SERVICES:
        env = _env(compose, name)
        assert env, f"{name} has no FRESHREC_* environment"
        unknown = sorted(k for k in env if k.startswith("FRESHREC_") and k not in known)
        assert not unknown, f"{name}: not settings: {unknown}"
        _settings_from(env)  # raises on a value the code would reject


def test_ports_agree_between_settings_services_and_prometheus(compose: dict) -> None:
    services = compose["services"]
    targets = {job: found[0] for job, found in _scrape_targets().items()}

    service = _settings_from(_env(compose, "service"))
    assert service.service_host == "0.0.0.0", "the service must listen beyond loopback"
    assert targets["freshrec-service"] == f"service:{service.service_port}"
    assert f":{service.service_port}/healthz" in " ".join(
        services["service"]["healthcheck"]["test"])

    trainer = _settings_from(_env(compose, "trainer"))
    assert targets["freshrec-trainer"] == f"trainer:{trainer.trainer_metrics_port}"
    assert f":{trainer.trainer_metrics_port}/healthz" in " ".join(
        services["trainer"]["healthcheck"]["test"])

    joiner = _settings_from(_env(compose, "joiner"))
    assert targets["freshrec-joiner"] == f"joiner:{joiner.joiner_metrics_port}"
    assert f":{joiner.joiner_metrics_port}/healthz" in " ".join(
        services["joiner"]["healthcheck"]["test"])

    for name in FRESHREC_SERVICES:
        s = _settings_from(_env(compose, name))
        host, port = s.kafka_bootstrap.rsplit(":", 1)
        assert host in services, f"{name}: kafka host {host} is not a compose service"
        advertised = services[host]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
        assert f"//{host}:{port}" in advertised, f"{name}: {host}:{port} is not advertised"
        url = urlparse(s.redis_url)
        assert url.hostname in services, f"{name}: redis host {url.hostname} not a service"
        command = services[url.hostname]["command"]
        assert command[command.index("--port") + 1] == str(url.port)


def test_credentials_are_required_from_dot_env_and_redis_needs_its_password() -> None:
    raw = yaml.safe_load(COMPOSE.read_text())  # before interpolation
    for var in DOT_ENV:
        assert re.search(rf"\$\{{{var}:\?", COMPOSE.read_text()), f"{var} must be required"
    command = raw["services"]["redis"]["command"]
    password = command[command.index("--requirepass") + 1]
    assert password.startswith("${REDIS_PASSWORD:?")
    compose = yaml.safe_load(_interpolate(COMPOSE.read_text()))
    assert compose["services"]["redis"]["environment"]["REDISCLI_AUTH"] == DOT_ENV["REDIS_PASSWORD"]
    for name in FRESHREC_SERVICES:
        url = urlparse(_settings_from(_env(compose, name)).redis_url)
        assert url.password == DOT_ENV["REDIS_PASSWORD"], name
    service = _settings_from(_env(compose, "service"))
    assert service.service_api_token == DOT_ENV["FRESHREC_SERVICE_API_TOKEN"]
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_topics_created_by_kafka_init_match_the_settings(compose: dict) -> None:
    script = "\n".join(compose["services"]["kafka-init"]["command"])
    settings = _settings_from(_env(compose, "trainer"))
    topics = re.search(r"for topic in ([^;]+);", script).group(1).split()
    assert sorted(topics) == sorted([settings.topic_events, settings.topic_impressions,
                                     settings.topic_clicks, settings.topic_dlq])
    assert f"--partitions {settings.topic_partitions}" in script
    trainer_deps = compose["services"]["trainer"]["depends_on"]
    assert trainer_deps["kafka-init"]["condition"] == "service_completed_successfully"


def test_start_order_is_health_gated(compose: dict) -> None:
    services = compose["services"]
    for name, svc in services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert cond["condition"] in ("service_healthy", "service_completed_successfully"), \
                f"{name} -> {dep} is not gated"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} has no health check"
    assert "replay" in services["replay"]["profiles"]


def test_images_are_pinned(compose: dict) -> None:
    for name, svc in compose["services"].items():
        image = svc.get("image", "")
        if "build" in svc:
            continue
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned {image!r}"
    assert compose["services"]["kafka"]["image"].startswith("apache/kafka:")


def test_grafana_provisioning_points_at_the_dashboards_and_fixed_datasource(compose: dict
                                                                            ) -> None:
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/freshrec.yml")
                        .read_text())["datasources"][0]
    assert ds["uid"] == DATASOURCE_UID
    assert urlparse(ds["url"]).hostname in compose["services"]
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/freshrec.yml")
                              .read_text())["providers"][0]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in compose["services"]["grafana"]
                  ["volumes"] if v.startswith("./"))
    assert mounts["./dashboards"] == provider["options"]["path"]


# --- Dockerfile ----------------------------------------------------------------------------------

def test_dockerfile_installs_cpu_torch_first_and_runs_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    torch = text.index("pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu")
    assert torch < text.index("pip install \".[")
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and not users[-1].startswith(("0", "root"))
    assert re.search(r'^ENTRYPOINT \["freshrec"\]', text, re.M)


def test_dockerfile_env_are_settings_and_copied_sources_are_in_the_context() -> None:
    text = (ROOT / "Dockerfile").read_text()
    env = dict(re.findall(r"(FRESHREC_[A-Z_]+)=(\S+)", text))
    known = {"FRESHREC_" + name.upper() for name in Settings.model_fields}
    assert set(env) <= known, set(env) - known
    _settings_from(env)
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"COPY {path}: missing"
            assert path in allowed, f"COPY {path}: excluded by .dockerignore"
    # every package setuptools installs is copied
    for package in ("freshrec", "featurestore", "trainer", "service", "bandit"):
        assert package in allowed


def test_image_installs_exactly_the_extras_the_benchmarks_measure() -> None:
    text = (ROOT / "Dockerfile").read_text()
    installs = re.findall(r"pip install \"?\.\[([a-z,]+)\]\"?", text)
    assert len(installs) == 1, installs
    assert tuple(installs[0].split(",")) == SHIPPED_EXTRAS
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert set(SHIPPED_EXTRAS) <= set(extras)
    assert {"uvloop", "httptools"} <= set(extra_requirements("serve"))
    # development and the benchmarks run with the same set
    assert f"freshrec[{','.join(SHIPPED_EXTRAS)}]" in extras["dev"]


def test_image_gives_numba_a_writable_cache() -> None:
    text = (ROOT / "Dockerfile").read_text()
    cache = re.search(r"NUMBA_CACHE_DIR=(\S+)", text).group(1)
    assert re.search(rf"mkdir -p [^\n]*(\\\n[^\n]*)*{re.escape(cache)}", text)
    chown = re.search(r"chown -R freshrec:freshrec ([^\n]+)", text).group(1).split()
    assert any(cache == d or cache.startswith(d + "/") for d in chown), chown



def test_service_runs_the_measured_layout(compose: dict) -> None:
    env = _env(compose, "service")
    # bench/serve.py: two workers, one thread per native pool in each
    assert int(env["WEB_CONCURRENCY"]) == 2
    assert _settings_from(env).cpu_threads // int(env["WEB_CONCURRENCY"]) == 1


# --- the trainer as ranks (docker-compose.ranks.yml over docker-compose.yml) -----------------

@pytest.fixture(scope="module")
def ranked(compose: dict) -> dict:
    """docker-compose.yml with docker-compose.ranks.yml merged over it, as compose merges:
    mappings key by key, ``expose`` and ``volumes`` appended, anything else replaced."""
    overlay = yaml.safe_load(_interpolate(RANKS.read_text()))
    merged = copy.deepcopy(compose)
    for name, svc in overlay["services"].items():
        base = merged["services"].setdefault(name, {})
        for key, value in svc.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            elif isinstance(value, list) and key in ("expose", "volumes") and key in base:
                base[key] = base[key] + value
            else:
                base[key] = value
    merged["volumes"] = {**merged["volumes"], **overlay.get("volumes", {})}
    return merged


def test_docker_compose_config_with_ranks_is_valid() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed (CI: apt-get install docker-compose)")
    result = subprocess.run([binary, "-f", str(COMPOSE), "-f", str(RANKS), "config", "-q"],
                            cwd=ROOT, env={**os.environ, **DOT_ENV}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_ranks_form_one_world_that_meets_at_rank_0(ranked: dict,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """What trainer/ranks.py reads (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) names one
    world: ranks 0..R-1, rank 0's service and an exposed port as the rendezvous, the same
    settings on every rank, each rank its own checkpoint volume, scraped, with a partition."""
    services = ranked["services"]
    ranks = {name: _env(ranked, name) for name, svc in services.items()
             if "RANK" in svc.get("environment", {})}
    assert len(ranks) >= 2
    assert sorted(int(env["RANK"]) for env in ranks.values()) == list(range(len(ranks)))
    rank0 = next(name for name, env in ranks.items() if env["RANK"] == "0")
    assert rank0 == "trainer"  # the service the stack's service and replay wait for
    settings = {k: v for k, v in ranks[rank0].items() if k.startswith("FRESHREC_")}
    targets = _scrape_targets()["freshrec-trainer"]
    volumes = set()
    for name, env in ranks.items():
        assert int(env["WORLD_SIZE"]) == len(ranks), name
        assert env["MASTER_ADDR"] == rank0, name
        assert env["MASTER_PORT"] in [str(p) for p in services[rank0]["expose"]], name
        assert {k: v for k, v in env.items() if k.startswith("FRESHREC_")} == settings, name
        s = _settings_from(env)
        for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.setenv(var, env[var])
        assert ranks_from_env(s) == Ranks(int(env["RANK"]), len(ranks),
                                          s.snapshot_buckets or DEFAULT_RANK_BUCKETS)
        assert s.topic_partitions >= len(ranks), "a rank without a partition"
        mounts = dict(v.rsplit(":", 1)[::-1] for v in services[name]["volumes"])
        volume = mounts[str(s.trainer_checkpoint_dir)]
        assert volume in ranked["volumes"], name
        volumes.add(volume)
        assert services[name]["command"] == ["trainer"], name
        assert f"{name}:{s.trainer_metrics_port}" in targets, f"{name} is not scraped"
        assert f":{s.trainer_metrics_port}/healthz" in " ".join(
            services[name]["healthcheck"]["test"]), name
    assert len(volumes) == len(ranks), "ranks share a checkpoint volume"
