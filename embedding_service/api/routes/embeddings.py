"""``POST /v1/embeddings``: validate, check limits, hand to the batcher, pool, encode."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from embedding_service.api.deps import BatcherDep, EmbeddingRequestDep, RuntimeDep, require_api_key
from embedding_service.api.errors_doc import errors
from embedding_service.errors import TooManyImages
from embedding_service.model import pool
from shared.schemas import EmbeddingRequest, EmbeddingResponse, encode_embeddings

router = APIRouter(prefix="/v1", tags=["embeddings"], dependencies=[Depends(require_api_key)])

T = TypeVar("T")

# Above this many output floats the JSON encoding moves off the event loop, so
# one large response does not stall every other connection for tens of ms.
_ENCODE_IN_THREAD_FLOATS = 65_536

_TIMING = {"schema": {"type": "string", "pattern": r"^\d+\.\d{2}$"}, "required": True}
_RESPONSES = {
    200: {
        "headers": {
            "x-queue-time": {**_TIMING, "description": "ms from admission to the model start"},
            "x-preprocess-time": {**_TIMING, "description": "ms spent decoding the images"},
            "x-inference-time": {**_TIMING, "description": "ms in the model"},
            "x-total-time": {**_TIMING, "description": "ms from admission to the response"},
        }
    },
    **errors(401, 413, 422, 429, 503),
}
# A 32 x 32 PNG: the request the documentation shows, and the first one API fuzzers send.
_EXAMPLE_IMAGE = (
    "iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAIAAAD8GO2jAAAAKklEQVR42u3NMQEAAAQAMATRP4pYSvBtBZbTHZ8qngkE"
    "AoFAIBAIBIIrC+AFAUQz669uAAAAAElFTkSuQmCC"
)
_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": EmbeddingRequest.model_json_schema(),
                "example": {"images": [_EXAMPLE_IMAGE], "normalize": True},
            }
        },
    }
}


@router.post(
    "/embeddings",
    response_model=EmbeddingResponse,
    responses=_RESPONSES,
    openapi_extra=_REQUEST_BODY,
)
async def create_embeddings(
    request: Request, runtime: RuntimeDep, batcher: BatcherDep, body: EmbeddingRequestDep
) -> Response:
    """Embed images, in input order. Timing headers (ms): ``x-queue-time`` (admission
    until the model started on the first image, decoding included),
    ``x-inference-time`` (first image in until last image out of the model),
    ``x-total-time`` (admission until the response body was ready)."""
    started = time.perf_counter()
    settings = runtime.settings
    n = len(body.images)
    if n > settings.max_images_per_request:
        raise TooManyImages(
            f"{n} images in one request; the limit is {settings.max_images_per_request} "
            "(setting max_images_per_request): split the list into several requests",
            limit=settings.max_images_per_request,
        )
    result = await _unless_disconnected(request, batcher.embed(body.images))
    pooling = body.pooling or settings.pooling
    vectors = pool(result.cls, result.patch_mean, pooling, body.normalize)

    def encode() -> bytes:
        payload = {
            "model": runtime.model_id,
            "dim": int(vectors.shape[1]),
            "pooling": pooling,
            "normalized": body.normalize,
            "encoding": body.encoding,
            "embeddings": encode_embeddings(vectors, body.encoding),
        }
        return json.dumps(payload, separators=(",", ":")).encode()

    if body.encoding == "float" and vectors.size > _ENCODE_IN_THREAD_FLOATS:
        content = await asyncio.to_thread(encode)
    else:
        content = encode()
    total = time.perf_counter() - started
    runtime.metrics.observe_request(n, result.queue_time, result.inference_time, total)
    headers = {
        "x-queue-time": _ms(result.queue_time),
        "x-preprocess-time": _ms(result.preprocess_time),
        "x-inference-time": _ms(result.inference_time),
        "x-total-time": _ms(total),
    }
    return Response(content, media_type="application/json", headers=headers)


# The seed project's client posts {"base64_images": [...], "normalize": ...} to
# /embeddings/ and reads "embeddings": the same handler serves it (the field alias
# and the float default are in the request model), so that client works by changing
# only its host and port.
compat_router = APIRouter(tags=["compatibility"], dependencies=[Depends(require_api_key)])
compat_router.post(
    "/embeddings/",
    response_model=EmbeddingResponse,
    responses=_RESPONSES,
    summary="Compatibility route of the seed project's client (same as POST /v1/embeddings)",
    openapi_extra=_REQUEST_BODY,
)(create_embeddings)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it when the client disconnects first.

    Cancelling the batcher's ``embed`` takes the request's images out of the
    queue, so no model time is spent on answers nobody will read.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise ClientDisconnect()
    return task.result()


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
