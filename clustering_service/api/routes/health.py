"""Liveness, readiness, description and metrics: open even when an API key is set."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from clustering_service.api.deps import RuntimeDep
from clustering_service.api.errors_doc import errors
from clustering_service.errors import NotReady
from shared.openapi import PROMETHEUS_TEXT
from shared.server import error_response

router = APIRouter(tags=["health"])


@router.get("/health")
def health() -> dict[str, str]:
    """200 while the process serves."""
    return {"status": "ok"}


@router.get("/ready", responses=errors(503))
async def ready(runtime: RuntimeDep) -> JSONResponse:
    """200 when the database is reachable, its schema current and a job worker alive."""
    reason = await asyncio.to_thread(runtime.not_ready_reason)
    if reason is not None:
        return error_response(NotReady(reason))
    return JSONResponse({"status": "ready"})


@router.get("/info")
def info(runtime: RuntimeDep) -> dict[str, Any]:
    """Version, storage, embedding services and limits."""
    return runtime.info()


@router.get("/metrics", response_class=Response, responses=PROMETHEUS_TEXT)
async def metrics(runtime: RuntimeDep) -> Response:
    """Prometheus text format."""
    body, content_type = await asyncio.to_thread(runtime.metrics.render)
    return Response(body, media_type=content_type)
