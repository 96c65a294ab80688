"""``freshrec trainer``: the online trainer process (metrics server, restore, loop, publisher)."""

from __future__ import annotations

import logging
import signal
import threading

import torch.distributed

from featurestore.schema import load_model_config
from freshrec.health import serve_metrics_and_health
from freshrec.kafka import create_topics
from freshrec.metrics import TrainerMetrics, report_thread_pools
from freshrec.runtime import apply_thread_budget, cpu_budget, thread_pools, tune_gc
from freshrec.settings import Settings
from trainer.loop import Trainer
from trainer.ranks import build_ranked_trainer, ranks_from_env

log = logging.getLogger("freshrec.trainer")


def build_trainer(settings: Settings, metrics: TrainerMetrics | None = None) -> Trainer:
    """A trainer with its exploration hook and publisher wired, restored from its checkpoint."""
    config = load_model_config(settings.model_config_path)
    metrics = metrics or TrainerMetrics()
    trainer = Trainer(settings, config, metrics, hooks=exploration_hooks(settings, config, metrics))
    trainer.restore()
    trainer.publisher = _publisher(settings, trainer, metrics)
    return trainer


def exploration_hooks(settings: Settings, config, metrics: TrainerMetrics | None = None):
    """The single process's exploration hook (none if the bandit package is not installed)."""
    try:
        from trainer.exploration import ExplorationHook
    except ImportError:
        return []
    return [ExplorationHook.from_settings(settings, config, metrics)]


def _publisher(settings: Settings, trainer: Trainer, metrics: TrainerMetrics):
    try:
        from trainer.publisher import make_publisher
    except ImportError:
        log.warning("no publisher available: snapshots are not published")
        return None
    return make_publisher(settings, trainer, metrics)


def run(settings: Settings, stop: threading.Event | None = None) -> int:
    """Size the thread pools, serve metrics and /healthz, then train until stopped."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ranks = ranks_from_env(settings)
    if ranks is not None and not settings.snapshot_buckets:
        # One snapshot chain cannot have R writers: each rank publishes its own buckets.
        log.error("WORLD_SIZE=%d needs FRESHREC_SNAPSHOT_BUCKETS > 0 (each trainer rank "
                  "publishes the buckets it owns; docs/scale.md)", ranks.world)
        return 2
    apply_thread_budget(cpu_budget(settings.cpu_threads))
    create_topics(settings.kafka_bootstrap, [settings.topic_events, settings.topic_dlq],
                  settings.topic_partitions)
    metrics = TrainerMetrics()
    if settings.trainer_metrics_port:
        serve_metrics_and_health(settings.trainer_metrics_port, metrics.registry,
                                 metrics.heartbeat, settings.trainer_liveness_timeout_s)
    if ranks is None:
        trainer = build_trainer(settings, metrics)
    else:
        trainer = build_ranked_trainer(settings, ranks, metrics)
    report_thread_pools(metrics.threads, thread_pools())  # after the learner sized torch
    tune_gc()
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        # Finish the batch in hand, then checkpoint and commit: SIGTERM is a normal stop.
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    log.info("trainer consuming %s as %s", settings.topic_events, settings.trainer_group_id)
    trainer.run(stop)
    log.info("trainer stopped: %s", trainer.stats())
    if ranks is not None:
        torch.distributed.destroy_process_group()
    return 0
