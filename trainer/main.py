"""``freshrec trainer``: the online trainer process (metrics server, restore, loop, publisher)."""

from __future__ import annotations

import logging
import signal
import threading

from prometheus_client import start_http_server

from featurestore.schema import load_model_config
from freshrec.kafka import create_topics
from freshrec.metrics import TrainerMetrics
from freshrec.runtime import tune_gc
from freshrec.settings import Settings
from trainer.loop import Trainer

log = logging.getLogger("freshrec.trainer")


def build_trainer(settings: Settings, metrics: TrainerMetrics | None = None) -> Trainer:
    """A trainer with its exploration hook and publisher wired, restored from its checkpoint."""
    config = load_model_config(settings.model_config_path)
    metrics = metrics or TrainerMetrics()
    trainer = Trainer(settings, config, metrics, hooks=_hooks(settings, config))
    trainer.restore()
    trainer.publisher = _publisher(settings, trainer, metrics)
    return trainer


def _hooks(settings: Settings, config):
    try:
        from trainer.exploration import ExplorationHook
    except ImportError:
        return []
    return [ExplorationHook.from_settings(settings, config)]


def _publisher(settings: Settings, trainer: Trainer, metrics: TrainerMetrics):
    try:
        from trainer.publisher import make_publisher
    except ImportError:
        log.warning("no publisher available: snapshots are not published")
        return None
    return make_publisher(settings, trainer, metrics)


def run(settings: Settings, stop: threading.Event | None = None) -> int:
    """Serve metrics, then train until stopped (SIGTERM arrives as an exception)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    create_topics(settings.kafka_bootstrap, [settings.topic_events, settings.topic_dlq],
                  settings.topic_partitions)
    metrics = TrainerMetrics()
    if settings.trainer_metrics_port:
        start_http_server(settings.trainer_metrics_port, addr="0.0.0.0", registry=metrics.registry)
    trainer = build_trainer(settings, metrics)
    tune_gc()
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        # Finish the batch in hand, then checkpoint and commit: SIGTERM is a normal stop.
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    log.info("trainer consuming %s as %s", settings.topic_events, settings.trainer_group_id)
    trainer.run(stop)
    log.info("trainer stopped: %s", trainer.stats())
    return 0
