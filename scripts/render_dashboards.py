"""Render the Grafana dashboards' panels to PNG from real Prometheus data.

Grafana is not needed: each panel's PromQL (from ``dashboards/*.json``, the one source of truth)
is evaluated through Prometheus' HTTP API (``/api/v1/query_range``) and drawn with matplotlib,
one PNG per dashboard, so readers of ``docs/`` see what the dashboards show.

    # start the embedded stack + a real Prometheus, replay a synthetic stream, send score
    # requests for --seconds, then render into docs/dashboards/
    python scripts/render_dashboards.py --seconds 90

    # render from a Prometheus you already run (e.g. the compose stack's)
    python scripts/render_dashboards.py --prometheus http://localhost:9090 --minutes 30

:class:`LiveStack` is also what ``tests/ops/test_dashboards_live.py`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from freshrec.devstack import free_port

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_DIR = ROOT / "dashboards"
RATE_INTERVAL = "15s"  # what Grafana's $__rate_interval becomes at a 1 s scrape interval


# --- dashboards and PromQL ----------------------------------------------------------------------

def dashboard_panels(path: Path) -> list[dict[str, Any]]:
    """The panels of one dashboard that have queries, in layout order."""
    def walk(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in items:
            yield from walk(item.get("panels", []))
            if item.get("targets"):
                yield item

    found = list(walk(json.loads(path.read_text())["panels"]))
    return sorted(found, key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))


def to_promql(expr: str, rate_interval: str = RATE_INTERVAL) -> str:
    """Replace the Grafana variables the dashboards use."""
    return expr.replace("$__rate_interval", rate_interval).replace("$__interval", rate_interval)


def _get_json(url: str, timeout: float = 10.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def prom_query(prom_url: str, expr: str) -> list[dict[str, Any]]:
    """Instant query; the result vector (raises on a PromQL error)."""
    body = _get_json(f"{prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    if body["status"] != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def prom_query_range(prom_url: str, expr: str, start: float, end: float, step: float
                     ) -> list[dict[str, Any]]:
    """Range query; the result matrix."""
    params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step}"}
    body = _get_json(f"{prom_url}/api/v1/query_range?" + urllib.parse.urlencode(params))
    if body["status"] != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def has_finite_value(result: list[dict[str, Any]]) -> bool:
    """True if an instant-query result holds at least one finite number."""
    return any(math.isfinite(float(r["value"][1])) for r in result)


def _legend(fmt: str, labels: dict[str, str]) -> str:
    out = fmt or ", ".join(f"{k}={v}" for k, v in labels.items())
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out


def render_dashboard(path: Path, prom_url: str, start: float, end: float, out_dir: Path
                     ) -> Path:
    """Draw every panel of one dashboard into ``out_dir/<name>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads(path.read_text())
    found = dashboard_panels(path)
    cols = 3
    rows = math.ceil(len(found) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(15, 3.2 * rows), squeeze=False)
    step = max(1.0, (end - start) / 300)
    for ax, panel in zip(axes.flat, found, strict=False):
        for target in panel["targets"]:
            for series in prom_query_range(prom_url, to_promql(target["expr"]), start, end, step):
                ts = [float(t) - start for t, _ in series["values"]]
                vs = [float(v) for _, v in series["values"]]
                ax.plot(ts, vs, label=_legend(target.get("legendFormat", ""), series["metric"]))
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel("seconds", fontsize=8)
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        if unit and unit not in ("none", "short"):
            ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(found):]:
        ax.axis("off")
    fig.suptitle(f"{dashboard['title']}  (Prometheus data, {end - start:.0f} s)", fontsize=13)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{path.stem}.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


# --- a live stack: embedded broker + Redis + trainer + service, Prometheus, score load ----------

