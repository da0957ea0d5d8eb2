"""Dependencies injected into the routes (``Annotated`` aliases, overridable in tests)."""

from __future__ import annotations

from typing import Annotated, TypeVar

from fastapi import Depends, Path, Request
from pydantic import BaseModel, TypeAdapter, ValidationError
from sqlalchemy import Engine

from clustering_service.errors import InvalidRequest
from clustering_service.runtime import ClusteringRuntime
from shared.clustering_schemas import ID_PATTERN, ITEM_ID_PATTERN, NAME_PATTERN
from shared.server import check_bearer, invalid_request

M = TypeVar("M", bound=BaseModel)

# Path parameters are checked like the same names in bodies: a 422 naming the field
# for '../', '/', NUL or control characters, look-alike letters or a name too long,
# before anything reaches the database (PostgreSQL refuses NUL with an error that
# was a 500) or a file name.
NamePath = Annotated[str, Path(pattern=NAME_PATTERN, description="A model name or alias.")]
IdPath = Annotated[str, Path(pattern=ID_PATTERN, description="A dataset or job id.")]
ItemIdPath = Annotated[str, Path(pattern=ITEM_ID_PATTERN, description="An item id.")]


def get_runtime(request: Request) -> ClusteringRuntime:
    return request.app.state.runtime


RuntimeDep = Annotated[ClusteringRuntime, Depends(get_runtime)]


def get_engine(runtime: RuntimeDep) -> Engine:
    return runtime.engine


EngineDep = Annotated[Engine, Depends(get_engine)]


def require_api_key(request: Request, runtime: RuntimeDep) -> None:
    """``Authorization: Bearer <CLUSTERING_API_KEY>`` when a key is configured."""
    check_bearer(request, runtime.settings.secret("api_key"))


def refuse_nul(request: Request) -> None:
    """422 for a path or query parameter holding a NUL character.

    PostgreSQL text cannot hold one, so no stored name or id has one: without this
    the lookup would fail in the database (a 500) instead of naming the field.
    Undeclared query parameters are ignored, as everywhere else.
    """
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    declared = {p.alias for p in dependant.query_params} if dependant is not None else set()
    values = [*request.path_params.items()]
    values += [(k, v) for k, v in request.query_params.multi_items() if k in declared]
    for name, value in values:
        if "\x00" in str(value):
            raise InvalidRequest(f"{name}: must not contain NUL characters", field=name)


async def parse_body(request: Request, model: type[M] | TypeAdapter[M]) -> M:
    """The body parsed by pydantic straight from bytes (faster than ``json.loads`` and
    validation for large bodies), whatever the Content-Type says.

    For a tagged union (job types) the tag pydantic puts first in an error's
    location is dropped, so the field is named as the client wrote it.
    """
    body = await request.body()
    try:
        if isinstance(model, TypeAdapter):
            return model.validate_json(body)
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if isinstance(model, TypeAdapter):
            errors = [{**e, "loc": tuple(e["loc"][1:])} if len(e["loc"]) > 1 else e for e in errors]
        raise invalid_request(errors, ("items", "embeddings", "images")) from None
