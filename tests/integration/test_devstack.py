"""``freshrec dev up`` brings the stack up and leaves no process behind after SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import orjson
import pytest
import redis

from freshrec.devstack import free_port, wait_for_redis
from freshrec.kafka import wait_for_broker

pytestmark = pytest.mark.integration


def descendants(pid: int) -> set[int]:
    """Every live process whose ancestry leads to ``pid``."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_dev_up_serves_and_sigterm_leaves_no_orphans(tmp_path: Path) -> None:
    kafka_port, redis_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "freshrec.cli", "dev", "up", "--components",
         "--kafka-port", str(kafka_port), "--redis-port", str(redis_port),
         "--log-dir", str(tmp_path / "logs")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_for_broker(f"127.0.0.1:{kafka_port}", timeout=60)
        wait_for_redis(f"redis://127.0.0.1:{redis_port}/0", timeout=60)
        # Up means started: the stack prints its addresses once every part is ready (topics
        # created too), which can come after the broker and Redis first answer.
        deadline = time.monotonic() + 60
        children: set[int] = set()
        while time.monotonic() < deadline and not (
                len(children) >= 2 and any(line.startswith("kafka  ") for line in lines)):
            children = descendants(proc.pid)
            time.sleep(0.1)
        assert len(children) >= 2  # broker and redis
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines)
    assert proc.returncode == 0, out
    assert "kafka  127.0.0.1:" in out and "stack stopped" in out
    time.sleep(0.2)
    assert not [pid for pid in children if alive(pid)]


def test_dev_up_uses_external_kafka_and_redis_when_configured(stack, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_")}
    env["FRESHREC_KAFKA_BOOTSTRAP"] = stack.kafka_bootstrap
    env["FRESHREC_REDIS_URL"] = stack.redis_url
    env["FRESHREC_TOPIC_EVENTS"] = "external-check.events"
    proc = subprocess.run(
        [sys.executable, "-m", "freshrec.cli", "dev", "up", "--components", "--replay",
         "synthetic", "--events", "50", "--quiet", "--exit-after-replay",
         "--log-dir", str(tmp_path / "logs")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"kafka  {stack.kafka_bootstrap} (external)" in proc.stdout
    assert f"redis  {stack.redis_url} (external)" in proc.stdout
    assert "replay: sent=50 failed=0" in proc.stdout
    assert not (tmp_path / "logs" / "kafka.log").exists()  # no broker of its own was started


def test_dev_up_with_two_ranks_on_a_local_redis_cluster_spreads_the_model_over_every_master(
        tmp_path: Path) -> None:
    """``dev up --ranks 2 --redis-cluster 3``: three masters, two trainer ranks each publish
    the bucket chains they own (rank 0 the head) over all of them, the service follows them,
    and SIGTERM stops every node and rank."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_")}
    service_port = free_port()
    env |= {"FRESHREC_SERVICE_PORT": str(service_port),
            "FRESHREC_TRAINER_METRICS_PORT": str(free_port()),
            "FRESHREC_JOINER_METRICS_PORT": str(free_port()),
            "FRESHREC_TRAINER_PUBLISH_INTERVAL_MS": "100"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "freshrec.cli", "dev", "up", "--ranks", "2", "--redis-cluster", "3",
         "--components", "trainer", "service", "--replay", "synthetic", "--events", "3000",
         "--quiet", "--kafka-port", str(free_port()), "--log-dir", str(tmp_path / "logs")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "stack is up" in line or proc.poll() is not None:
                break
        out = "".join(lines)
        assert "stack is up" in out, out
        assert "cluster of 3 masters" in out and "snapshots in 64 buckets" in out, out
        assert "trainer 2 ranks started" in out, out
        nodes = out.split("cluster of 3 masters (", 1)[1].split(")", 1)[0].split(", ")
        ports = [int(n.rsplit(":", 1)[1]) for n in nodes]
        children = descendants(proc.pid)
        keys_per_master = [len(redis.Redis(port=p).keys("fr:{*:b*}*")) for p in ports]
        assert all(n > 0 for n in keys_per_master), keys_per_master
        deadline = time.monotonic() + 60
        version = 0
        while time.monotonic() < deadline and version == 0:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{service_port}/v1/model",
                                            timeout=2) as resp:
                    version = int(orjson.loads(resp.read()).get("version") or 0)
            except OSError:
                time.sleep(0.5)
        assert version > 0
        writers = set()
        for port in ports:  # every bucket chain names its writer: the rank that owns it
            node = redis.Redis(port=port)
            for key in node.scan_iter(match="fr:{*:b*}:meta"):
                bucket = int(key.decode().split(":b", 1)[1].split("}", 1)[0])
                writer = node.hget(key, "writer")
                assert writer == f"rank-{bucket % 2}".encode(), (key, writer)
                writers.add(writer)
        assert writers == {b"rank-0", b"rank-1"}
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "".join(lines) + rest
    deadline = time.monotonic() + 15  # service workers finish their shutdown after the parent
    while time.monotonic() < deadline and any(alive(pid) for pid in children):
        time.sleep(0.2)
    assert not [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children if alive(pid)]