def _wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} while waiting for {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    raise TimeoutError(f"{url} not answering after {timeout:.0f}s")


@dataclass
class LiveStack:
    """``freshrec dev up`` (trainer + service + synthetic replay) scraped by a real Prometheus.

    While it runs, a thread sends ``/v1/score`` requests (so the service panels have data) and a
    few malformed events go to the events topic (so the dead-letter series exists).
    """

    workdir: Path
    events: int = 150_000
    max_rate: float = 2_500.0
    score_rps: float = 40.0
    kafka_port: int = field(default_factory=free_port)
    redis_port: int = field(default_factory=free_port)
    trainer_port: int = field(default_factory=free_port)
    joiner_port: int = field(default_factory=free_port)
    service_port: int = field(default_factory=free_port)
    prom_port: int = field(default_factory=free_port)
    started_at: float = 0.0
    procs: list[subprocess.Popen] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    score_requests: int = 0
    score_errors: int = 0

    @property
    def prom_url(self) -> str:
        return f"http://127.0.0.1:{self.prom_port}"

    @property
    def service_url(self) -> str:
        return f"http://127.0.0.1:{self.service_port}"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_")}
        env.update({
            "FRESHREC_TRAINER_METRICS_PORT": str(self.trainer_port),
            "FRESHREC_SERVICE_PORT": str(self.service_port),
            "FRESHREC_DATA_DIR": str(self.workdir / "data"),
            "FRESHREC_TRAINER_CHECKPOINT_DIR": str(self.workdir / "checkpoints"),
            "FRESHREC_TRAINER_CHECKPOINT_INTERVAL_S": "5",
            "FRESHREC_TOPIC_PARTITIONS": "2",
            # Short attribution windows so the joiner's labeled-impression panels (exploration
            # cost) fill within the test's budget; production keeps the 300 s default.
            "FRESHREC_JOINER_METRICS_PORT": str(self.joiner_port),
            "FRESHREC_JOINER_WINDOW_S": "2",
            "FRESHREC_JOINER_LATENESS_S": "0.2",
            # A bonus weight that puts explored items among the shown ones within seconds.
            "FRESHREC_BANDIT_ALPHA": "1.0",
            "FRESHREC_JOINER_CHECKPOINT_DIR": str(self.workdir / "joiner-checkpoints"),
        })
        return env

    def _prometheus_config(self) -> Path:
        jobs = (("freshrec-trainer", self.trainer_port), ("freshrec-joiner", self.joiner_port),
                ("freshrec-service", self.service_port))
        lines = ["global:", "  scrape_interval: 1s", "  evaluation_interval: 1s",
                 "scrape_configs:"]
        for job, port in jobs:
            lines += [f"  - job_name: {job}", "    static_configs:",
                      f"      - targets: ['127.0.0.1:{port}']"]
        path = self.workdir / "prometheus.yml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 90.0) -> LiveStack:
        """Start Prometheus and the stack; return once the service is ready to score."""
        prometheus = shutil.which("prometheus")
        if prometheus is None:
            raise FileNotFoundError("prometheus not installed (apt-get install prometheus)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "prometheus.log", "ab")  # noqa: SIM115 - child owns it
        self.procs.append(subprocess.Popen(
            [prometheus, f"--config.file={self._prometheus_config()}",
             f"--storage.tsdb.path={self.workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.prom_port}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        log = open(self.workdir / "devstack.log", "ab")  # noqa: SIM115 - child owns it
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "freshrec.cli", "dev", "up",
             "--kafka-port", str(self.kafka_port), "--redis-port", str(self.redis_port),
             "--partitions", "2", "--log-dir", str(self.workdir / "logs"),
             "--replay", "synthetic", "--events", str(self.events),
             "--max-rate", str(self.max_rate), "--quiet"],
            cwd=ROOT, env=self._env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True))
        self.started_at = time.time()
        try:
            _wait_http(f"{self.prom_url}/-/ready", timeout, self.procs[0])
            _wait_http(f"{self.service_url}/readyz", timeout, self.procs[1])
        except BaseException:
            self.stop()
            raise
        for target in (self._score_loop, self._dead_letters):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _score_loop(self) -> None:
        import numpy as np

        from freshrec.synthetic import SyntheticConfig, SyntheticStream

        stream = SyntheticStream(SyntheticConfig(seed=1))
        rng = np.random.default_rng(1)
        items = rng.integers(0, 2_000, size=400)
        item_feats = dict(zip(items.tolist(), stream.item_features(items), strict=True))
        users = rng.integers(0, 5_000, size=200)
        user_feats = list(zip(users.tolist(), stream.user_features(users), strict=True))
        from confluent_kafka import Producer

        clicks = Producer({"bootstrap.servers": f"127.0.0.1:{self.kafka_port}"})
        pause = 1.0 / self.score_rps
        while not self._stop.is_set():
            user, feats = user_feats[self.score_requests % len(user_feats)]
            chosen = rng.choice(list(item_feats), size=50, replace=False)
            body = {"user_id": f"u{user}", "features": feats, "top_k": 10, "explore": True,
                    "candidates": [{"item_id": f"i{i}", "features": item_feats[int(i)]}
                                   for i in chosen]}
            request = urllib.request.Request(
                f"{self.service_url}/v1/score", data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"}, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=5) as resp:
                    served = json.loads(resp.read())
                self._click_some(clicks, f"u{user}", served, rng)
            except (urllib.error.URLError, OSError, ValueError):
                self.score_errors += 1
            self.score_requests += 1
            self._stop.wait(pause)
        clicks.flush(10)

    @staticmethod
    def _click_some(producer: Any, user_id: str, served: dict, rng: Any) -> None:
        """Click about one shown item in ten, so the joiner labels clicks and non-clicks of
        explored and exploited impressions alike (the exploration panels need both)."""
        for item in served["items"]:
            if rng.random() < 0.1:
                click = {"event_id": f"c{rng.integers(1 << 62)}", "ts": time.time(),
                         "user_id": user_id, "item_id": item["item_id"],
                         "request_id": served["request_id"]}
                producer.produce("freshrec.clicks", json.dumps(click).encode(),
                                 key=user_id.encode())
        producer.poll(0)

    def _dead_letters(self) -> None:
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": f"127.0.0.1:{self.kafka_port}"})
        for i in range(20):
            producer.produce("freshrec.events", key=b"bad", value=b'{"not": "an event %d"}' % i)
            if self._stop.wait(0.5):
                break
        producer.flush(10)

    def stop(self) -> None:
        """Stop the load, then SIGTERM (and if need be SIGKILL) the processes it started."""
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        self.procs.clear()

    def __enter__(self) -> LiveStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Render every dashboard, from a running Prometheus or from a live stack started here."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", help="render from this Prometheus (no stack started)")
    parser.add_argument("--minutes", type=float, default=30, help="with --prometheus: range")
    parser.add_argument("--seconds", type=float, default=90, help="live stack: how long to run")
    parser.add_argument("--events", type=int, default=200_000, help="live stack: replay size")
    parser.add_argument("--out", default=str(ROOT / "docs" / "dashboards"))
    parser.add_argument("--workdir", default=None, help="live stack: where logs and TSDB go")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.prometheus:
        end = time.time()
        start, prom = end - 60 * args.minutes, args.prometheus.rstrip("/")
    else:
        import tempfile

        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="freshrec-dashboards-"))
        rate = args.events / max(args.seconds, 1.0)
        stack = LiveStack(workdir, events=args.events, max_rate=rate).start()
        try:
            time.sleep(args.seconds)
            start, end, prom = stack.started_at, time.time(), stack.prom_url
            for path in sorted(DASHBOARD_DIR.glob("*.json")):
                print(render_dashboard(path, prom, start, end, out))
        finally:
            stack.stop()
        print(f"logs and TSDB in {workdir}")
        return 0
    for path in sorted(DASHBOARD_DIR.glob("*.json")):
        print(render_dashboard(path, prom, start, end, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
