"""The model config: which slots exist, where their values come from, how their tables behave.

A slot is one sparse feature with its own embedding table (so its own dim, admission threshold,
TTL and row cap). Configuration is data: a TOML file validated into frozen pydantic models, so a
typo stops start-up with the offending key named instead of surfacing as a shape error mid-stream.
"""

from __future__ import annotations

import hashlib
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class SlotKind(StrEnum):
    """How a raw value becomes feature IDs."""

    CATEGORICAL = "categorical"  # one value -> one ID
    MULTI_VALUED = "multi_valued"  # list of values -> several IDs, mean-pooled
    BUCKETIZED = "bucketized"  # number -> bucket index -> one ID


class SlotSide(StrEnum):
    """Where a score request carries the slot's value."""

    USER = "user"  # request-level: user id and user/context features
    ITEM = "item"  # per candidate: item id and item features


class OptimizerName(StrEnum):
    ADAGRAD = "adagrad"
    FTRL = "ftrl"
    SGD = "sgd"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SlotConfig(_Frozen):
    """One sparse feature and its embedding table.

    ``source`` is ``user_id``, ``item_id`` or the name of a key in the event's ``features``.
    """

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
    source: str
    side: SlotSide
    kind: SlotKind = SlotKind.CATEGORICAL
    dim: Annotated[int, Field(ge=1, le=1024)] = 16
    min_count: Annotated[int, Field(ge=1)] = 1
    ttl_seconds: Annotated[float, Field(gt=0)] = 30 * 86400.0
    max_rows: Annotated[int, Field(ge=1)] = 10_000_000
    optimizer: OptimizerName = OptimizerName.ADAGRAD
    learning_rate: Annotated[float, Field(gt=0)] = 0.05
    init_scale: Annotated[float, Field(ge=0)] = 0.05
    boundaries: tuple[float, ...] = ()

    @model_validator(mode="after")
    def _bucketized_needs_boundaries(self) -> SlotConfig:
        if self.kind is SlotKind.BUCKETIZED:
            if not self.boundaries:
                raise ValueError("bucketized slots need 'boundaries'")
            if list(self.boundaries) != sorted(self.boundaries):
                raise ValueError("'boundaries' must be sorted ascending")
        elif self.boundaries:
            raise ValueError("'boundaries' only applies to bucketized slots")
        return self


class DenseConfig(_Frozen):
    """The dense CTR network on top of the pooled slot embeddings."""

    arch: Literal["dcn", "deepfm", "lr"] = "dcn"
    hidden: tuple[Annotated[int, Field(ge=1)], ...] = (64, 32)
    cross_layers: Annotated[int, Field(ge=0, le=8)] = 2
    optimizer: Literal["adam", "adagrad"] = "adam"
    learning_rate: Annotated[float, Field(gt=0)] = 0.003


class WideConfig(_Frozen):
    """The wide part, learned one example at a time: a bias per ID and a factorization machine
    over the slots (trainer/wide.py).

    Both live in the slots' embedding rows, so they need no tables of their own: coordinate 0
    of a row is the ID's bias, coordinates ``1..fm_dim`` its FM factor. ``fm_dim`` (``None``:
    every coordinate the smallest slot has after its bias) must fit the smallest slot;
    0 keeps only the biases.

    ``bias_learning_rate``: the bias coordinates' rate (the factors use their slot's
    ``learning_rate``). 0.5 is Vowpal Wabbit's default for adaptive linear weights, as 0.2 is
    libFFM's for factors; tuned values on MovieLens sit at the same place (docs/trainer.md).
    """

    fm_dim: Annotated[int, Field(ge=0)] | None = None
    bias_learning_rate: Annotated[float, Field(gt=0)] = 0.5


class ModelConfig(_Frozen):
    """A whole model: its slots, its wide part and its dense network."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    slots: tuple[SlotConfig, ...]
    wide: WideConfig = WideConfig()
    dense: DenseConfig = DenseConfig()

    @model_validator(mode="after")
    def _slots_are_usable(self) -> ModelConfig:
        names = [s.name for s in self.slots]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate slot names in {names}")
        sides = {s.side for s in self.slots}
        if sides != {SlotSide.USER, SlotSide.ITEM}:
            raise ValueError("need at least one user-side and one item-side slot")
        if not any(s.source == "item_id" for s in self.slots):
            raise ValueError("one slot must read 'item_id' (exploration statistics key on it)")
        fm, smallest = self.wide.fm_dim, min(s.dim for s in self.slots)
        if fm is not None and fm > smallest - 1:
            raise ValueError(f"wide.fm_dim {fm} does not fit the smallest slot (dim {smallest}:"
                             f" one bias + at most {smallest - 1} factor coordinates)")
        return self

    @property
    def fm_dim(self) -> int:
        """FM factor coordinates per row (after the bias), resolved."""
        fm = self.wide.fm_dim
        return min(s.dim for s in self.slots) - 1 if fm is None else fm

    @property
    def slot_sides(self) -> tuple[int, ...]:
        """0 for a user-side slot, 1 for an item-side one, in slot order: the wide part's FM
        pairs a user-side slot with an item-side one (``trainer.wide``)."""
        return tuple(0 if s.side is SlotSide.USER else 1 for s in self.slots)

    @property
    def slot_starts(self) -> tuple[int, ...]:
        """Column where each slot's pooled vector starts in the model input, in slot order."""
        starts, col = [], 0
        for s in self.slots:
            starts.append(col)
            col += s.dim
        return tuple(starts)

    def slot(self, name: str) -> SlotConfig:
        """The slot called ``name``."""
        for s in self.slots:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def schema_hash(self) -> str:
        """Stable digest of everything that shapes tables and weights; snapshots carry it."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]

    @property
    def user_slot(self) -> SlotConfig | None:
        """The slot keyed by the raw user id, whose rows the bandit clusters."""
        return next((s for s in self.slots if s.source == "user_id"), None)

    @property
    def item_slot(self) -> SlotConfig:
        """The slot keyed by the raw item id."""
        return next(s for s in self.slots if s.source == "item_id")


class ModelConfigError(ValueError):
    """The model config is unusable; the message is one line naming the key."""


def load_model_config(path: Path | str) -> ModelConfig:
    """Read and validate a TOML model config; raise :class:`ModelConfigError` on any problem."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ModelConfigError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ModelConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        raise ModelConfigError(f"{path}: {key}: {err['msg']}") from None
