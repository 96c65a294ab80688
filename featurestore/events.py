"""Wire schema of everything that flows through Kafka: labeled events, impressions, clicks.

JSON on the wire. Limits on string and list sizes are part of the contract: a trainer must never
be taken down by one huge message, so oversize values are rejected here and dead-lettered with
the reason. The limits are the constants below, and both schemas are built from them:

* pydantic models (``LabeledEvent``, ``Impression``, ...): the HTTP contract (OpenAPI, 4xx
  bodies naming the field) and the source of every rejection reason;
* msgspec structs (``LabeledEventMsg``, ``ImpressionMsg``, ...): the Kafka hot path. Decoding
  and validating an event takes ~1 us instead of ~6-16 us. The ``parse_*`` functions try the
  struct first; anything it refuses is handed to pydantic, which either names the field (the
  same reason as before, so DLQ reasons do not depend on which path ran) or accepts it (pydantic
  is laxer in a few spots, e.g. ``1.0`` for an int). msgspec never accepts what pydantic refuses
  (``tests/featurestore/test_events.py`` checks a corpus of edge cases both ways).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Annotated, Any

import msgspec
import orjson
from msgspec import Meta
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

MAX_ID_LEN = 128
MAX_FEATURE_NAME_LEN = 64
MAX_FEATURES = 64
MAX_LIST_LEN = 64
MAX_SHOWN_ITEMS = 10_000
MAX_CLUSTER = (1 << 31) - 1
MAX_TS = 4_102_444_800.0  # 2100-01-01: anything later is a unit mix-up (ms instead of s)
_INT64 = (-(1 << 63), (1 << 63) - 1)
_FLOAT_MAX = 1.7976931348623157e308  # finite floats are exactly those within +-this

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LEN)]
Text = Annotated[str, Field(max_length=MAX_ID_LEN)]
# Floats must be finite to bucketize and to serialize back to JSON. An integer beyond int64
# parses as a float (and the featurizer hashes it like any out-of-range number).
Int64 = Annotated[int, Field(ge=_INT64[0], le=_INT64[1])]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
# left_to_right: try str, int, float, list in turn instead of scoring every member (~20% faster
# parsing on the trainer's hot path).
FeatureValue = Annotated[
    Text | Int64 | FiniteFloat | Annotated[list[Text], Field(max_length=MAX_LIST_LEN)],
    Field(union_mode="left_to_right"),
]
Features = Annotated[dict[Annotated[str, Field(max_length=MAX_FEATURE_NAME_LEN)], FeatureValue],
                     Field(max_length=MAX_FEATURES)]
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

    clusters: Annotated[list[Annotated[int, Field(ge=0, le=MAX_CLUSTER)]],
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
    items: Annotated[list[ShownItem], Field(max_length=MAX_SHOWN_ITEMS)]
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


def _validate(model: type[BaseModel], raw: bytes) -> Any:
    """pydantic's verdict on ``raw``: the model, or :class:`EventRejected` naming the field."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise EventRejected(describe_validation_error(exc)) from None
    except ValueError as exc:  # not JSON at all
        raise EventRejected(f"<root>: not valid JSON ({exc})") from None


# --- the compiled hot path: msgspec structs built from the same limits ------------------------

_MId = Annotated[str, Meta(min_length=1, max_length=MAX_ID_LEN)]
_MText = Annotated[str, Meta(max_length=MAX_ID_LEN)]
_MInt64 = Annotated[int, Meta(ge=_INT64[0], le=_INT64[1])]
_MFinite = Annotated[float, Meta(ge=-_FLOAT_MAX, le=_FLOAT_MAX)]
_MFeatureValue = _MText | _MInt64 | _MFinite | Annotated[list[_MText],
                                                         Meta(max_length=MAX_LIST_LEN)]
_MFeatures = Annotated[dict[Annotated[str, Meta(max_length=MAX_FEATURE_NAME_LEN)],
                            _MFeatureValue], Meta(max_length=MAX_FEATURES)]
_MTs = Annotated[float, Meta(ge=0, le=MAX_TS)]
_Unit = Annotated[float, Meta(ge=0, le=1)]


