"""Operational endpoints: liveness, readiness and the Prometheus exposition."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.errors import json_response
from service.schemas import Problem
from service.state import ServiceState, service_state

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": Problem}})
async def readyz(st: Annotated[ServiceState, Depends(service_state)]) -> Response:
    """Readiness: a snapshot is loaded, the follower that keeps it current is running and the
    start-up work on the first snapshot (``create_app``'s ``when_loaded``) is done.

    Stays ready through Redis outages (the follower retries and the last snapshot is served);
    503 while no follower runs, since the replica would serve an ever older model.
    """
    snap = st.snapshot
    if snap is None:
        return json_response({"status": "waiting for a snapshot"}, status_code=503)
    if not st.following:
        return json_response({"status": "snapshot follower not running",
                              "version": snap.version}, status_code=503)
    if not st.warm:
        return json_response({"status": "warming up", "version": snap.version}, status_code=503)
    return json_response({"status": "ready", "version": snap.version})


@router.get("/metrics")
async def prometheus(st: Annotated[ServiceState, Depends(service_state)]) -> Response:
    """Prometheus text exposition of this replica's metrics."""
    snap = st.snapshot
    if snap is not None:
        st.metrics.snapshot_age.set(max(0.0, time.time() - snap.updated))
    return Response(st.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
