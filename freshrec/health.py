"""Liveness of the trainer and the joiner: ``/healthz`` follows their processing loops.

A process whose metrics thread answers while its loop is wedged (a deadlock, a hung native
call, an endless retry) is not alive, so the orchestrator must restart it. Each loop beats a
:class:`Heartbeat` once per iteration, also when no input arrives; ``/healthz`` on the metrics
port answers 503 until the first beat (start-up, checkpoint restore) and once the loop has been
silent longer than the configured timeout. Every other path serves the Prometheus metrics.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app


class Heartbeat:
    """When the loop last came round (monotonic seconds); beaten by the loop, read by HTTP."""

    def __init__(self) -> None:
        self._last: float | None = None  # a float store is atomic under the GIL

    def beat(self) -> None:
        """The loop is making progress."""
        self._last = time.monotonic()

    def silent_for(self) -> float | None:
        """Seconds since the last beat; None before the first one."""
        last = self._last
        return None if last is None else time.monotonic() - last


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds would flood the log."""


def health_app(heartbeat: Heartbeat, timeout_s: float,
               registry: CollectorRegistry) -> Callable[..., Iterable[bytes]]:
    """WSGI app: ``/healthz`` from the heartbeat, everything else the metrics of ``registry``."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/healthz":
            return metrics(environ, start_response)
        silent = heartbeat.silent_for()
        if silent is None:
            status, body = "503 Service Unavailable", "starting: the loop has not run yet\n"
        elif silent > timeout_s:
            status, body = "503 Service Unavailable", f"loop silent for {silent:.0f} s\n"
        else:
            status, body = "200 OK", f"ok: loop beat {silent:.1f} s ago\n"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [body.encode()]

    return app


def serve_metrics_and_health(port: int, registry: CollectorRegistry, heartbeat: Heartbeat,
                             timeout_s: float, addr: str = "0.0.0.0") -> WSGIServer:
    """Serve ``/metrics`` and ``/healthz`` on ``port`` from a daemon thread; returns the server
    (``server.server_port`` is the bound port when ``port`` is 0)."""
    server = make_server(addr, port, health_app(heartbeat, timeout_s, registry), _Server,
                         handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
