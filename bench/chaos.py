"""Chaos suite: kill -9, restarts and hostile input against the real processes; nothing is lost.

Every case runs the shipped processes (``freshrec trainer|joiner|service`` as subprocesses, a
Tansu broker, a redis-server) with default settings except checkpoint intervals, which are short
so that kills land between checkpoints often. Cases:

* trainer kills: a replay of synthetic events (a few dated in the future, which must be
  dead-lettered); the trainer is ``kill -9``-ed at random points and restarted each time. Then
  every produced event id must be in the trainer's audit log (applied) or in the DLQ;
  re-applications after a crash (at-least-once) are counted separately.
* joiner kills: a live stream of impressions and clicks; the joiner is ``kill -9``-ed at random
  points. Every shown item must get exactly its true label (a repeat is allowed, a flip is not).
* a live pipeline (trainer + joiner + service) under a poller of ``/v1/model``:
  malformed Kafka messages of many kinds (all must reach the DLQ with a reason, the trainer
  keeps training), Redis killed and restarted empty (the service stays ready on its last
  snapshot, the trainer republishes, the service catches up), the broker killed and restarted
  (Tansu keeps no data, so topics are recreated: the production broker is durable, see
  docs/operations.md), and fuzzed HTTP requests (``bench/http_fuzz.py``; no 5xx). Served
  versions must never go backwards.

``python -m bench.chaos`` writes ``bench/results/chaos.json``; ``--quick`` runs a few of each
case in a few minutes. The cheap cases also run as tests (tests/integration/test_chaos.py).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from confluent_kafka import KafkaError, KafkaException, Producer

from featurestore.events import Click, Impression, ShownItem
from freshrec.devstack import (
    die_with_parent,
    free_port,
    redis_server_binary,
    stop_child,
    tansu_binary,
    wait_for_redis,
    wait_http_ok,
)
from freshrec.kafka import (
    DeliveryTracker,
    create_topics,
    drain_topic,
    produce_all,
    producer_config,
    producer_is_stuck,
    wait_for_broker,
)
from freshrec.metrics import scrape
from freshrec.settings import Settings, to_environ
from freshrec.synthetic import SyntheticConfig, SyntheticStream

RESULTS = Path(__file__).resolve().parent / "results"
CHAOS_TOKEN = "chaos-suite-events-token"  # a throwaway credential for the local service
TOKEN_VAR = "FRESHREC_SERVICE_API_TOKEN"
KEYS = ("trainer_kills", "trainer_lost_events", "trainer_duplicate_events", "joiner_kills",
        "joiner_lost_labels", "redis_restarts_survived", "broker_restarts_survived",
        "malformed_sent", "malformed_dead_lettered", "http_fuzz_requests", "http_5xx",
        "versions_monotone")


# --------------------------------------------------------------------------------------------
# infrastructure that can be killed and brought back on the same ports


@dataclass
class Infra:
    """A Tansu broker and a redis-server on fixed loopback ports, restartable one at a time."""

    log_dir: Path
    kafka_port: int = field(default_factory=free_port)
    redis_port: int = field(default_factory=free_port)
    kafka: subprocess.Popen | None = None
    redis: subprocess.Popen | None = None
    topics: list[tuple[str, int]] = field(default_factory=list)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent)

    def start_kafka(self) -> None:
        url = f"tcp://127.0.0.1:{self.kafka_port}"
        self.kafka = self._spawn("kafka", [str(tansu_binary()), "broker", "--listener-url", url,
                                           "--advertised-listener-url", url,
                                           "--storage-engine", "memory://tansu/"])
        wait_for_broker(self.bootstrap, 30)
        for topic, partitions in self.topics:  # memory-only: a restarted broker has none
            create_topics(self.bootstrap, [topic], partitions)

    def start_redis(self) -> None:
        self.redis = self._spawn("redis", [str(redis_server_binary()), "--port",
                                           str(self.redis_port), "--bind", "127.0.0.1",
                                           "--save", "", "--appendonly", "no"])
        wait_for_redis(self.redis_url, 15)

    def add_topics(self, names: list[str], partitions: int) -> None:
        self.topics += [(n, partitions) for n in names]
        create_topics(self.bootstrap, names, partitions)

    def kill_kafka(self) -> None:
        _kill9(self.kafka)

    def kill_redis(self) -> None:
        _kill9(self.redis)

    def __enter__(self) -> Infra:
        self.start_kafka()
        self.start_redis()
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in (self.kafka, self.redis):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                with suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
                if proc.poll() is None:
                    _kill9(proc)


def _kill9(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def base_settings(infra: Infra, name: str, work: Path, partitions: int = 2) -> Settings:
    """Settings for one case: its own topics, groups, model name and directories."""
    s = Settings(
        kafka_bootstrap=infra.bootstrap, redis_url=infra.redis_url,
        topic_events=f"{name}.events", topic_impressions=f"{name}.impressions",
        topic_clicks=f"{name}.clicks", topic_dlq=f"{name}.events.dlq",
        topic_partitions=partitions, model_name=name,
        trainer_group_id=f"{name}-trainer", joiner_group_id=f"{name}-joiner",
        trainer_checkpoint_dir=work / name / "checkpoints",
        joiner_checkpoint_dir=work / name / "joiner-checkpoints",
        trainer_metrics_port=0, joiner_metrics_port=0, data_dir=work / name)
    infra.add_topics([s.topic_events, s.topic_impressions, s.topic_clicks, s.topic_dlq],
                     partitions)
    return s


def start(component: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """``freshrec <component>`` as a child process (dies with this one)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "freshrec.cli", component], env=env,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            preexec_fn=die_with_parent)


