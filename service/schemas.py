"""The HTTP contract: request/response models and the validation of raw request bodies.

The pydantic models are the API documentation (OpenAPI) and the one definition of what is
valid. Bodies are validated from bytes here rather than by FastAPI's body parameters: ``/v1/score``
needs a faster path for plainly valid bodies, and ``/v1/events`` must refuse what a lenient JSON
parser would let through (duplicate keys, ``NaN``) before anything reaches Kafka.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, NamedTuple, NoReturn

import msgspec
import orjson
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from featurestore.events import (
    MAX_FEATURES,
    MAX_ID_LEN,
    MAX_LIST_LEN,
    BanditContext,
    Features,
    Id,
    LabeledEvent,
)
from service.candidates import CandidateIds, candidate_key

HARD_MAX_CANDIDATES = 10_000  # schema bound; the configured limit is checked per request
MAX_EVENTS_PER_REQUEST = 1_000
# Set only by the pipeline (the joiner, synthetic replays); a public client setting them could
# steer exploration (``context``), importance weights (``sample_rate``) or evaluations (``p_true``).
PIPELINE_ONLY_FIELDS = ("p_true", "sample_rate", "context")

_INT64 = (-(1 << 63), (1 << 63) - 1)


def _check_feature_values(features: dict[str, Any]) -> dict[str, Any]:
    """Feature values must become int64 IDs and serialize to JSON: bound ints, finite floats.

    The shared event schema accepts any JSON number; an integer past 64 bits would overflow
    the featurizer (here and in the trainer), so the service rejects it with a 422.
    """
    for key, value in features.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int) and not _INT64[0] <= value <= _INT64[1]:
            raise ValueError(f"feature {key!r}: integer outside the int64 range")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"feature {key!r}: number must be finite")
    return features


def _refuse_wide_ints(features: object) -> object:
    """Before the schema: an integer literal past int64 is refused, not read as a float.

    The shared schema's union would turn it into a float (the float member accepts any
    integer), silently changing the ID it hashes to; at the HTTP edge the client hears why.
    """
    if isinstance(features, dict):
        for key, value in features.items():
            if type(value) is int and not _INT64[0] <= value <= _INT64[1]:
                raise ValueError(f"feature {key!r}: integer outside the int64 range")
    return features


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("features", mode="before", check_fields=False)
    @classmethod
    def _features_ints(cls, v: object) -> object:
        return _refuse_wide_ints(v)

    @field_validator("features", check_fields=False)
    @classmethod
    def _features_fit(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _check_feature_values(v)


# ---- /v1/score -------------------------------------------------------------------------------


class Candidate(_Body):
    """One item to score, with its item-side features."""

    item_id: Id
    features: Features = Field(default_factory=dict)


class ScoreRequest(_Body):
    """Score ``candidates`` for ``user_id``; return the best ``top_k``."""

    user_id: Id
    features: Features = Field(default_factory=dict, description="user/context features")
    candidates: Annotated[list[Candidate], Field(min_length=1, max_length=HARD_MAX_CANDIDATES)]
    top_k: Annotated[int, Field(ge=1, le=HARD_MAX_CANDIDATES)] = 10
    explore: bool = Field(True, description="allow the exploration bonus for this request")
    request_id: Id | None = Field(None, description="optional; generated when absent")


class ParsedScore(NamedTuple):
    """A validated score request as plain values (what the handler needs, nothing more)."""

    user_id: str
    features: dict[str, Any]
    items: list[tuple[str, dict[str, Any]]]
    top_k: int
    explore: bool
    request_id: str | None
    rows: list[int]  # one per item: its row in the candidate table the body was parsed with


_CANDIDATE_KEYS = frozenset(Candidate.model_fields)


def _plain_id(v: object) -> bool:
    return type(v) is str and 0 < len(v) <= MAX_ID_LEN


def _plain_features(f: object) -> bool:
    """Values pydantic's ``Features`` would return unchanged and ``_check_feature_values`` pass.

    Deliberately narrower than the schema (no bools, no integral floats, which the union would
    convert): anything else takes the pydantic path, which decides and names the field.
    """
    if type(f) is not dict or len(f) > MAX_FEATURES:
        return False
    for k, v in f.items():
        if len(k) > 64:
            return False
        t = type(v)
        if t is str:
            if len(v) > MAX_ID_LEN:
                return False
        elif t is int:
            if not _INT64[0] <= v <= _INT64[1]:
                return False
        elif t is float:
            if not math.isfinite(v) or v.is_integer():
                return False
        elif t is list:
            if len(v) > MAX_LIST_LEN:
                return False
            for e in v:
                if type(e) is not str or len(e) > MAX_ID_LEN:
                    return False
        else:
            return False
    return True




class _ScoreFields(msgspec.Struct, forbid_unknown_fields=True):
    """The top level of a ``/v1/score`` body as the fast path reads it.

    Candidates stay raw JSON (msgspec checks their syntax and skips them), so a known one is
    one dict lookup by its bytes. Values are typed loosely (``Any``) on purpose: the checks
    below decide what is plainly valid and everything else goes to ``ScoreRequest``, which
    names the field. The field names are ``ScoreRequest``'s (checked at import).
    """

    user_id: Any = None
    features: Any = msgspec.field(default_factory=dict)
    candidates: list[msgspec.Raw] | None = None
    top_k: Any = 10
    explore: Any = True
    request_id: Any = None


if set(_ScoreFields.__struct_fields__) != set(ScoreRequest.model_fields):
    raise ImportError("_ScoreFields must have exactly ScoreRequest's fields")
_SCORE_FIELDS = msgspec.json.Decoder(_ScoreFields)


def _plain_candidate(raw: bytes) -> tuple[str, dict[str, Any]] | None:
    """``(item_id, features)`` of one candidate's JSON if plainly valid, else None."""
    try:
        c = orjson.loads(raw)  # also checks UTF-8, which msgspec's skip of a raw value does not
    except orjson.JSONDecodeError:
        return None
    if type(c) is not dict or not _CANDIDATE_KEYS.issuperset(c):
        return None
    item_id, features = c.get("item_id"), c.get("features", {})
    if not (_plain_id(item_id) and _plain_features(features)):
        return None
    return item_id, features