class _Msg(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    def to_json(self) -> bytes:
        """Serialize for Kafka, dropping unset optional fields to keep messages small."""
        return _ENCODER.encode(self)


class BanditContextMsg(_Msg):
    """:class:`BanditContext` on the hot path."""

    clusters: Annotated[list[Annotated[int, Meta(ge=0, le=MAX_CLUSTER)]],
                        Meta(max_length=MAX_CONTEXT_CLUSTERS)]
    weights: Annotated[list[Annotated[float, Meta(ge=0, le=1)]],
                       Meta(max_length=MAX_CONTEXT_CLUSTERS)]

    def __post_init__(self) -> None:
        # BanditContext's cross-field rules; a failure hands the message to pydantic's reason.
        if len(self.clusters) != len(self.weights) or sum(self.weights) > 1.0 + 1e-6:
            raise ValueError("not a context")


class LabeledEventMsg(_Msg):
    """:class:`LabeledEvent` on the hot path (same fields, same limits)."""

    event_id: _MId
    ts: _MTs
    user_id: _MId
    item_id: _MId
    label: Annotated[int, Meta(ge=0, le=1)]
    features: _MFeatures = {}
    request_id: _MId | None = None
    context: BanditContextMsg | None = None
    p_true: _Unit | None = None
    sample_rate: Annotated[float, Meta(gt=0, le=1)] | None = None


class ShownItemMsg(_Msg):
    """:class:`ShownItem` on the hot path."""

    item_id: _MId
    position: Annotated[int, Meta(ge=0)]
    score: float
    pctr: float
    bonus: float = 0.0
    explored: bool = False
    features: _MFeatures = {}


class ImpressionMsg(_Msg):
    """:class:`Impression` on the hot path."""

    request_id: _MId
    ts: _MTs
    user_id: _MId
    model_version: int
    features: _MFeatures = {}
    items: Annotated[list[ShownItemMsg], Meta(max_length=MAX_SHOWN_ITEMS)] = []
    context: BanditContextMsg | None = None


class ClickMsg(_Msg):
    """:class:`Click` on the hot path."""

    event_id: _MId
    ts: _MTs
    user_id: _MId
    item_id: _MId
    request_id: _MId | None = None


_ENCODER = msgspec.json.Encoder()
AnyLabeledEvent = LabeledEventMsg | LabeledEvent
AnyImpression = ImpressionMsg | Impression
AnyClick = ClickMsg | Click


def _parser(fast: type[_Msg], model: type[BaseModel], decode: Callable[[bytes], Any]):
    errors = (msgspec.ValidationError, msgspec.DecodeError)

    def parse(raw: bytes) -> Any:
        try:
            return decode(raw)
        except errors:
            return _validate(model, raw)  # the reason, or pydantic's laxer acceptance

    parse.__doc__ = (f"Parse one Kafka message value into a ``{fast.__name__}`` (or, where only "
                     f"pydantic accepts it, a ``{model.__name__}``); raise "
                     ":class:`EventRejected` with the reason.")
    return parse


_decode_labeled_event = msgspec.json.Decoder(LabeledEventMsg).decode
parse_labeled_event: Callable[[bytes], AnyLabeledEvent] = _parser(
    LabeledEventMsg, LabeledEvent, _decode_labeled_event)
parse_impression: Callable[[bytes], AnyImpression] = _parser(
    ImpressionMsg, Impression, msgspec.json.Decoder(ImpressionMsg).decode)
parse_click: Callable[[bytes], AnyClick] = _parser(
    ClickMsg, Click, msgspec.json.Decoder(ClickMsg).decode)


def decode_labeled_events(raws: Iterable[bytes]) -> list[LabeledEventMsg]:
    """Every value decoded on the compiled path in one C-level pass, or an exception.

    For a batch of clean messages (the common case) this skips the per-message Python of
    :func:`parse_labeled_event`; it raises at the first value the struct refuses (or that is
    not bytes), and the caller then parses the batch one message at a time, which gives each
    bad one its reason. The same decoder, so what it accepts :func:`parse_labeled_event`
    returns as the same struct.
    """
    return list(map(_decode_labeled_event, raws))
