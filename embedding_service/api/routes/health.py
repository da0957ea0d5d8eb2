"""Liveness, readiness, description and metrics: open even when an API key is set."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from embedding_service.api.deps import RuntimeDep
from embedding_service.api.errors_doc import errors
from embedding_service.errors import NotReady
from shared.openapi import PROMETHEUS_TEXT
from shared.server import error_response

router = APIRouter(tags=["health"])


@router.get("/health", responses=errors(503))
def health(runtime: RuntimeDep) -> JSONResponse:
    """200 while the process can still serve, also while the model loads.

    503 once the model worker has died: the process cannot answer embedding
    requests any more and should be restarted by whoever supervises it.
    """
    if runtime.worker_died:
        return error_response(NotReady(runtime.not_ready_reason() or "the model worker died"))
    return JSONResponse({"status": "ok", "state": runtime.phase})


@router.get("/ready", responses=errors(503))
def ready(runtime: RuntimeDep) -> JSONResponse:
    """200 once the model is loaded, warmed up with a full batch and its worker runs."""
    reason = runtime.not_ready_reason()
    if reason is not None:
        return error_response(NotReady(reason))
    return JSONResponse({"status": "ready"})


@router.get("/info")
def info(runtime: RuntimeDep) -> dict[str, Any]:
    """Model, limits and preprocessing; model fields are null while it loads."""
    return runtime.info()


@router.get("/metrics", response_class=Response, responses=PROMETHEUS_TEXT)
def metrics(runtime: RuntimeDep) -> Response:
    """Prometheus text format."""
    body, content_type = runtime.metrics.render()
    return Response(body, media_type=content_type)
