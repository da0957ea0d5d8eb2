"""Build the clustering service's FastAPI app (``python -m clustering_service`` serves it)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request

from clustering_service.api.deps import refuse_nul
from clustering_service.api.routes import (
    algorithms,
    dashboard,
    datasets,
    health,
    jobs,
    models,
    views,
)
from clustering_service.config import Settings
from clustering_service.errors import TRANSLATED_ERRORS, from_exception
from clustering_service.runtime import ClusteringRuntime, service_version
from shared.openapi import finish_openapi
from shared.server import BodyLimitMiddleware, register_error_handlers


def create_app(settings: Settings | None = None, embedding_transport: Any = None) -> FastAPI:
    """The app for ``settings`` (default: from the environment).

    Start-up (database, migrations, in-process worker) runs in the app's
    lifespan; ``embedding_transport`` replaces the HTTP transport to the
    embedding service (tests).
    """
    settings = settings or Settings()
    runtime = ClusteringRuntime(settings, embedding_transport)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(
        dependencies=[Depends(refuse_nul)],
        title="dinocluster clustering service",
        version=service_version(),
        description="Datasets of embedded items, training jobs (k-means, DEC, DeepCluster, "
        "ODC), immutable model versions, prediction and stable incremental updates.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_request_bytes,
        on_reject=lambda: runtime.metrics.failures.labels("payload_too_large").inc(),
        hint="send fewer items per request",
    )

    def count(request: Request, error_type: str) -> None:
        if request.url.path.startswith("/v1/"):
            runtime.metrics.failures.labels(error_type).inc()

    register_error_handlers(
        app, count, ("items", "embeddings", "images"), from_exception, TRANSLATED_ERRORS
    )
    for module in (datasets, algorithms, jobs, models, views, health, dashboard):
        app.include_router(module.router)
    finish_openapi(app)
    return app
