"""``freshrec service``: run the scoring service under uvicorn.

One worker per process by default, as in a Kubernetes deployment where replicas scale by pods
and each pod's /metrics is its own. ``WEB_CONCURRENCY=N`` (uvicorn's usual variable) starts N
worker processes on one port instead; each loads its own snapshot and follows the stream, and
/metrics then reports whichever worker answered.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import uvicorn
from fastapi import FastAPI

from freshrec.settings import Settings, load_settings


def app_from_env() -> FastAPI:
    """Factory for worker processes: settings from the ``FRESHREC_*`` environment."""
    from service.app import create_app

    return create_app(load_settings())


def _fast_loop() -> dict[str, str]:
    """uvloop + httptools when installed (about 1.5-2x the requests/s of asyncio + h11)."""
    opts = {}
    if importlib.util.find_spec("uvloop"):
        opts["loop"] = "uvloop"
    if importlib.util.find_spec("httptools"):
        opts["http"] = "httptools"
    return opts


def run(settings: Settings) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit code."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
    common = dict(host=settings.service_host, port=settings.service_port, log_level="warning",
                  access_log=False, **_fast_loop())
    if workers > 1:
        uvicorn.run("service.main:app_from_env", factory=True, workers=workers, **common)
    else:
        from service.app import create_app

        uvicorn.run(create_app(settings), **common)
    return 0
