"""A Redis Cluster on loopback made of local ``redis-server`` children (dev stack, tests).

Every master is the same ``redis-server`` binary started with ``--cluster-enabled yes``; the
slots are then spread evenly by ``redis-cli --cluster create`` — what an operator does by hand,
so the local cluster is a real one (MOVED/ASK redirections, slot migrations) and not a mock.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from freshrec.devstack import (
    die_with_parent,
    free_port,
    redis_server_binary,
    stop_child,
    wait_for_redis,
)


def redis_cli_binary() -> Path:
    """The ``redis-cli`` beside the ``redis-server`` in use."""
    beside = redis_server_binary().with_name("redis-cli")
    if beside.is_file():
        return beside
    system = shutil.which("redis-cli")
    if system:
        return Path(system)
    raise FileNotFoundError("redis-cli not found next to redis-server")


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(100):
        port = free_port()
        if port > 55535:  # the bus port must be a valid port as well
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


@dataclass
class LocalRedisCluster:
    """``masters`` cluster-enabled redis-servers on free ports, joined into one cluster."""

    masters: int = 3
    data_dir: Path = Path("var/redis-cluster")
    ports: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A URL of one node: redis-py's cluster client discovers the others from it."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    @property
    def nodes(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def start(self, timeout: float = 30.0) -> LocalRedisCluster:
        """Start the masters, create the cluster, wait until every node says ``ok``."""
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            for _ in range(self.masters):
                port = _cluster_port()
                self.ports.append(port)
                node_dir = self.data_dir / str(port)
                node_dir.mkdir(exist_ok=True)
                log = open(node_dir / "redis.log", "ab")  # noqa: SIM115 - child owns it
                self.procs.append(subprocess.Popen(
                    [str(redis_server_binary()), "--port", str(port), "--bind", "127.0.0.1",
                     "--cluster-enabled", "yes", "--cluster-config-file",
                     str(node_dir / "nodes.conf"), "--cluster-node-timeout", "5000",
                     "--save", "", "--appendonly", "no", "--dir", str(node_dir)],
                    stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent))
            for port in self.ports:
                wait_for_redis(f"redis://127.0.0.1:{port}/0", timeout)
            subprocess.run([str(redis_cli_binary()), "--cluster", "create", *self.nodes,
                            "--cluster-replicas", "0", "--cluster-yes"],
                           check=True, capture_output=True, timeout=timeout)
            self.wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Block until every node reports ``cluster_state:ok`` and knows every other node."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = []
            for port in self.ports:
                info = redis.Redis(port=port).cluster("info")
                states.append(info.get("cluster_state") == "ok"
                              and int(info.get("cluster_known_nodes", 0)) == self.masters)
            if all(states):
                return
            time.sleep(0.1)
        raise TimeoutError(f"Redis Cluster on {self.nodes} not ok within {timeout:.0f}s")

    def master_of(self, slot: int) -> int:
        """The port of the master serving ``slot`` now."""
        for start, end, (_host, port, *_rest), *_replicas in redis.Redis(
                port=self.ports[0]).execute_command("CLUSTER SLOTS"):
            if start <= slot <= end:
                return int(port)
        raise LookupError(f"slot {slot} is not covered")

    def migrate_slot(self, slot: int, to: int | None = None, pause_s: float = 0.0
                     ) -> tuple[int, int]:
        """Move ``slot`` to master ``to`` (another one when None) while clients keep using it:
        ``CLUSTER SETSLOT IMPORTING/MIGRATING``, ``MIGRATE`` key by key (``pause_s`` between
        keys, so writes land mid-move and see ASK/TRYAGAIN), then ``SETSLOT NODE`` everywhere
        — what ``redis-cli --cluster reshard`` does. Returns (source port, destination port).
        """
        src = self.master_of(slot)
        dst = to if to is not None else next(p for p in self.ports if p != src)
        nodes = {p: redis.Redis(port=p) for p in self.ports}
        ids = {p: n.execute_command("CLUSTER MYID").decode() for p, n in nodes.items()}
        nodes[dst].execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[src])
        nodes[src].execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[dst])
        while keys := nodes[src].execute_command("CLUSTER GETKEYSINSLOT", slot, 1):
            nodes[src].execute_command("MIGRATE", "127.0.0.1", dst, "", 0, 5000, "KEYS", *keys)
            time.sleep(pause_s)
        for n in nodes.values():
            n.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[dst])
        for n in nodes.values():
            n.close()
        return src, dst

    def masters_holding(self, pattern: str) -> int:
        """How many masters hold at least one key matching ``pattern``."""
        held = 0
        for port in self.ports:
            client = redis.Redis(port=port)
            held += next(iter(client.scan_iter(match=pattern, count=1000)), None) is not None
            client.close()
        return held

    def stop(self) -> None:
        for proc in self.procs:
            stop_child(proc, grace=5.0)
        self.procs.clear()

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["LocalRedisCluster", "redis_cli_binary"]
