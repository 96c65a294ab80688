"""Error responses that can always be sent: every 4xx body serializes, whatever the input was.

FastAPI's default 422 handler echoes each offending ``input`` through ``jsonable_encoder`` and
``json.dumps(allow_nan=False)``: a ``NaN`` in a request then turned the 422 into a 500, as would
bytes that are not UTF-8 or an integer past 64 bits. Here an input is echoed only when it is a
small, plainly serializable scalar; locations and messages are made valid UTF-8 and bounded.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

MAX_ERRORS = 20  # a list of 1,000 bad events gets the first 20 problems, not a 1 MB answer
_MAX_TEXT = 200
_INT64 = (-(1 << 63), (1 << 63) - 1)
_OMIT = object()


def _text(value: object, limit: int = _MAX_TEXT) -> str:
    """``value`` as bounded, valid UTF-8 text (lone surrogates become escapes)."""
    s = value if isinstance(value, str) else str(value)
    return s[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


def _loc_part(part: object) -> str | int:
    if type(part) is int:
        return part
    return _text(part, 64)


def _echo(value: object) -> object:
    """The input to echo back, or ``_OMIT`` when it might not serialize or is large."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if _INT64[0] <= value <= _INT64[1] else _OMIT
    if isinstance(value, float):
        return value if math.isfinite(value) else _OMIT
    if isinstance(value, str):
        return _text(value)
    return _OMIT


def problem_detail(errors: list[Any]) -> list[dict[str, Any]]:
    """FastAPI's 422 ``detail`` shape (``type``, ``loc``, ``msg``, ``input``), made safe."""
    detail = []
    for err in errors[:MAX_ERRORS]:
        if not isinstance(err, dict):
            detail.append({"type": "value_error", "loc": ["body"], "msg": _text(err)})
            continue
        item: dict[str, Any] = {
            "type": _text(err.get("type", "value_error"), 64),
            "loc": [_loc_part(p) for p in tuple(err.get("loc", ()))[:16]],
            "msg": _text(err.get("msg", "")),
        }
        echoed = _echo(err.get("input"))
        if echoed is not _OMIT and "input" in err:
            item["input"] = echoed
        detail.append(item)
    return detail


def json_response(content: Any, status_code: int = 200,
                  headers: dict[str, str] | None = None) -> Response:
    """orjson-encoded response (plain Python values; numpy-free)."""
    return Response(orjson.dumps(content), status_code=status_code, headers=headers,
                    media_type="application/json")


async def _validation_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return json_response({"detail": problem_detail(list(exc.errors()))}, status_code=422)


def install_error_handlers(app: FastAPI) -> None:
    """Replace FastAPI's 422 handler with one whose body always serializes."""
    app.add_exception_handler(RequestValidationError, _validation_error)
