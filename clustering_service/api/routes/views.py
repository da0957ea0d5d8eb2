"""``/v1/models/{name}/versions/{version}/projection`` and ``/transitions``: views
derived from versions (the dashboard's scatter plot and stability view)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from clustering_service import views
from clustering_service.api.deps import NamePath, RuntimeDep, require_api_key
from clustering_service.api.errors_doc import errors
from shared.clustering_schemas import Projection, Transitions

router = APIRouter(
    prefix="/v1/models/{name}/versions/{version}",
    tags=["models"],
    dependencies=[Depends(require_api_key)],
)


@router.get("/projection", response_model=Projection, responses=errors(401, 404, 422))
async def get_projection(
    name: NamePath,
    version: int,
    runtime: RuntimeDep,
    limit: Annotated[int, Query(ge=1, le=20_000)] = 2000,
) -> dict:
    """A seeded sample of at most ``limit`` items with their cluster and 2-D coordinates
    (PCA of their vectors); items deleted from the dataset since are counted as
    ``missing``."""
    return await asyncio.to_thread(views.projection, runtime, name, version, limit)


@router.get("/transitions", response_model=Transitions, responses=errors(401, 404, 422))
async def get_transitions(
    name: NamePath,
    version: int,
    runtime: RuntimeDep,
    from_version: Annotated[
        int | None, Query(ge=1, description="Default: the version's parent.")
    ] = None,
    limit: Annotated[int, Query(ge=0, le=10_000, description="Moved items listed.")] = 100,
) -> dict:
    """Where the items of ``from_version`` went: counts per (from, to) cluster pair, a
    sample of moved items, cluster sizes and, against the parent, centroid shifts."""
    return await asyncio.to_thread(views.transitions, runtime, name, version, from_version, limit)
