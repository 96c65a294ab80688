"""``GET /v1/model``: what this replica serves (versions, freshness, table sizes)."""

from __future__ import annotations

import os
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from service.errors import json_response
from service.schemas import ModelInfo
from service.state import ServiceState, service_state

router = APIRouter()


@router.get("/v1/model", response_model=ModelInfo)
async def model_info(st: Annotated[ServiceState, Depends(service_state)]) -> Response:
    """Versions, freshness and table sizes of the snapshot this replica serves."""
    follower = st.follower
    snap = st.snapshot
    info: dict[str, Any] = {
        "model_name": st.settings.model_name, "schema_hash": st.config.schema_hash,
        "ready": snap is not None, "version": None, "dense_version": None,
        "generation": None, "snapshot_age_seconds": None, "updated": None,
        "table_sizes": {}, "bandit_items": 0, "clusters": 0,
        "full_loads": follower.full_loads if follower else 0,
        "redis_connected": follower.connected if follower else False,
        "worker_pid": os.getpid(),
    }  # fmt: skip
    if snap is not None:
        info.update(version=snap.version, dense_version=snap.dense_version,
                    generation=snap.generation, updated=snap.updated,
                    snapshot_age_seconds=max(0.0, time.time() - snap.updated),
                    table_sizes=snap.table_sizes(),
                    bandit_items=len(snap.bandit) if snap.bandit is not None else 0,
                    clusters=0 if snap.centroids is None else len(snap.centroids))
    return json_response(info)
