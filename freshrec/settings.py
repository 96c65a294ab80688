"""Process settings: one typed object, read from ``FRESHREC_*`` environment variables.

Every default lives here and points at the embedded local stack (``freshrec dev up``), so a
developer runs the pipeline with no configuration, and an operator overrides exactly the keys
that differ in production (Kafka bootstrap, Redis URL, ...). Unknown ``FRESHREC_*`` variables are
rejected, because a misspelt override that silently does nothing is worse than a start-up error.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "FRESHREC_"
# Slice size of the deep part's steps (``trainer.learner``); measured in docs/trainer.md.
DEFAULT_MICRO_BATCH = 512

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


def default_model_config_path() -> Path:
    """The MovieLens model config shipped inside the package."""
    return Path(str(resources.files("freshrec") / "configs" / "movielens.toml"))


class Settings(BaseSettings):
    """All knobs of every freshrec process; each field is ``FRESHREC_<FIELD NAME>``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    # --- infrastructure -------------------------------------------------------------------
    kafka_bootstrap: str = "127.0.0.1:19092"
    # May carry credentials (redis://:password@host:6379/0, redis://user:password@...): kept
    # out of repr, and shown anywhere else only through ``redact_url``.
    redis_url: str = Field("redis://127.0.0.1:16379/0", repr=False)
    # Whether ``redis_url`` is a node of a Redis Cluster; unset: asked from the server at start.
    redis_cluster: bool | None = None
    # ID buckets of the serving snapshot: 0 keeps one key chain per model (one Redis slot);
    # N > 0 gives every bucket its own chain and hash tag, so a model spreads over the masters
    # of a Redis Cluster and trainer ranks each publish the buckets they own (docs/scale.md).
    # Trainer and service must agree on it.
    snapshot_buckets: Annotated[int, Field(ge=0, le=4096)] = 0
    topic_events: str = "freshrec.events"
    topic_impressions: str = "freshrec.impressions"
    topic_clicks: str = "freshrec.clicks"
    topic_dlq: str = "freshrec.events.dlq"
    topic_partitions: PositiveInt = 4
    data_dir: Path = Path("var")
    # Whole CPUs this process may keep busy; every native thread pool (BLAS, OpenMP, torch,
    # numba) is sized from it, and the service divides it among its workers (WEB_CONCURRENCY).
    # Unset: the cgroup CPU quota (cpu.max, or v1 cpu.cfs_quota_us) rounded down, else the CPUs
    # in the affinity mask. OMP_NUM_THREADS and the like are set from it, not read.
    cpu_threads: PositiveInt | None = None
    # Events whose ``ts`` is further ahead of this process's wall clock are dead-lettered (by
    # ``POST /v1/events`` and by the trainer/joiner for Kafka input): event time drives expiry,
    # decay and windows, so one future-dated event must not move them (docs/trust-model.md).
    event_max_future_skew_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 300.0

    # --- model ----------------------------------------------------------------------------
    model_name: str = "movielens"
    model_config_path: Path = Field(default_factory=default_model_config_path)

    # --- trainer --------------------------------------------------------------------------
    trainer_group_id: str = "freshrec-trainer"
    trainer_batch_max_events: PositiveInt = 2048
    trainer_batch_max_wait_ms: PositiveInt = 20
    # The deep part learns a consumed batch in slices of this many events, each predicted by
    # dense weights that learned the previous slices (the wide part learns every event before
    # the next at any setting): smaller is fresher, larger is faster (docs/trainer.md).
    trainer_micro_batch: PositiveInt = DEFAULT_MICRO_BATCH
    trainer_checkpoint_dir: Path = Path("var/checkpoints")
    trainer_checkpoint_interval_s: PositiveFloat = 30.0
    trainer_publish_interval_ms: PositiveInt = 200
    trainer_dense_publish_interval_s: PositiveFloat = 3.0
    # Publishing runs on its own thread: gathered changes wait in a queue of this many; while
    # Redis is away they merge into one delta of at most this many rows, past which the
    # publisher drops it and writes a full snapshot once Redis is back (docs/trainer.md).
    trainer_publish_queue_size: PositiveInt = 8
    trainer_publish_max_pending_rows: PositiveInt = 2_000_000
    # Every this many seconds (when rows changed) the publisher also writes an image of every
    # row: a replica's full load reads it plus the rows changed since, a few big values instead
    # of a walk over every hash field (docs/serving.md). 0 turns images off.
    trainer_snapshot_image_interval_s: Annotated[float, Field(ge=0)] = 30.0
    trainer_sweep_interval_s: PositiveFloat = 5.0
    trainer_metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9101
    trainer_progressive_window: PositiveInt = 10_000
    trainer_learning_rate: PositiveFloat = 0.01
    trainer_seed: int = 0
    # One TTL sweep expires at most this share of a table's rows; the rest wait for later
    # sweeps, so a clock that jumped shows up as a capped sweep (metric, alert), not an empty
    # table.
    trainer_max_expiry_fraction: Annotated[float, Field(gt=0, le=1)] = 0.25
    # Append every applied event id to this file (debugging, delivery audits); off by default.
    trainer_audit_log: Path | None = None
    # /healthz on the metrics port fails once the training loop has not come round for this
    # long (a checkpoint of big tables is the longest legitimate pause).
    trainer_liveness_timeout_s: PositiveFloat = 120.0
    # Trainer ranks: a collective waits this long for a rank that hangs or is cut off (one that
    # crashed is noticed at once). Longer than the slowest rank's checkpoint save, which the
    # others wait for at the checkpoint barrier.
    trainer_collective_timeout_s: PositiveFloat = 60.0

    # --- joiner ---------------------------------------------------------------------------
    joiner_window_s: PositiveFloat = 300.0
    joiner_negative_sample_rate: Annotated[float, Field(gt=0, le=1)] = 1.0
    joiner_max_pending: PositiveInt = 2_000_000
    joiner_lateness_s: Annotated[float, Field(ge=0)] = 2.0
    # A click partition whose event-time clock has not moved for this long counts as idle (read
    # to its end, or silent): windows then close one window behind the impressions instead of
    # waiting for it. Longer than a fetch round trip (fetch.wait.max.ms is 0.5 s).
    joiner_click_idle_s: PositiveFloat = 2.0
    joiner_group_id: str = "freshrec-joiner"
    joiner_checkpoint_dir: Path = Path("var/joiner-checkpoints")
    joiner_metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9102
    joiner_checkpoint_interval_s: PositiveFloat = 30.0
    joiner_liveness_timeout_s: PositiveFloat = 120.0

    # --- service --------------------------------------------------------------------------
    service_host: str = "127.0.0.1"
    service_port: Annotated[int, Field(ge=0, le=65535)] = 8000
    service_max_candidates: PositiveInt = 1000
    service_max_body_bytes: PositiveInt = 1_048_576
    # Who may POST /v1/events (docs/trust-model.md). "token": a bearer token is required —
    # ``service_api_token`` for public clients, ``service_internal_token`` for the pipeline;
    # with neither configured every request gets 401 (secure by default). "none" opens the
    # endpoint to anyone without a token (a local experiment; never in production). Both
    # tokens come from the environment/a secret (at least 12 characters: a short token is
    # guessable) and are compared in constant time.
    service_events_auth: Literal["token", "none"] = "token"
    service_api_token: str | None = Field(None, repr=False, min_length=12)
    # The pipeline's credential: only it may set the pipeline-only fields of an event
    # (``p_true``, ``sample_rate``, ``context``); public clients get a 422 naming the field.
    service_internal_token: str | None = Field(None, repr=False, min_length=12)
    service_impression_queue_size: PositiveInt = 10_000
    # Batching of the service's producer (impressions and /v1/events). Every produce request
    # costs the broker and the producer about the same whatever it holds: at 1,000 requests/s
    # a 5 ms linger sent ~one message per request, and the broker alone took a sixth of a core
    # on the serving machine. The joiner waits seconds for clicks, so 25 ms is invisible.
    service_producer_linger_ms: Annotated[int, Field(ge=0, le=1_000)] = 25
    service_slo_seconds: PositiveFloat = 0.02
    # Pin each worker (and the threads it starts) to its own CPUs, dealt round-robin from the
    # process' affinity mask. Unset: pin when there is one worker per CPU of the mask and the
    # process owns those CPUs (no CPU budget or cgroup quota below the mask: a whole machine,
    # an exclusive cpuset); never on a node shared under a CFS quota, where every pod's
    # workers would pile onto the same first CPUs. true: pin whenever workers <= CPUs.
    # Measured at 1,000 req/s on 2 cores: p99 12 ms pinned against 17 ms floating, and a
    # narrower spread (docs/serving.md).
    service_pin_workers: bool | None = None

    # --- exploration (Diag-LinUCB) --------------------------------------------------------
    bandit_alpha: Annotated[float, Field(ge=0)] = 0.1
    bandit_lambda: PositiveFloat = 1.0
    bandit_top_k: PositiveInt = 3
    bandit_clusters: PositiveInt = 32
    bandit_half_life_s: Annotated[float, Field(ge=0)] = 0.0
    # Event-time half-life of the user-cluster counts: centroids follow users who drift, and a
    # cluster nobody joined for several half-lives is re-seeded (bandit/clusters.py).
    bandit_cluster_half_life_s: Annotated[float, Field(ge=0)] = 7 * 86400.0
    bandit_explore_fraction: Annotated[float, Field(ge=0, le=1)] = 1.0
    # At most this many items of one response may be shown thanks to the bonus alone (the
    # rest keep their places by pCTR); unset: no bound (docs/exploration.md, "The cost of
    # exploration").
    bandit_max_explored: Annotated[int, Field(ge=0)] | None = None

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_has_port(cls, value: str) -> str:
        for server in value.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port...], got {value!r}")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got "
                             f"{redact_url(value)!r}")
        return value


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe to log, print or export).

    ``FRESHREC_REDIS_URL`` may carry credentials (``redis://:password@host:6379/0`` or
    ``redis://user:password@...``); everything that shows the URL goes through this.
    """
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:  # unparsable: show only the scheme, never the rest
        return url.split("://", 1)[0] + "://***"


class SettingsError(RuntimeError):
    """A setting could not be used; the message is one line naming the variable."""


def _check_unknown_env(environ: dict[str, str]) -> None:
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known)
    if unknown:
        raise SettingsError(f"{unknown[0]}: not a freshrec setting")


def load_settings(**overrides: object) -> Settings:
    """Build the settings from the environment, turning validation errors into one line.

    Why one line: an operator reading a crash-looping pod's log needs the variable name and the
    reason, not a pydantic traceback.
    """
    _check_unknown_env(dict(os.environ))
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        got = err.get("input")
        if field in _SECRET_FIELDS:
            got = "<redacted>"
        elif field == "redis_url" and isinstance(got, str):
            got = redact_url(got)
        raise SettingsError(f"{ENV_PREFIX}{field.upper()}: {err['msg']} (got {got!r})") from None


# Never echoed in an error message or a log line.
_SECRET_FIELDS = frozenset({"service_api_token", "service_internal_token"})


def to_environ(settings: Settings, base: dict[str, str] | None = None, **overrides: object
               ) -> dict[str, str]:
    """Environment for a freshrec child process configured exactly like ``settings``.

    ``base`` (default: this process's environment) minus its ``FRESHREC_*`` variables, plus one
    variable per setting: what tests and benchmarks use to start real processes.
    """
    import json

    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith(ENV_PREFIX)}
    values = settings.model_dump()
    values.update(overrides)
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple, dict)):
            value = json.dumps(value)
        env[f"{ENV_PREFIX}{name.upper()}"] = str(value)
    return env
