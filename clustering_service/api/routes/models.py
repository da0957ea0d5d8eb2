"""``/v1/models``: versions, aliases, clusters, assignments, updates, prediction."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import JSONResponse

from clustering_service.api.deps import (
    EngineDep,
    NamePath,
    RuntimeDep,
    parse_body,
    require_api_key,
)
from clustering_service.api.errors_doc import errors
from clustering_service.api.routes.jobs import JOB_RESPONSES, IdempotencyKey, job_response
from clustering_service.db import models as models_db
from clustering_service.jobs.submit import submit
from clustering_service.predict import assignments_page, predict
from shared.clustering_schemas import (
    NAME_PATTERN,
    Alias,
    AliasSet,
    Assignments,
    Clusters,
    Job,
    ModelDetail,
    ModelList,
    ModelUpdateCreate,
    Predictions,
    PredictRequest,
    UpdateJobCreate,
    Version,
)

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Depends(require_api_key)])

VersionQuery = Annotated[int | None, Query(ge=1, description="Default: the latest version.")]
AliasQuery = Annotated[
    str | None, Query(pattern=NAME_PATTERN, description="Use the version this alias points at.")
]


@router.get("", response_model=ModelList, responses=errors(401))
def list_models(engine: EngineDep) -> dict:
    """Every model name with its latest version and aliases."""
    return {"models": models_db.list_models(engine)}


@router.get("/{name}", response_model=ModelDetail, responses=errors(401, 404))
def get_model(name: NamePath, engine: EngineDep) -> dict:
    """Versions, aliases and the history of alias moves."""
    return models_db.get_model(engine, name)


@router.get("/{name}/versions/{version}", response_model=Version, responses=errors(401, 404))
def get_version(name: NamePath, version: int, engine: EngineDep) -> dict:
    return models_db.public_version(models_db.resolve(engine, name, version))


@router.put("/{name}/aliases/{alias}", response_model=Alias, responses=errors(401, 404, 413, 422))
def set_alias(name: NamePath, alias: NamePath, body: AliasSet, engine: EngineDep) -> dict:
    """Point ``alias`` (e.g. ``production``) at a version; the move is recorded."""
    return models_db.set_alias(engine, name, alias, body.version)


@router.get(
    "/{name}/versions/{version}/clusters", response_model=Clusters, responses=errors(401, 404)
)
def get_clusters(name: NamePath, version: int, engine: EngineDep) -> dict:
    """Size and exemplar item ids of every cluster: the items closest to its centre
    (k-means') or to the mean of its items (the other methods)."""
    row = models_db.resolve(engine, name, version)
    return {"model_name": name, "version": row.version, "clusters": row.clusters}


@router.get(
    "/{name}/versions/{version}/assignments",
    response_model=Assignments,
    responses=errors(401, 404, 422),
)
def get_assignments(
    name: NamePath,
    version: int,
    runtime: RuntimeDep,
    cluster: Annotated[int | None, Query(ge=0)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    cursor: str | None = None,
) -> dict:
    """The version's cluster of every item it was trained on, ``limit`` per page; pass
    ``next_cursor`` back as ``cursor`` for the next page."""
    return assignments_page(runtime, name, version, cluster, limit, cursor)


@router.post(
    "/{name}/update",
    status_code=202,
    response_model=Job,
    responses=JOB_RESPONSES,
)
def update_model(
    name: NamePath,
    body: Annotated[ModelUpdateCreate, Body()],
    runtime: RuntimeDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Queue an update job of this model (same as ``POST /v1/jobs`` with type update)."""
    # the path's name is checked by NamePath with the pattern of the body's model_name
    request = UpdateJobCreate(type="update", model_name=name, **body.model_dump())
    row, created = submit(runtime.engine, runtime.require_defer(), request, idempotency_key)
    return job_response(row, created)


@router.post(
    "/{name}/predict",
    response_model=Predictions,
    responses=errors(401, 404, 413, 422, 502, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
        }
    },
)
async def predict_route(
    name: NamePath,
    request: Request,
    runtime: RuntimeDep,
    version: VersionQuery = None,
    alias: AliasQuery = None,
) -> JSONResponse:
    """Cluster of each image or embedding with a version (by number, alias, or latest)."""
    started = time.perf_counter()
    body = await parse_body(request, PredictRequest)
    result = await predict(runtime, name, version, alias, body)
    source = "images" if body.images is not None else "embeddings"
    runtime.metrics.predict_seconds.labels(source).observe(time.perf_counter() - started)
    return JSONResponse(result)
