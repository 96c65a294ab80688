"""Who is writing: the bearer-token check of ``POST /v1/events``.

Two credentials, both from the environment (a secret in production): ``service_api_token`` for
public clients (apps reporting clicks) and ``service_internal_token`` for the pipeline, which
alone may set the pipeline-only event fields. With ``service_events_auth="token"`` (the default)
and neither configured, every write is refused: an endpoint that trains the model is never open
by accident. Tokens are compared with :func:`hmac.compare_digest`, so the time a comparison
takes says nothing about how much of a guess was right.
"""

from __future__ import annotations

import enum
import hmac
import logging
from typing import Annotated

from fastapi import Header, HTTPException, Request

from freshrec.settings import Settings

log = logging.getLogger("freshrec.service")


class Writer(enum.Enum):
    """What a request to a write endpoint may do."""

    PUBLIC = "public"  # may send events, not the pipeline-only fields
    INTERNAL = "internal"  # the pipeline's credential: may set every field


def _bearer(authorization: str | None) -> bytes | None:
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return b""  # presented something, but not a bearer token: never matches
    # Header values arrive latin-1 decoded; compare bytes (compare_digest refuses non-ASCII str).
    return token.strip().encode("latin-1", "replace")


def _matches(presented: bytes, expected: str | None) -> bool:
    return expected is not None and hmac.compare_digest(presented, expected.encode("utf-8"))


def authenticate(settings: Settings, authorization: str | None) -> Writer:
    """The caller's rights, or HTTP 401.

    A request that presents a token must present a valid one, even where the endpoint is
    open (``service_events_auth="none"``): a wrong credential is a misconfiguration to surface,
    not something to downgrade silently.
    """
    presented = _bearer(authorization)
    if presented is not None:
        # Both comparisons always run: which token matched must not show in the timing either.
        internal = _matches(presented, settings.service_internal_token)
        public = _matches(presented, settings.service_api_token)
        if internal:
            return Writer.INTERNAL
        if public:
            return Writer.PUBLIC
    elif settings.service_events_auth == "none":
        return Writer.PUBLIC
    raise HTTPException(401, "missing or invalid bearer token",
                        headers={"WWW-Authenticate": "Bearer"})


async def require_writer(request: Request,
                         authorization: Annotated[str | None, Header()] = None) -> Writer:
    """FastAPI dependency: the authenticated writer of this request (401 otherwise).

    ``async`` so that FastAPI calls it on the event loop, not through its thread pool.
    """
    return authenticate(request.app.state.service.settings, authorization)


def explain_write_access(settings: Settings) -> None:
    """Log once at start-up who may write events, and why nobody can when that is the case."""
    if settings.service_events_auth == "none":
        log.warning("POST /v1/events is open to anyone (FRESHREC_SERVICE_EVENTS_AUTH=none); "
                    "pipeline-only fields still need FRESHREC_SERVICE_INTERNAL_TOKEN")
    elif settings.service_api_token is None and settings.service_internal_token is None:
        log.warning("POST /v1/events refuses every request (401): no token is configured. Set "
                    "FRESHREC_SERVICE_API_TOKEN (clients) and/or FRESHREC_SERVICE_INTERNAL_TOKEN "
                    "(pipeline), or FRESHREC_SERVICE_EVENTS_AUTH=none to open it")
    else:
        log.info("POST /v1/events needs a bearer token (public: %s, internal: %s)",
                 "configured" if settings.service_api_token else "none",
                 "configured" if settings.service_internal_token else "none")