def _parse_plain(body: bytes, table: CandidateIds) -> ParsedScore | None:
    """msgspec + exact checks for the common, plainly valid body; None = ask pydantic.

    Accepts only bodies that ``ScoreRequest`` accepts with the same values, so the result is
    the same either way; pydantic (0.26 ms for 100 candidates, most of it checking the feature
    unions) then only runs for unusual or invalid bodies. msgspec and orjson refuse
    ``NaN``/``Infinity``, invalid UTF-8, lone surrogates and numbers out of the float range;
    integers beyond 64 bits and integral floats fail the checks above and go to pydantic.
    Duplicate keys: the last value wins, as in pydantic.
    """
    try:
        d = _SCORE_FIELDS.decode(body)
    except (msgspec.MsgspecError, RecursionError):  # malformed, nested too deep, not an
        return None  # object, an unknown field, ...
    user_id, features, raws = d.user_id, d.features, d.candidates
    top_k, explore, request_id = d.top_k, d.explore, d.request_id
    if not (_plain_id(user_id) and _plain_features(features) and raws is not None
            and 0 < len(raws) <= HARD_MAX_CANDIDATES and type(top_k) is int
            and 1 <= top_k <= HARD_MAX_CANDIDATES and type(explore) is bool
            and (request_id is None or _plain_id(request_id))):
        return None
    keys = list(map(bytes, raws))
    found = table.find(keys)  # a candidate in the table was checked when it was added
    if None in found:
        missing: dict[bytes, tuple[str, dict[str, Any]]] = {}
        for key, row in zip(keys, found, strict=True):
            if row is None and key not in missing:
                item = _plain_candidate(key)
                if item is None:
                    return None
                missing[key] = item
        rows = table.add_missing(keys, found, missing)
    else:
        rows = found  # type: ignore[assignment]  # no None in it
    items = list(map(table.items.__getitem__, rows))
    return ParsedScore(user_id, features, items, top_k, explore, request_id, rows)


def _raise_422(exc: ValidationError, prefix: tuple[str | int, ...] = ("body",)) -> NoReturn:
    raise RequestValidationError([
        {**{k: v for k, v in e.items() if k not in ("ctx", "url")}, "loc": (*prefix, *e["loc"])}
        for e in exc.errors(include_url=False)]) from None


def parse_score_body(body: bytes, table: CandidateIds) -> ParsedScore:
    """Validate a ``/v1/score`` body; raises FastAPI's ``RequestValidationError`` (422).

    ``table`` is the scorer's candidate table: candidates it holds were checked when they were
    added, and each candidate's row in it comes back in ``rows``.

    Duplicate keys: the last value wins on both paths (orjson and pydantic agree), and the
    logged impression is re-serialized, so downstream readers see exactly one value.
    """
    plain = _parse_plain(body, table)
    if plain is not None:
        return plain
    try:
        req = ScoreRequest.model_validate_json(body)
    except ValidationError as exc:
        _raise_422(exc)
    items = [(c.item_id, c.features) for c in req.candidates]
    rows = table.table_rows([candidate_key(i, f) for i, f in items], items).tolist()
    return ParsedScore(req.user_id, req.features, items, req.top_k, req.explore,
                       req.request_id, rows)


# ---- /v1/events ------------------------------------------------------------------------------


