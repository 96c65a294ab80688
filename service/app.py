"""The FastAPI scoring service: ``create_app(settings)`` builds one replica.

Routes (one module each under ``service/routes``): ``POST /v1/score``, ``POST /v1/events``,
``GET /v1/model``, ``/healthz``, ``/readyz``, ``/metrics``. Shared state is one
:class:`~service.state.ServiceState` on ``app.state.service``; the snapshot follower and the
Kafka sink are created in the lifespan, so tests build as many apps in one process as they like
and nothing is a module-level global.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aredis
from confluent_kafka import Producer
from fastapi import FastAPI

from featurestore.schema import ModelConfig, load_model_config
from featurestore.snapshot_buckets import AsyncBucketedReader
from featurestore.snapshot_reader import AsyncSnapshotReader
from freshrec.kafka import producer_config
from freshrec.metrics import ServiceMetrics
from freshrec.redis_client import async_redis_client
from freshrec.redis_client import redis_client as redis_client_for
from freshrec.settings import Settings
from service.auth import explain_write_access
from service.bucketed import BucketedFollower
from service.errors import install_error_handlers
from service.impressions import KafkaSink
from service.middleware import GuardAndMeasure
from service.routes import events, model, probes, score
from service.schemas import ScoreRequest, events_json_schema
from service.scoring import Scorer
from service.snapshot import SnapshotFollower, torch_threads
from service.state import ServiceState
from service.supervise import FollowerSupervisor

log = logging.getLogger("freshrec.service")

_REF = "#/components/schemas/{model}"


def _with_raw_body_schemas(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """OpenAPI generator that also documents the bodies the routes validate from bytes."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = base()
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, body in (("ScoreRequest", ScoreRequest.model_json_schema(
                    ref_template=_REF)), ("EventsRequest", events_json_schema(_REF))):
                comps.update(body.pop("$defs", {}))
                comps[name] = body
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def _without_native_telemetry() -> dict[str, Any]:
    """FastAPI's built-in OpenTelemetry off, where this FastAPI has it.

    The service reports through Prometheus (``ServiceMetrics``). Left on, FastAPI asks the
    OpenTelemetry API on every request whether a tracer, meter or logger provider is configured
    (provider lookups and an environment read: ~3 % of a worker's CPU at 1,000 requests/s).
    """
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


async def _when_loaded(state: ServiceState, hook: Callable[[ServiceState], None]) -> None:
    """Run ``hook`` once the first snapshot is loaded, then let the replica report ready.

    A failing hook is logged and readiness goes on: it only prepares, and requests will show
    any real fault themselves.
    """
    while state.snapshot is None:
        await asyncio.sleep(0.02)
    try:
        hook(state)
    except Exception:
        log.exception("start-up hook on the first snapshot failed")
    state.warm = True


def create_app(settings: Settings, *, config: ModelConfig | None = None,
               metrics: ServiceMetrics | None = None, producer: Producer | None = None,
               redis_client: aredis.Redis | None = None,
               when_loaded: Callable[[ServiceState], None] | None = None) -> FastAPI:
    """One service replica. Everything external can be injected (tests, benchmarks).

    Nothing connects at construction time: the lifespan starts the supervised snapshot follower
    (which waits for a snapshot, so ``/readyz`` is 503 until one is loaded) and the impression
    producer thread, and stops both on shutdown. ``when_loaded`` runs once on the event loop
    when the first snapshot is in, before ``/readyz`` turns 200 (a serving process warms its
    scoring path and freezes its heap there: ``service.main``).
    """
    config = config or load_model_config(settings.model_config_path)
    metrics = metrics or ServiceMetrics(slo_seconds=settings.service_slo_seconds)
    state = ServiceState(settings, config, metrics,
                         Scorer(config, alpha=settings.bandit_alpha,
                                top_k_clusters=settings.bandit_top_k,
                                max_explored=settings.bandit_max_explored))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        torch_threads()
        explain_write_access(settings)
        client = redis_client or await asyncio.to_thread(
            async_redis_client, settings, socket_timeout=10.0, socket_connect_timeout=2.0,
            health_check_interval=15)
        bulk = None
        if settings.snapshot_buckets:
            state.follower = BucketedFollower(
                AsyncBucketedReader(client, settings.model_name, settings.snapshot_buckets),
                config, metrics)
        else:
            # Full snapshot reads: a blocking client used only by the background thread.
            bulk = await asyncio.to_thread(redis_client_for, settings, socket_timeout=60.0,
                                           socket_connect_timeout=2.0, health_check_interval=15)
            state.follower = SnapshotFollower(
                AsyncSnapshotReader(client, settings.model_name, bulk_client=bulk),
                config, metrics)

        def new_producer() -> Producer:
            return Producer(producer_config(
                settings.kafka_bootstrap, **{"linger.ms": settings.service_producer_linger_ms}))

        state.sink = KafkaSink(producer or new_producer(), settings.topic_impressions,
                               settings.service_impression_queue_size, metrics,
                               make_producer=None if producer is not None else new_producer)
        state.sink.start()
        state.supervisor = FollowerSupervisor(state.follower, metrics)
        state.supervisor.start()
        flusher = asyncio.create_task(metrics.flush_every(), name="metrics-flush")
        warming = None
        if when_loaded is not None:
            state.warm = False
            warming = asyncio.create_task(_when_loaded(state, when_loaded), name="warm-up")
        try:
            yield
        finally:
            flusher.cancel()
            if warming is not None:
                warming.cancel()
            metrics.scored.flush()
            await state.supervisor.stop()
            await asyncio.to_thread(state.sink.close)
            if redis_client is None:
                await client.aclose()
            if bulk is not None:
                await asyncio.to_thread(bulk.close)

    app = FastAPI(title="freshrec scoring service", version="1", lifespan=lifespan,
                  **_without_native_telemetry())
    app.state.service = state
    install_error_handlers(app)
    for module in (score, events, model, probes):
        app.include_router(module.router)
    app.openapi = _with_raw_body_schemas(app)  # type: ignore[method-assign]
    build_stack = app.build_middleware_stack

    def build_middleware_stack() -> Any:
        # Outermost: limits and metrics for every request, then POST /v1/score answered
        # directly (service.routes.score), then FastAPI's own stack for the rest.
        return GuardAndMeasure(score.ScoreEndpoint(build_stack(), state),
                               max_body=settings.service_max_body_bytes, metrics=metrics)

    app.build_middleware_stack = build_middleware_stack  # type: ignore[method-assign]
    return app
