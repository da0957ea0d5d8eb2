"""Dependencies injected into the routes (``Annotated`` aliases, overridable in tests)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from pydantic import ValidationError

from embedding_service.batcher import Batcher
from embedding_service.config import Settings
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


async def read_embedding_request(request: Request) -> EmbeddingRequest:
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