class ServedEvent(LabeledEvent):
    """A labeled event as accepted by ``POST /v1/events``.

    Feature values are bounded as for scoring. ``ts`` has no schema ceiling here: the handler
    compares it with the wall clock (``event_max_future_skew_s``) and dead-letters future
    events with the reason, so a unit mix-up is visible in the DLQ rather than only in a 422.
    ``p_true``, ``sample_rate`` and ``context`` are accepted only with the internal credential.
    """

    ts: Annotated[float, Field(ge=0, allow_inf_nan=False)]

    @field_validator("features", mode="before")
    @classmethod
    def _features_ints(cls, v: object) -> object:
        return _refuse_wide_ints(v)

    @field_validator("features")
    @classmethod
    def _features_fit(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _check_feature_values(v)

    @field_validator("context")
    @classmethod
    def _clusters_fit(cls, v: BanditContext | None) -> BanditContext | None:
        if v is not None and any(c >= 1 << 31 for c in v.clusters):
            raise ValueError("cluster indices must be < 2**31")
        return v


EventsBody = ServedEvent | Annotated[list[ServedEvent],
                                     Field(min_length=1, max_length=MAX_EVENTS_PER_REQUEST)]
_EVENTS = TypeAdapter(EventsBody)
_EVENT_LIST = TypeAdapter(Annotated[list[ServedEvent],
                                    Field(min_length=1, max_length=MAX_EVENTS_PER_REQUEST)])


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return out


def _not_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def _body_error(msg: str, kind: str = "json_invalid") -> RequestValidationError:
    return RequestValidationError([{"type": kind, "loc": ("body",), "msg": msg}])


def load_strict_json(body: bytes) -> Any:
    """Parse JSON that has one meaning: no duplicate keys, no NaN/Infinity, valid UTF-8.

    Raises ``RequestValidationError`` (422) naming the problem. orjson checks the syntax
    first (UTF-8, surrogates, non-finite numbers, depth ≤ 1,024); the standard parser then
    finds duplicate keys, which orjson silently resolves to the last.
    """
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _body_error(f"invalid JSON: {exc}"[:300]) from None
    try:
        return json.loads(body, object_pairs_hook=_unique_keys,
                          parse_constant=_not_json_constant)
    except _DuplicateKey as exc:
        key = str(exc)[:64].encode("utf-8", "backslashreplace").decode()
        raise _body_error(f"duplicate key {key!r}", "duplicate_key") from None
    except RecursionError:
        raise _body_error("JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal of more than 4,300 digits
        raise _body_error(f"invalid JSON: {exc}"[:300]) from None


def parse_events(body: bytes, *, internal: bool) -> list[ServedEvent]:
    """Validate a ``/v1/events`` body (one event or a list) from bytes; 422 names the field.

    ``internal`` says whether the caller presented the pipeline's credential; without it,
    any of :data:`PIPELINE_ONLY_FIELDS` present (even as null) is refused.
    """
    raw = load_strict_json(body)
    if not internal:
        single = not isinstance(raw, list)
        items = [raw] if single else raw
        errors = [
            {"type": "pipeline_only", "loc": ("body", *(() if single else (i,)), key),
             "msg": f"{key!r} may be set only by the pipeline (internal credential)"}
            for i, item in enumerate(items[:MAX_EVENTS_PER_REQUEST]) if isinstance(item, dict)
            for key in PIPELINE_ONLY_FIELDS if key in item]
        if errors:
            raise RequestValidationError(errors)
    try:
        # One event or a list, decided here rather than by the union, so that an error's
        # location is the field (``body.ts``, ``body.1.ts``), not the union member's name.
        if isinstance(raw, list):
            return _EVENT_LIST.validate_python(raw)
        return [ServedEvent.model_validate(raw)]
    except ValidationError as exc:
        _raise_422(exc)


def events_json_schema(ref_template: str) -> dict[str, Any]:
    """JSON schema of the ``/v1/events`` body (for the OpenAPI document)."""
    return _EVENTS.json_schema(ref_template=ref_template)


# ---- responses -------------------------------------------------------------------------------


class ScoredItem(BaseModel):
    item_id: str
    score: float
    pctr: float
    bonus: float
    explored: bool


class ScoreResponse(BaseModel):
    request_id: str
    model_version: int
    snapshot_age_seconds: float
    items: list[ScoredItem]


class EventsAccepted(BaseModel):
    accepted: int


class ModelInfo(BaseModel):
    model_name: str
    schema_hash: str
    ready: bool
    version: int | None
    dense_version: int | None
    generation: str | None
    snapshot_age_seconds: float | None
    updated: float | None
    table_sizes: dict[str, int]
    bandit_items: int
    clusters: int
    full_loads: int
    redis_connected: bool
    # Which worker process answered: versions are monotone per worker (each follows the
    # stream on its own), so a client comparing versions across calls needs to know.
    worker_pid: int


class Problem(BaseModel):
    detail: Any
