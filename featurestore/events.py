"""Wire schema of everything that flows through Kafka: labeled events, impressions, clicks.

JSON on the wire (orjson), validated by pydantic so that a rejection names the field. Limits on
string and list sizes are part of the contract: a trainer must never be taken down by one huge
message, so oversize values are rejected here and dead-lettered with the reason.
"""

from __future__ import annotations

import math
from typing import Annotated

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

MAX_ID_LEN = 128
MAX_FEATURES = 64
MAX_LIST_LEN = 64
MAX_TS = 4_102_444_800.0  # 2100-01-01: anything later is a unit mix-up (ms instead of s)

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LEN)]
Text = Annotated[str, Field(max_length=MAX_ID_LEN)]
# Floats must be finite to bucketize and to serialize back to JSON. An integer beyond int64
# parses as a float (and the featurizer hashes it like any out-of-range number).
Int64 = Annotated[int, Field(ge=-(1 << 63), le=(1 << 63) - 1)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
# left_to_right: try str, int, float, list in turn instead of scoring every member (~20% faster
# parsing on the trainer's hot path).
FeatureValue = Annotated[
    Text | Int64 | FiniteFloat | Annotated[list[Text], Field(max_length=MAX_LIST_LEN)],
    Field(union_mode="left_to_right"),
]
Features = Annotated[dict[Annotated[str, Field(max_length=64)], FeatureValue], Field(
    max_length=MAX_FEATURES)]
Timestamp = Annotated[float, Field(ge=0, le=MAX_TS)]


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_json(self) -> bytes:
        """Serialize for Kafka, dropping unset optional fields to keep messages small."""
        return orjson.dumps(self.model_dump(exclude_none=True))


MAX_CONTEXT_CLUSTERS = 64


class BanditContext(_Wire):
    """The sparse Diag-LinUCB context used at serve time: cluster indices and their weights.

    Weights are a distribution over the listed clusters (``context_for`` makes them sum to 1),
    so each is in [0, 1] and their sum is at most 1: a weight of 1e300 would otherwise add
    1e600 to one item's statistics and zero its exploration bonus for good.
    """

    clusters: Annotated[list[Annotated[int, Field(ge=0, lt=1 << 31)]],
                        Field(max_length=MAX_CONTEXT_CLUSTERS)]
    weights: Annotated[list[Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]],
                       Field(max_length=MAX_CONTEXT_CLUSTERS)]

    @field_validator("weights")
    @classmethod
    def _a_distribution(cls, v: list[float]) -> list[float]:
        if not all(math.isfinite(x) for x in v):
            raise ValueError("weights must be finite")
        if sum(v) > 1.0 + 1e-6:
            raise ValueError("weights must sum to at most 1")
        return v

    @model_validator(mode="after")
    def _one_weight_per_cluster(self) -> BanditContext:
        if len(self.clusters) != len(self.weights):
            raise ValueError("clusters and weights must have the same length")
        return self


class LabeledEvent(_Wire):
    """One training example on ``freshrec.events`` (key = user id)."""

    event_id: Id
    ts: Timestamp
    user_id: Id
    item_id: Id
    label: Annotated[int, Field(ge=0, le=1)]
    features: Features = Field(default_factory=dict)
    request_id: Id | None = None
    context: BanditContext | None = None
    # Synthetic streams carry the true click probability so evaluations can compute regret.
    p_true: Annotated[float, Field(ge=0, le=1)] | None = None
    # Set by the joiner when negatives were down-sampled: the rate at which this one was kept.
    sample_rate: Annotated[float, Field(gt=0, le=1)] | None = None


class ShownItem(_Wire):
    """One candidate as shown: what the server scored and why."""

    item_id: Id
    position: Annotated[int, Field(ge=0)]
    score: float
    pctr: float
    bonus: float = 0.0
    explored: bool = False
    features: Features = Field(default_factory=dict)


class Impression(_Wire):
    """What one ``/v1/score`` response showed, logged to ``freshrec.impressions``."""

    request_id: Id
    ts: Timestamp
    user_id: Id
    model_version: int
    features: Features = Field(default_factory=dict)
    items: Annotated[list[ShownItem], Field(max_length=10_000)]
    context: BanditContext | None = None


class Click(_Wire):
    """A bare click on ``freshrec.clicks``: joined to its impression by the joiner."""

    event_id: Id
    ts: Timestamp
    user_id: Id
    item_id: Id
    request_id: Id | None = None


class EventRejected(ValueError):
    """A message failed validation; ``reason`` is one line naming the field."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem: ``field.path: message``, at most three, for DLQ headers and 4xx."""
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def parse_labeled_event(raw: bytes) -> LabeledEvent:
    """Parse one Kafka message value; raise :class:`EventRejected` with the reason."""
    try:
        return LabeledEvent.model_validate_json(raw)
    except ValidationError as exc:
        raise EventRejected(describe_validation_error(exc)) from None
    except ValueError as exc:  # not JSON at all
        raise EventRejected(f"<root>: not valid JSON ({exc})") from None
