"""Pure ASGI middleware in front of every route: body limits, media type, per-route metrics."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from freshrec.metrics import ServiceMetrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ROUTES = ("/v1/score", "/v1/events", "/v1/model", "/healthz", "/readyz", "/metrics")
_BODY_METHODS = ("POST", "PUT", "PATCH")


class _TooLarge(Exception):
    pass


def _is_json(content_type: bytes) -> bool:
    """``application/json`` or ``application/<x>+json``, with any parameters."""
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/")
                                             and media.endswith(b"+json"))


class GuardAndMeasure:
    """Body-size limit (413), JSON-only bodies (415) and per-route latency/status metrics.

    Pure ASGI rather than ``BaseHTTPMiddleware`` because the latter costs a task and a memory
    stream per request, which is measurable at 1,000+ requests/s on two cores. A request body
    with a declared media type other than JSON is refused here, before any route parses it; a
    body without ``Content-Type`` is read as JSON (what ``curl --data-binary`` users expect).
    """

    def __init__(self, app: Any, max_body: int, metrics: ServiceMetrics) -> None:
        self.app = app
        self.max_body = max_body
        self.metrics = metrics
        self._seconds: dict[str, Any] = {}
        self._responses: dict[tuple[str, int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            length, content_type = _body_headers(scope)
            has_body = scope.get("method") in _BODY_METHODS
            if length is not None and length > self.max_body:
                status[0] = await self._problem(send, 413, "too_large",
                                                f"request body exceeds {self.max_body} bytes")
                return
            if has_body and content_type is not None and not _is_json(content_type):
                status[0] = await self._problem(send, 415, "unsupported_media_type",
                                                "request bodies must be application/json")
                return
            if length is None and has_body:
                receive = await self._buffered(receive)
            await self.app(scope, receive, send_wrapper)
        except _TooLarge:
            status[0] = await self._problem(send, 413, "too_large",
                                            f"request body exceeds {self.max_body} bytes")
        finally:
            # Labelled children are cached: ``labels()`` takes a lock and builds a key per call.
            seconds = self._seconds.get(route)
            if seconds is None:
                seconds = self._seconds[route] = self.metrics.request_seconds.labels(route)
            seconds.observe(time.perf_counter() - started)
            key = (route, status[0])
            responses = self._responses.get(key)
            if responses is None:
                responses = self._responses[key] = self.metrics.responses.labels(
                    route, str(status[0]))
            responses.inc()

    async def _buffered(self, receive: Receive) -> Receive:
        """Read a chunked body up to the limit first (no Content-Length to check)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    async def _problem(self, send: Send, status: int, kind: str, msg: str) -> int:
        body = orjson.dumps({"detail": [{"loc": ["body"], "type": kind, "msg": msg}]})
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        return status


def _body_headers(scope: Scope) -> tuple[int | None, bytes | None]:
    """``(Content-Length, Content-Type)`` of the request, None where absent or unreadable."""
    length = content_type = None
    for k, v in scope.get("headers", ()):
        if k == b"content-length":
            try:
                length = int(v)
            except ValueError:
                length = None
        elif k == b"content-type":
            content_type = v
    return length, content_type