def stop(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    """SIGTERM (a normal stop: final checkpoint), then wait; the exit code."""
    stop_child(proc, grace=timeout)
    return proc.returncode


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             alive: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {alive.returncode}")
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    """Produce ``(key, value)`` pairs; raise if any delivery fails."""
    producer = Producer(producer_config(bootstrap))
    tracker = DeliveryTracker()
    produce_all(producer, topic, messages, tracker)
    if producer.flush(60) or tracker.failed:
        raise RuntimeError(f"produce to {topic} failed: {tracker.errors[:3]}")


def checkpointed(checkpoint_dir: Path, topic: str) -> int:
    """Messages of ``topic`` covered by the latest checkpoint in ``checkpoint_dir``."""
    latest = checkpoint_dir / "LATEST"
    try:
        manifest = json.loads((checkpoint_dir / latest.read_text().strip() / "manifest.json")
                              .read_text())
    except (OSError, ValueError):
        return 0
    return sum(manifest["offsets"].get(topic, {}).values())


def line_count(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


# --------------------------------------------------------------------------------------------
# case 1: kill -9 the trainer during a replay


def trainer_kills(infra: Infra, work: Path, kills: int, n_events: int, rng: random.Random,
                  log: Callable[[str], None] = print) -> dict:
    """Kill the trainer ``kills`` times mid-replay; every event trained or dead-lettered."""
    s = base_settings(infra, "chaos-trainer", work)
    events = list(SyntheticStream(SyntheticConfig(seed=rng.randrange(1 << 30))).events(n_events))
    future = set(range(997, n_events, 4999))  # dated 2096: must be dead-lettered, not trained
    for i in future:
        events[i] = dict(events[i], ts=4.0e9)
    produce(s.kafka_bootstrap, s.topic_events,
            [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in events])
    audit = work / "chaos-trainer" / "audit.log"
    env = to_environ(s, trainer_checkpoint_interval_s=2.0, trainer_audit_log=audit)
    logs = work / "chaos-trainer" / "logs"
    done = 0
    for k in range(kills):
        if checkpointed(s.trainer_checkpoint_dir, s.topic_events) >= n_events:
            log(f"  replay finished after {done} kills; use more events")
            break
        proc = start("trainer", env, logs / f"trainer-{k}.log")
        applied = line_count(audit)
        wait_for(lambda a=applied: line_count(audit) > a, 120, "the trainer to train", proc)
        time.sleep(rng.uniform(0.0, 1.5))  # a random point in the replay
        if proc.poll() is not None:
            raise RuntimeError(f"trainer exited on its own ({proc.returncode})")
        _kill9(proc)
        done += 1
        log(f"  trainer kill {done}/{kills}: {line_count(audit)} applied, "
            f"{checkpointed(s.trainer_checkpoint_dir, s.topic_events)} checkpointed")
    final = start("trainer", env, logs / "trainer-final.log")
    wait_for(lambda: checkpointed(s.trainer_checkpoint_dir, s.topic_events) >= n_events, 600,
             "the trainer to finish the replay", final)
    if stop(final) != 0:
        raise RuntimeError("the final trainer did not stop cleanly")
    applied_ids = audit.read_text().split()
    dead = {orjson.loads(m.value())["event_id"]
            for m in drain_topic(s.kafka_bootstrap, s.topic_dlq)}
    produced = {e["event_id"] for e in events}
    trained = set(applied_ids)
    return {"trainer_kills": done,
            "trainer_lost_events": len(produced - trained - dead),
            "trainer_duplicate_events": len(applied_ids) - len(trained),
            "_trainer_produced": len(produced), "_trainer_trained": len(trained),
            "_trainer_dead_lettered": len(dead),
            "_trainer_future_sent": len(future),
            "_trainer_future_dead_lettered": len({events[i]["event_id"] for i in future} & dead),
            "_trainer_wrongly_dead_lettered": len(trained & dead)}


# --------------------------------------------------------------------------------------------
# case 2: kill -9 the joiner on a live stream


class LiveJoinerInput:
    """Impressions (4 items) and clicks at ``rate`` requests/s, stamped with wall clock."""

    def __init__(self, s: Settings, rate: float, seed: int) -> None:
        self.s, self.rate = s, rate
        self.rng = random.Random(seed)
        self.expected: dict[str, int] = {}
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        # Batches of ~20 messages, as a busy producer sends: at 200 messages/s a 5 ms linger
        # made one record batch per message, and the test broker's fetch cost grows with the
        # number of batches in a partition, so a joiner restarted late in the run crawled
        # through its backlog and the case reported unwritten labels as lost.
        producer = Producer(producer_config(self.s.kafka_bootstrap, **{"linger.ms": 100}))
        tracker = DeliveryTracker()
        n = 0
        try:
            while not self._stop.is_set():
                now = time.time()
                rid, user = f"r{n}", f"u{n % 97}"
                items = [ShownItem(item_id=f"i{(n + k) % 50}", position=k, score=1.0, pctr=0.1)
                         for k in range(4)]
                imp = Impression(request_id=rid, ts=now, user_id=user, model_version=1,
                                 features={"age": "30"}, items=items)
                producer.produce(self.s.topic_impressions, imp.to_json(), user.encode(),
                                 on_delivery=tracker)
                for it in items:
                    self.expected[f"{rid}:{it.item_id}"] = 0
                if self.rng.random() < 0.3:
                    it = self.rng.choice(items)
                    click = Click(event_id=f"c{n}", ts=now + 1.0, user_id=user,
                                  item_id=it.item_id, request_id=rid)
                    producer.produce(self.s.topic_clicks, click.to_json(), user.encode(),
                                     on_delivery=tracker)
                    self.expected[f"{rid}:{it.item_id}"] = 1
                n += 1
                self.sent = n
                producer.poll(0)
                time.sleep(1.0 / self.rate)
            if producer.flush(60) or tracker.failed:
                raise RuntimeError(f"joiner input delivery failed: {tracker.errors[:3]}")
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def start(self) -> LiveJoinerInput:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)
        if self.error is not None:
            raise self.error


def joiner_kills(infra: Infra, work: Path, kills: int, rng: random.Random,
                 log: Callable[[str], None] = print) -> dict:
    """Kill the joiner ``kills`` times on a live stream; no label lost or flipped."""
    s = base_settings(infra, "chaos-joiner", work)
    env = to_environ(s, trainer_checkpoint_interval_s=0.3, joiner_window_s=5.0,
                     joiner_lateness_s=0.5)
    logs = work / "chaos-joiner" / "logs"
    source = LiveJoinerInput(s, rate=200.0, seed=rng.randrange(1 << 30)).start()
    ckpt = s.joiner_checkpoint_dir
    done = 0
    try:
        for k in range(kills):
            proc = start("joiner", env, logs / f"joiner-{k}.log")
            covered = checkpointed(ckpt, s.topic_impressions)
            wait_for(lambda c=covered: checkpointed(ckpt, s.topic_impressions) > c, 120,
                     "the joiner to checkpoint progress", proc)
            time.sleep(rng.uniform(0.0, 2.0))
            if proc.poll() is not None:
                raise RuntimeError(f"joiner exited on its own ({proc.returncode})")
            _kill9(proc)
            done += 1
            log(f"  joiner kill {done}/{kills}: {source.sent} requests sent")
    finally:
        source.stop()
    final = start("joiner", env, logs / "joiner-final.log")
    expected = source.expected
    got: dict[str, list[int]] = {}

    def all_labeled() -> bool:
        got.clear()
        for m in drain_topic(s.kafka_bootstrap, s.topic_events):
            e = orjson.loads(m.value())
            got.setdefault(e["event_id"], []).append(e["label"])
        return set(expected) <= set(got)

    # First until the final joiner has read and checkpointed every impression (a manifest read),
    # then drain the labels. Draining the whole events topic every few seconds meanwhile (the
    # earlier loop) loaded the test broker so much that the joiner's own fetches crawled: after
    # 5 kills the topic holds ~100 k labels and the check itself kept the joiner from finishing.
    with suppress(TimeoutError):  # what is missing then is counted as lost
        deadline = time.monotonic() + 300
        while (time.monotonic() < deadline
               and checkpointed(ckpt, s.topic_impressions) < source.sent):
            time.sleep(1)
        while time.monotonic() < deadline and not all_labeled():
            time.sleep(10)
    if stop(final) != 0:
        raise RuntimeError("the final joiner did not stop cleanly")
    all_labeled()
    lost = [k for k in expected if k not in got]
    flipped = [k for k, v in got.items() if k in expected and set(v) != {expected[k]}]
    return {"joiner_kills": done, "joiner_lost_labels": len(lost) + len(flipped),
            "_joiner_labels": len(expected), "_joiner_missing": len(lost),
            "_joiner_flipped": len(flipped),
            "_joiner_repeated": sum(len(v) - 1 for v in got.values())}


# --------------------------------------------------------------------------------------------
# case 3: the live pipeline under Redis and broker restarts, malformed input and HTTP fuzzing


def malformed_messages(n: int, base: dict) -> list[tuple[bytes, bytes]]:
    """``n`` malformed event messages cycling through every kind; key ``bad-<kind>-<i>``."""
    def doc(**changes: object) -> bytes:
        return orjson.dumps({**base, **changes})

    deep: object = "x"
    for _ in range(2000):
        deep = [deep]
    kinds: dict[str, Callable[[int], bytes]] = {
        "not_json": lambda i: b"{not json %d" % i,
        "empty": lambda i: b"",
        "json_array": lambda i: b"[1, 2, %d]" % i,
        "missing_user_id": lambda i: orjson.dumps({k: v for k, v in base.items()
                                                   if k != "user_id"} | {"event_id": f"m{i}"}),
        "label_out_of_range": lambda i: doc(event_id=f"l{i}", label=2),
        "label_wrong_type": lambda i: doc(event_id=f"w{i}", label="yes"),
        "negative_ts": lambda i: doc(event_id=f"n{i}", ts=-5.0),
        "future_ts": lambda i: doc(event_id=f"f{i}", ts=time.time() + 86400.0),
        "id_too_long": lambda i: doc(event_id="x" * 500 + str(i)),
        "too_many_features": lambda i: doc(event_id=f"t{i}",
                                           features={f"k{j}": j for j in range(100)}),
        "invalid_utf8": lambda i: doc(event_id=f"u{i}")[:-2] + b'"\xff\xfe"}',
        "nan_ts": lambda i: doc(event_id=f"nan{i}").replace(
            b'"ts":' + orjson.dumps(base["ts"]), b'"ts":NaN'),
        "int_beyond_int64": lambda i: doc(event_id=f"big{i}").replace(
            b'"label":' + orjson.dumps(base["label"]), b'"label":99999999999999999999999'),
        "deep_nesting": lambda i: orjson.dumps({**base, "event_id": f"d{i}"})[:-1]
        + b',"features":{"a":' + b"[" * 5000 + b"]" * 5000 + b"}}",
        "oversized": lambda i: doc(event_id=f"o{i}", user_id="u" * 400_000),
    }
    names = list(kinds)
    return [(f"bad-{names[i % len(names)]}-{i}".encode(), kinds[names[i % len(names)]](i))
            for i in range(n)]


class VersionPoller:
    """Polls ``GET /v1/model`` and records served versions and readiness.

    Each request is a new connection, so successive answers may come from different service
    workers, each following the update stream on its own: versions are checked per worker
    (``worker_pid``), the guarantee a client of one replica gets.
    """

    def __init__(self, base_url: str, interval: float = 0.1) -> None:
        self.url, self.interval = base_url + "/v1/model", interval
        self.versions: list[int] = []
        self.by_worker: dict[int, list[int]] = {}
        self.not_ready = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=2) as resp:
                    info = orjson.loads(resp.read())
                if info.get("ready") and info.get("version") is not None:
                    self.versions.append(int(info["version"]))
                    self.by_worker.setdefault(int(info.get("worker_pid", 0)), []).append(
                        int(info["version"]))
                else:
                    self.not_ready += 1
            except (urllib.error.URLError, OSError, ValueError):
                self.errors += 1
            self._stop.wait(self.interval)

    @property
    def latest(self) -> int:
        return max((v[-1] for v in self.by_worker.values()), default=0)

    @property
    def monotone(self) -> bool:
        return all(b >= a for versions in self.by_worker.values()
                   for a, b in itertools.pairwise(versions))

    def start(self) -> VersionPoller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


