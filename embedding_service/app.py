"""Build the embedding service's FastAPI app (``python -m embedding_service`` serves it).

Three layers that do not leak into each other: the routes in ``api`` (HTTP
validation, limits, error mapping, metrics), the :mod:`~embedding_service.batcher`
(admission, batching, backpressure) and the :mod:`~embedding_service.model`
backend (loading and the forward pass). :class:`EmbeddingRuntime` holds them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request

from embedding_service.api.deps import IMAGE_FIELDS
from embedding_service.api.routes import embeddings, health
from embedding_service.batcher import Backend
from embedding_service.config import Settings
from embedding_service.runtime import EmbeddingRuntime, service_version
from shared.openapi import finish_openapi
from shared.server import BodyLimitMiddleware, register_error_handlers


def create_app(
    settings: Settings | None = None,
    backend: Backend | None = None,
    *,
    on_fatal: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The app for ``settings`` (default: from the environment).

    ``backend`` replaces loading ``settings.model`` (tests inject fakes or a
    preloaded model). The model loads and warms up in the background once the
    app starts, so ``/health`` answers meanwhile; ``on_fatal`` is called if that
    fails.
    """
    settings = settings or Settings()
    runtime = EmbeddingRuntime(settings, backend, on_fatal=on_fatal)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starting = asyncio.create_task(runtime.start())
        try:
            yield
        finally:
            starting.cancel()
            await runtime.stop()

    app = FastAPI(
        title="DINOv2 embedding service",
        version=service_version(),
        description="Image embeddings from DINOv2 with dynamic batching.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_request_bytes,
        on_reject=lambda: runtime.metrics.observe_failure("payload_too_large"),
        hint="send fewer or smaller images per request",
    )

    def count(request: Request, error_type: str) -> None:
        if request.url.path.startswith("/v1/"):
            runtime.metrics.observe_failure(error_type)

    register_error_handlers(app, count, IMAGE_FIELDS)
    app.include_router(embeddings.router)
    app.include_router(embeddings.compat_router)
    app.include_router(health.router)
    finish_openapi(app)
    return app
