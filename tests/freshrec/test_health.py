"""/healthz of the trainer and the joiner follows their loop's heartbeat, not the HTTP thread."""

from __future__ import annotations

import time

import httpx
from prometheus_client import CollectorRegistry, Counter

from freshrec.health import Heartbeat, serve_metrics_and_health


def test_healthz_fails_before_the_first_beat_and_after_a_silence() -> None:
    registry = CollectorRegistry()
    Counter("demo_loops", "Loops.", registry=registry).inc(3)
    heartbeat = Heartbeat()
    server = serve_metrics_and_health(0, registry, heartbeat, timeout_s=0.3, addr="127.0.0.1")
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        assert httpx.get(f"{url}/healthz").status_code == 503  # loop not started yet
        heartbeat.beat()
        assert httpx.get(f"{url}/healthz").status_code == 200
        time.sleep(0.5)  # the loop wedges: no beat for longer than the timeout
        stale = httpx.get(f"{url}/healthz")
        assert stale.status_code == 503 and "silent" in stale.text
        assert "demo_loops_total 3.0" in httpx.get(f"{url}/metrics").text  # metrics still up
        heartbeat.beat()
        assert httpx.get(f"{url}/healthz").status_code == 200
    finally:
        server.shutdown()
        server.server_close()
