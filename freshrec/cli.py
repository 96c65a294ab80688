"""``freshrec``: the one command line for the local stack, data, replays and every component.

Configuration errors end the process with exit code 2 and one line naming the key, so an operator
sees the cause at the top of a crash-looping pod's log.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn
from urllib.parse import urlparse

from featurestore.schema import ModelConfigError, load_model_config
from freshrec.settings import Settings, SettingsError, load_settings, redact_url

if TYPE_CHECKING:
    from freshrec.devstack import LocalStack
    from freshrec.redis_cluster import LocalRedisCluster


class _Stop(Exception):
    """Raised from the SIGTERM handler so ``finally`` blocks run."""


def _raise_stop(_signum: int, _frame: object) -> NoReturn:
    raise _Stop


def _fail(message: str, code: int = 2) -> NoReturn:
    print(f"freshrec: {message}", file=sys.stderr)
    raise SystemExit(code)


def _settings() -> Settings:
    try:
        settings = load_settings()
        load_model_config(settings.model_config_path)
    except (SettingsError, ModelConfigError) as exc:
        _fail(str(exc))
    return settings


# --- dev up -----------------------------------------------------------------------------------

def cmd_dev_up(args: argparse.Namespace) -> int:
    """Start broker + Redis (+ trainer, service, replay) and run until Ctrl-C / SIGTERM."""
    from freshrec.devstack import LocalStack

    settings = _settings()
    if args.ranks < 1:
        _fail(f"--ranks must be at least 1, not {args.ranks}")
    external_kafka = os.environ.get("FRESHREC_KAFKA_BOOTSTRAP")
    external_redis = os.environ.get("FRESHREC_REDIS_URL")
    cluster = _start_redis_cluster(args, external_redis)
    if cluster is not None:
        external_redis = cluster.url
    stack = LocalStack(
        kafka_port=args.kafka_port or int(settings.kafka_bootstrap.rsplit(":", 1)[1]),
        redis_port=args.redis_port or urlparse(settings.redis_url).port or 6379,
        topics=(settings.topic_events, settings.topic_impressions, settings.topic_clicks,
                settings.topic_dlq),
        partitions=args.partitions or settings.topic_partitions,
        log_dir=Path(args.log_dir),
        external_kafka=external_kafka,
        external_redis=external_redis,
    )
    signal.signal(signal.SIGTERM, _raise_stop)
    # POST /v1/events needs a bearer token (docs/trust-model.md): use the configured one, else
    # make one for this run and print it, so the local stack is as closed as a deployment.
    token = settings.service_api_token or secrets.token_urlsafe(24)
    try:
        stack.start()
        print(f"kafka  {stack.kafka_bootstrap}" + (" (external)" if external_kafka else ""))
        print(f"redis  {redact_url(stack.redis_url)}" + (" (external)" if external_redis else ""))
        print(f"topics {', '.join(stack.topics)} ({stack.partitions} partitions)")
        env = stack.env() | {"FRESHREC_SERVICE_API_TOKEN": token}
        if cluster is not None or args.ranks > 1:
            # Ranks publish per bucket, and a cluster spreads the buckets over its masters.
            buckets = settings.snapshot_buckets or CLUSTER_SNAPSHOT_BUCKETS
            env["FRESHREC_SNAPSHOT_BUCKETS"] = str(buckets)
            where = (f"cluster of {len(cluster.ports)} masters ({', '.join(cluster.nodes)})"
                     if cluster is not None else "one server")
            print(f"redis  {where}, snapshots in {buckets} buckets")
        for component in args.components:
            if component == "trainer" and args.ranks > 1:
                _spawn_trainer_ranks(stack, env, args.ranks, settings.trainer_metrics_port)
                print(f"trainer {args.ranks} ranks started (logs: "
                      f"{Path(args.log_dir) / 'trainer-rank-<r>.log'})")
                continue
            stack.spawn_component(component, component, env=env)
            print(f"{component:<6} started (log: {Path(args.log_dir) / (component + '.log')})")
        if "service" in args.components:
            print(f"service http://{settings.service_host}:{settings.service_port}/docs")
            print(f"events  POST http://{settings.service_host}:{settings.service_port}/v1/events "
                  f"with Authorization: Bearer {token}")
        metrics_ports = [settings.trainer_metrics_port + r for r in range(args.ranks)
                         if settings.trainer_metrics_port]
        if "trainer" in args.components:
            for port in metrics_ports:
                print(f"trainer metrics http://127.0.0.1:{port}/metrics")
        if args.replay != "none":
            summary = _run_replay(args.replay, stack.kafka_bootstrap, settings, args)
            print(summary.line())
            if summary.failed:
                return 1
            if "trainer" in args.components and metrics_ports:
                _report_training(metrics_ports, summary.sent, stack)
        if args.exit_after_replay:
            return 0
        print("stack is up; Ctrl-C to stop", flush=True)
        while True:
            problem = stack.check_children()
            if problem:
                _fail(problem, code=1)
            time.sleep(0.5)
    except (KeyboardInterrupt, _Stop):
        return 0
    finally:
        stack.stop()
        if cluster is not None:
            cluster.stop()
        print("stack stopped", file=sys.stderr)


# Buckets a model's snapshot spreads over on a local Redis Cluster when none are configured:
# enough that three masters each own many (docs/scale.md), few enough to keep reads cheap.
CLUSTER_SNAPSHOT_BUCKETS = 64


def _spawn_trainer_ranks(stack: LocalStack, env: dict[str, str], ranks: int,
                         metrics_port: int) -> None:
    """``--ranks R``: R trainer processes with torchrun's variables (a loopback rendezvous),
    each with its own metrics port (``trainer_metrics_port + rank``)."""
    from freshrec.devstack import free_port

    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                  "WORLD_SIZE": str(ranks)}
    for r in range(ranks):
        stack.spawn_component(f"trainer-rank-{r}", "trainer", env=env | rendezvous | {
            "RANK": str(r), "LOCAL_RANK": str(r),
            "FRESHREC_TRAINER_METRICS_PORT": str(metrics_port + r if metrics_port else 0)})


def _start_redis_cluster(args: argparse.Namespace, external_redis: str | None
                         ) -> LocalRedisCluster | None:
    """``--redis-cluster N``: N cluster-enabled masters instead of one redis-server."""
    if not args.redis_cluster:
        return None
    if args.redis_cluster < 3:
        _fail("--redis-cluster needs at least 3 masters (redis-cli --cluster create)")
    if external_redis:
        _fail("--redis-cluster starts its own Redis: unset FRESHREC_REDIS_URL")
    from freshrec.redis_cluster import LocalRedisCluster

    data_dir = Path(args.log_dir).parent / "redis-cluster"
    shutil.rmtree(data_dir, ignore_errors=True)  # node files of an earlier run would rejoin it
    return LocalRedisCluster(args.redis_cluster, data_dir=data_dir).start()


def _report_training(ports: list[int], sent: int, stack: LocalStack) -> None:
    """Wait until the trainer (every rank together) has consumed the replay, showing
    progress, then summarize (the windowed scores are rank 0's)."""
    from tqdm import tqdm

    from freshrec.metrics import scrape

    trained_key = "freshrec_trainer_events_total{outcome=trained}"
    dead_key = "freshrec_trainer_events_total{outcome=dead_lettered}"
    metrics: dict[str, float] = {}
    with tqdm(total=sent, unit="ev", desc="training", file=sys.stderr) as bar:
        while True:
            problem = stack.check_children()
            if problem:
                _fail(problem, code=1)
            per_rank = []
            for port in ports:
                try:
                    per_rank.append(scrape(f"http://127.0.0.1:{port}/metrics"))
                except ValueError:  # a half-written exposition while the trainer starts
                    per_rank.append({})
            metrics = per_rank[0] | {
                k: sum(m.get(k, 0) for m in per_rank) for k in (trained_key, dead_key)}
            done = int(metrics.get(trained_key, 0) + metrics.get(dead_key, 0))
            bar.update(done - bar.n)
            if done >= sent:
                break
            time.sleep(0.5)
    def gauge(name: str) -> float:
        return metrics.get(f"freshrec_trainer_progressive_{name}", float("nan"))

    print(f"trained {int(metrics.get(trained_key, 0))} events "
          f"(dead-lettered {int(metrics.get(dead_key, 0))}); windowed progressive "
          f"AUC {gauge('auc'):.4f}, logloss {gauge('logloss'):.4f}, "
          f"calibration {gauge('calibration'):.3f}")


# --- data and replays -------------------------------------------------------------------------

def cmd_data_fetch(args: argparse.Namespace) -> int:
    """Fetch and verify MovieLens-100K into the cache; print where it is."""
    from freshrec.data import DataError, fetch_movielens

    try:
        print(fetch_movielens(Path(args.path) if args.path else None))
    except DataError as exc:
        _fail(str(exc), code=1)
    return 0


def _run_replay(source: str, bootstrap: str, settings: Settings, args: argparse.Namespace):
    from freshrec.replay import replay

    limit = getattr(args, "limit", None)
    if source == "movielens":
        from freshrec.data import fetch_movielens, load_movielens

        ml = load_movielens(fetch_movielens(Path(args.path) if args.path else None))
        total = len(ml) if limit is None else min(limit, len(ml))
        events = ml.events(limit)
    else:
        from freshrec.synthetic import SyntheticConfig, SyntheticStream

        total = limit or args.events
        config = SyntheticConfig(seed=args.seed, drift_period_s=args.drift_period,
                                 new_items_per_s=args.new_items_per_s)
        events = SyntheticStream(config).events(total)
    return replay(events, bootstrap, settings.topic_events, total=total, speed=args.speed,
                  max_rate=args.max_rate, progress=not args.quiet)


def cmd_replay(args: argparse.Namespace) -> int:
    """Replay MovieLens or the synthetic stream into ``freshrec.events``."""
    settings = _settings()
    from freshrec.kafka import create_topics

    create_topics(settings.kafka_bootstrap, [settings.topic_events], settings.topic_partitions)
    summary = _run_replay(args.source, settings.kafka_bootstrap, settings, args)
    print(summary.line())
    for err in summary.errors:
        print(f"  delivery error: {err}", file=sys.stderr)
    return 1 if summary.failed else 0


# --- components -------------------------------------------------------------------------------

def _component(module: str, func: str) -> Callable[[argparse.Namespace], int]:
    def run(_args: argparse.Namespace) -> int:
        settings = _settings()
        import importlib

        from freshrec.runtime import apply_thread_budget, cpu_budget

        # Before the component's imports load numpy/torch/numba: their pools start sized.
        apply_thread_budget(cpu_budget(settings.cpu_threads))
        entry = getattr(importlib.import_module(module), func)
        signal.signal(signal.SIGTERM, _raise_stop)
        try:
            return int(entry(settings) or 0)
        except (KeyboardInterrupt, _Stop):
            return 0

    return run


def _add_replay_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--path", help="local MovieLens copy (GroupLens or RecBole layout)")
    p.add_argument("--speed", type=float, default=None, help="event-time seconds per wall second")
    p.add_argument("--max-rate", type=float, default=None, help="events per wall second")
    p.add_argument("--limit", type=int, default=None, help="stop after this many events")
    p.add_argument("--events", type=int, default=1_000_000, help="synthetic: how many events")
    p.add_argument("--seed", type=int, default=0, help="synthetic: random seed")
    p.add_argument("--drift-period", type=float, default=0.0,
                   help="synthetic: seconds of event time for a full rotation of tastes")
    p.add_argument("--new-items-per-s", type=float, default=2.0,
                   help="synthetic: new items per second of event time")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="freshrec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="the embedded local stack").add_subparsers(
        dest="dev_command", required=True)
    up = dev.add_parser("up", help="start broker, Redis and the pipeline")
    up.add_argument("--partitions", type=int, default=None)
    up.add_argument("--replay", choices=["movielens", "synthetic", "none"], default="none")
    up.add_argument("--components", nargs="*", default=["trainer", "joiner", "service"],
                    choices=["trainer", "service", "joiner"])
    up.add_argument("--log-dir", default="var/log")
    up.add_argument("--kafka-port", type=int, default=None, help="local broker port")
    up.add_argument("--redis-port", type=int, default=None, help="local Redis port")
    up.add_argument("--redis-cluster", type=int, default=0, metavar="MASTERS",
                    help="a local Redis Cluster of this many masters (>= 3) instead of one "
                         "redis-server; snapshots spread over FRESHREC_SNAPSHOT_BUCKETS buckets "
                         f"({CLUSTER_SNAPSHOT_BUCKETS} unless set)")
    up.add_argument("--ranks", type=int, default=1, metavar="R",
                    help="run the trainer as R ranks on torch.distributed (gloo), each "
                         "publishing the snapshot buckets it owns (docs/scale.md)")
    up.add_argument("--exit-after-replay", action="store_true")
    _add_replay_args(up)
    up.set_defaults(func=cmd_dev_up)

    data = sub.add_parser("data", help="data sets").add_subparsers(dest="data_command",
                                                                    required=True)
    fetch = data.add_parser("fetch", help="fetch and verify a data set into the cache")
    fetch.add_argument("dataset", choices=["movielens-100k"])
    fetch.add_argument("--path", default=None)
    fetch.set_defaults(func=cmd_data_fetch)

    rp = sub.add_parser("replay", help="replay a stream into Kafka")
    rp.add_argument("source", choices=["movielens", "synthetic"])
    _add_replay_args(rp)
    rp.set_defaults(func=cmd_replay)

    for name, module, func in (("trainer", "trainer.main", "run"),
                               ("service", "service.main", "run"),
                               ("joiner", "joiner.process", "run")):
        sub.add_parser(name, help=f"run the {name}").set_defaults(func=_component(module, func))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``freshrec`` command."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
