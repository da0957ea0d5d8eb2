"""Dependencies injected into the routes (``Annotated`` aliases, overridable in tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from pydantic import ValidationError

from embedding_service.batcher import Batcher
from embedding_service.config import Settings
from embedding_service.errors import Overloaded
from embedding_service.runtime import EmbeddingRuntime
from shared.schemas import EmbeddingRequest
from shared.server import check_bearer, invalid_request

#: request fields whose bad element is reported by position (``index``)
IMAGE_FIELDS = ("images", "base64_images")


def get_runtime(request: Request) -> EmbeddingRuntime:
    return request.app.state.runtime


RuntimeDep = Annotated[EmbeddingRuntime, Depends(get_runtime)]


def get_settings(runtime: RuntimeDep) -> Settings:
    return runtime.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """``Authorization: Bearer <EMBEDDING_API_KEY>`` when a key is configured."""
    key = settings.api_key
    check_bearer(request, None if key is None else key.get_secret_value())


def get_batcher(runtime: RuntimeDep) -> Batcher:
    """The batcher once the model is ready; 503 ``not_ready`` before (checked before the
    body is read, so a client is not made to upload into a service that cannot answer)."""
    return runtime.require_ready()


BatcherDep = Annotated[Batcher, Depends(get_batcher)]


async def admit_body(
    request: Request, runtime: RuntimeDep, batcher: BatcherDep
) -> AsyncIterator[None]:
    """Refuse with 429 ``overloaded`` before the body is read when the image queue is
    full or the body would pass ``max_pending_bytes``; otherwise hold its bytes in the
    budget until the request is answered.

    A refused body is never kept or parsed: it is read and dropped chunk by chunk
    before the 429 goes out, so clients waiting on a full service cost no memory
    whatever their number, and each gets its answer after its upload, when the
    connection is in a clean state for the next request.
    """
    settings = runtime.settings
    retry = settings.retry_after_seconds
    if batcher.depth >= batcher.max_queue_images:
        await _drain(request)
        raise Overloaded(
            f"the queue holds {batcher.depth} images and takes at most "
            f"{batcher.max_queue_images}; retry after {retry} s",
            retry_after=retry,
        )
    declared = request.headers.get("content-length", "")
    # A body without a declared length may be as large as the limit lets it be.
    size = int(declared) if declared.isdigit() else settings.max_request_bytes
    budget = runtime.pending_bytes
    if not budget.try_reserve(size):
        await _drain(request)
        raise Overloaded(
            f"requests holding {budget.used} bytes are being served and at most "
            f"{budget.limit} are taken at once; retry after {retry} s",
            retry_after=retry,
        )
    try:
        yield
    finally:
        budget.release(size)


async def _drain(request: Request) -> None:
    """Read the body to its end, keeping none of it (BodyLimitMiddleware bounds it)."""
    async for _ in request.stream():
        pass


async def read_embedding_request(
    request: Request, _: Annotated[None, Depends(admit_body)]
) -> EmbeddingRequest:
    """Parse the body with pydantic's JSON parser whatever the Content-Type says.

    Parsing straight from bytes is faster than ``json.loads`` + validation for
    large bodies, and failures map to ``invalid_request`` naming the field.
    """
    body = await request.body()
    try:
        return EmbeddingRequest.model_validate_json(body)
    except ValidationError as exc:
        raise invalid_request(exc.errors(include_url=False), IMAGE_FIELDS) from None


EmbeddingRequestDep = Annotated[EmbeddingRequest, Depends(read_embedding_request)]