class EventFeed:
    """Labeled events into the events topic at a steady rate, so the trainer keeps publishing."""

    def __init__(self, s: Settings, rate: float, seed: int) -> None:
        self.s, self.rate = s, rate
        self.stream = SyntheticStream(SyntheticConfig(seed=seed))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        producer = Producer(producer_config(self.s.kafka_bootstrap))
        chunk = max(1, int(self.rate / 10))
        stuck = threading.Event()

        def report(err: KafkaError | None, _msg: object) -> None:
            if producer_is_stuck(err):
                stuck.set()

        while not self._stop.is_set():
            try:
                for e in self.stream.chunk(chunk):
                    with suppress(BufferError):
                        producer.produce(self.s.topic_events, orjson.dumps(e),
                                         str(e["user_id"]).encode(), on_delivery=report)
                producer.poll(0)
            except KafkaException:
                stuck.set()
            if stuck.is_set():
                # A memory-only broker that restarted forgot the idempotent producer's id: the
                # producer is fatal or stalls (``producer_is_stuck``). Start a new one.
                stuck.clear()
                producer = Producer(producer_config(self.s.kafka_bootstrap))
            self._stop.wait(0.1)
        producer.flush(10)

    def start(self) -> EventFeed:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


@dataclass
class Pipeline:
    """Trainer, joiner and service processes on one set of settings, under a supervisor.

    The supervisor restarts a process that exits, as the deployments do (compose
    ``restart: unless-stopped``, Kubernetes ``restartPolicy: Always``); every restart is
    counted. A crash loop is a process that needs more than one restart for one fault.
    """

    s: Settings
    env: dict[str, str]
    logs: Path
    service_port: int
    trainer_port: int
    joiner_port: int
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.service_port}"

    def start(self) -> None:
        for name in ("trainer", "joiner", "service"):
            self.procs[name] = start(name, self.env, self.logs / f"{name}.log")
            self.restarts[name] = 0
        wait_http_ok(self.base_url + "/readyz", timeout=180)
        threading.Thread(target=self._supervise, daemon=True).start()

    def _supervise(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                for name, proc in list(self.procs.items()):
                    if proc.poll() is not None and not self._stop.is_set():
                        self.restarts[name] += 1
                        self.procs[name] = start(name, self.env, self.logs / f"{name}.log")

    def total_restarts(self) -> int:
        return sum(self.restarts.values())

    def dead(self) -> list[str]:
        return [f"{n} ({p.returncode})" for n, p in self.procs.items() if p.poll() is not None]

    def trained(self) -> float:
        return scrape(f"http://127.0.0.1:{self.trainer_port}/metrics").get(
            "freshrec_trainer_events_total{outcome=trained}", 0.0)

    def joined(self) -> float:
        """Impressions the joiner has consumed (its counter restarts with the process)."""
        return scrape(f"http://127.0.0.1:{self.joiner_port}/metrics").get(
            "freshrec_joiner_impressions_total", 0.0)

    def score(self, rng: random.Random) -> int:
        """One valid ``POST /v1/score``; its status (0 when unanswered)."""
        from bench.http_fuzz import valid_score
        req = urllib.request.Request(self.base_url + "/v1/score",
                                     data=orjson.dumps(valid_score(rng)),
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, OSError):
            return 0

    def ready(self) -> bool:
        # A generous timeout: on a loaded 2-core machine a slow answer is not an unready one.
        try:
            with urllib.request.urlopen(self.base_url + "/readyz", timeout=5) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for proc in self.procs.values():
                stop(proc, 30)


@contextmanager
def live_pipeline(infra: Infra, work: Path, seed: int) -> Iterator[tuple[Pipeline, VersionPoller]]:
    s = base_settings(infra, "chaos-live", work)
    service_port, trainer_port, joiner_port = free_port(), free_port(), free_port()
    env = to_environ(s, service_port=service_port, service_api_token=CHAOS_TOKEN,
                     trainer_metrics_port=trainer_port,
                     joiner_metrics_port=joiner_port, trainer_checkpoint_interval_s=2.0,
                     trainer_publish_interval_ms=100)
    pipe = Pipeline(s, env, work / "chaos-live" / "logs", service_port, trainer_port,
                    joiner_port)
    feed = EventFeed(s, rate=500.0, seed=seed).start()
    poller: VersionPoller | None = None
    try:
        pipe.start()
        # /readyz answered by one worker says nothing of the other: wait until a run of probes
        # (spread over the SO_REUSEPORT workers by the kernel) all find a snapshot loaded, or
        # a fault injected now would find a worker with nothing to serve yet.
        wait_for(lambda: all(pipe.ready() for _ in range(12)), 120,
                 "every service worker to load a snapshot")
        poller = VersionPoller(pipe.base_url).start()
        wait_for(lambda: poller.latest > 0, 60, "the first served version")
        yield pipe, poller
    finally:
        if poller is not None:
            poller.stop()
        feed.stop()
        pipe.stop()


def malformed_case(pipe: Pipeline, n: int) -> dict:
    """``n`` malformed messages: all in the DLQ with a reason, the trainer still training."""
    s = pipe.s
    base = next(iter(SyntheticStream(SyntheticConfig(seed=99)).events(1)))
    messages = malformed_messages(n, base)
    produce(s.kafka_bootstrap, s.topic_events, messages)
    sent = {k for k, _ in messages}
    found: dict[bytes, str] = {}

    def collected() -> bool:
        for m in drain_topic(s.kafka_bootstrap, s.topic_dlq):
            reason = dict(m.headers() or []).get("reason", b"").decode()
            if m.key() in sent and reason:
                found[m.key()] = reason
        return len(found) >= len(sent)

    with suppress(TimeoutError):
        wait_for(collected, 180, "malformed messages in the DLQ")
    trained = pipe.trained()
    with suppress(TimeoutError):
        wait_for(lambda: pipe.trained() > trained, 30, "the trainer to keep training")
    kinds = {k.decode().rsplit("-", 1)[0] for k in found}
    return {"malformed_sent": len(sent), "malformed_dead_lettered": len(found),
            "_malformed_kinds": len(kinds),
            "_trainer_alive_after_malformed": pipe.procs["trainer"].poll() is None
            and pipe.trained() > trained}


def redis_restart_case(infra: Infra, pipe: Pipeline, poller: VersionPoller, restarts: int,
                       log: Callable[[str], None] = print) -> dict:
    """Kill Redis and start it empty; the service must stay ready and catch up."""
    survived = 0
    for k in range(restarts):
        before, processes_restarted = poller.latest, pipe.total_restarts()
        infra.kill_redis()
        ready_during = all(pipe.ready() for _ in range(5) if not time.sleep(0.2))
        infra.start_redis()
        try:
            wait_for(lambda b=before: poller.latest > b, 120, "the service to catch up")
            caught_up = True
        except TimeoutError:
            caught_up = False
        ok = (ready_during and caught_up and pipe.ready()
              and pipe.total_restarts() == processes_restarted)
        survived += ok
        log(f"  redis restart {k + 1}/{restarts}: ready during outage {ready_during}, "
            f"version {before} -> {poller.latest}, process restarts "
            f"{pipe.total_restarts() - processes_restarted}, ready after {pipe.ready()}, "
            f"survived {ok}")
    return {"redis_restarts_survived": survived}


def broker_restart_case(infra: Infra, pipe: Pipeline, restarts: int,
                        log: Callable[[str], None] = print) -> dict:
    """Kill the broker, start it again (empty, topics recreated); every process keeps working.

    The trainer must train the events produced after the restart; the service must log the
    impressions of new ``/v1/score`` requests and the joiner must consume them; no process may
    need more than one restart.
    """
    survived = 0
    rng = random.Random(restarts)
    for k in range(restarts):
        before = dict(pipe.restarts)
        infra.kill_kafka()
        time.sleep(2.0)
        infra.start_kafka()
        trained = pipe.trained()
        resumed = _within(120, lambda t=trained: pipe.trained() > t)
        joined = pipe.joined()
        scored = [pipe.score(rng) for _ in range(20) if not time.sleep(0.1)]

        def impressions_joined(j: float = joined) -> bool:
            pipe.score(rng)  # a new impression each try: the first ones may have expired
            return pipe.joined() > j

        joiner_resumed = _within(120, impressions_joined)
        time.sleep(10.0)  # a crash loop would have restarted something again by now
        again = {n: pipe.restarts[n] - before[n] for n in before}
        ok = resumed and joiner_resumed and max(again.values()) <= 1 and pipe.ready()
        survived += ok
        log(f"  broker restart {k + 1}/{restarts}: trainer resumed {resumed}, joiner resumed "
            f"{joiner_resumed} (scores {sorted(set(scored))}), process restarts {again}, "
            f"survived {ok}")
    return {"broker_restarts_survived": survived, "_broker_restarts": restarts,
            "_restarts_after_broker_restart": dict(pipe.restarts)}


def _within(timeout_s: float, condition: Callable[[], bool]) -> bool:
    """Whether ``condition`` becomes true within ``timeout_s`` (polled every half second)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


def http_fuzz_case(pipe: Pipeline, requests: int, seed: int,
                   log: Callable[[str], None] = print) -> dict:
    """``bench.http_fuzz.fuzz_http`` against the live service; counts requests and 5xx."""
    try:
        from bench.http_fuzz import fuzz_http
    except ImportError:
        log("  SKIPPED http fuzzing: bench/http_fuzz.py (fuzz_http) is not on this branch yet")
        return {"http_fuzz_requests": 0, "http_5xx": None}
    out = fuzz_http(pipe.base_url, requests, seed, token=pipe.env[TOKEN_VAR])
    return {"http_fuzz_requests": out["http_fuzz_requests"], "http_5xx": out["http_5xx"],
            "_http_by_status": out.get("by_status"),
            "_http_failure_examples": out.get("failure_examples"),
            "_service_restarts_after_fuzz": pipe.restarts["service"]}


# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    trainer_kills: int
    trainer_events: int
    joiner_kills: int
    malformed: int
    redis_restarts: int
    broker_restarts: int
    http_requests: int


FULL = Plan(trainer_kills=20, trainer_events=120_000, joiner_kills=5, malformed=10_000,
            redis_restarts=3, broker_restarts=1, http_requests=100_000)
QUICK = Plan(trainer_kills=3, trainer_events=20_000, joiner_kills=2, malformed=1_500,
             redis_restarts=1, broker_restarts=1, http_requests=3_000)


def run(plan: Plan, seed: int, work: Path, log: Callable[[str], None] = print) -> dict:
    """Every case in order; the figures (the public keys and ``_``-prefixed details)."""
    rng = random.Random(seed)
    out: dict = {}
    with Infra(work / "infra-logs") as infra:
        log(f"trainer: {plan.trainer_kills} kill -9 during a replay of {plan.trainer_events}")
        out |= trainer_kills(infra, work, plan.trainer_kills, plan.trainer_events, rng, log)
        log(f"joiner: {plan.joiner_kills} kill -9 on a live stream")
        out |= joiner_kills(infra, work, plan.joiner_kills, rng, log)
        log("live pipeline: trainer + joiner + service")
        with live_pipeline(infra, work, seed) as (pipe, poller):
            log(f"  {plan.malformed} malformed messages")
            out |= malformed_case(pipe, plan.malformed)
            out |= redis_restart_case(infra, pipe, poller, plan.redis_restarts, log)
            out |= broker_restart_case(infra, pipe, plan.broker_restarts, log)
            log(f"  {plan.http_requests} fuzzed HTTP requests")
            out |= http_fuzz_case(pipe, plan.http_requests, seed, log)
            out["versions_monotone"] = poller.monotone and len(poller.versions) > 0
            out["_versions_polled"] = len(poller.versions)
            out["_versions_first_last"] = [poller.versions[0] if poller.versions else None,
                                           poller.latest]
            out["_process_restarts"] = dict(pipe.restarts)
    return out


def print_table(out: dict) -> None:
    targets = {"trainer_kills": ">= 20", "trainer_lost_events": "0",
               "trainer_duplicate_events": "reported", "joiner_kills": ">= 5",
               "joiner_lost_labels": "0", "redis_restarts_survived": ">= 3",
               "broker_restarts_survived": ">= 1", "malformed_sent": ">= 10000",
               "malformed_dead_lettered": "= sent", "http_fuzz_requests": ">= 100000",
               "http_5xx": "0", "versions_monotone": "true"}
    print(f"{'figure':32} {'value':>12}  target")
    for k in KEYS:
        print(f"{k:32} {out.get(k)!s:>12}  {targets[k]}")
    for k, v in out.items():
        if k.startswith("_"):
            print(f"  {k[1:]:30} {v}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few of each case, minutes")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", type=Path, default=RESULTS / "chaos.json")
    parser.add_argument("--http-only", action="store_true",
                        help="run only the HTTP fuzzing case on a fresh live pipeline and "
                             "update its keys in an existing --out (the other cases' figures "
                             "are kept)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    started = time.monotonic()
    if args.http_only:
        with tempfile.TemporaryDirectory(prefix="freshrec-chaos-") as tmp, \
                Infra(Path(tmp) / "infra-logs") as infra, \
                live_pipeline(infra, Path(tmp), args.seed) as (pipe, poller):
            http = http_fuzz_case(pipe, plan.http_requests, args.seed)
            http["_http_versions_monotone"] = poller.monotone and len(poller.versions) > 0
        saved = json.loads(args.out.read_text())
        saved.update({k: http[k] for k in ("http_fuzz_requests", "http_5xx")})
        saved["versions_monotone"] = saved["versions_monotone"] and http[
            "_http_versions_monotone"]
        args.out.write_text(json.dumps(saved, indent=2) + "\n")
        details = args.out.with_name(args.out.stem + "_details.json")
        extra = json.loads(details.read_text()) if details.exists() else {}
        extra["http_run"] = {"wall_seconds": time.monotonic() - started, "seed": args.seed,
                             **{k.lstrip("_"): v for k, v in http.items()}}
        details.write_text(json.dumps(extra, indent=2, default=str) + "\n")
        print_table(saved)
        return
    with tempfile.TemporaryDirectory(prefix="freshrec-chaos-") as tmp:
        out = run(plan, args.seed, Path(tmp))
    print_table(out)
    print(f"wall {time.monotonic() - started:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({k: out.get(k) for k in KEYS}, indent=2) + "\n")
    details = args.out.with_name(args.out.stem + "_details.json")
    details.write_text(json.dumps({"plan": plan.__dict__, "quick": args.quick, "seed": args.seed,
                                   "wall_seconds": time.monotonic() - started,
                                   **{k.lstrip("_"): v for k, v in out.items()}},
                                  indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
