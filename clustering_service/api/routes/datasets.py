"""``/v1/datasets``: create, list, show; add, delete and look at items."""

from __future__ import annotations

import asyncio
import time

import pybase64
from fastapi import APIRouter, Depends, Request, Response

from clustering_service.api.deps import (
    EngineDep,
    IdPath,
    ItemIdPath,
    RuntimeDep,
    parse_body,
    require_api_key,
)
from clustering_service.api.errors_doc import errors
from clustering_service.db import datasets as datasets_db
from clustering_service.ingest import ingest
from clustering_service.store.vectors import delete_items
from shared.clustering_schemas import (
    Dataset,
    DatasetCreate,
    DatasetList,
    Item,
    ItemsAdd,
    ItemsAdded,
    ItemsDelete,
    ItemsDeleted,
    ItemsFound,
    ItemsLookup,
    Thumbnails,
    ThumbnailsLookup,
)

router = APIRouter(
    prefix="/v1/datasets", tags=["datasets"], dependencies=[Depends(require_api_key)]
)


@router.post("", status_code=201, response_model=Dataset, responses=errors(401, 409, 413, 422))
def create_dataset(body: DatasetCreate, engine: EngineDep) -> dict:
    """A new empty dataset (409 with the existing ``id`` when the name is taken)."""
    return datasets_db.create(engine, body.name)


@router.get("", response_model=DatasetList, responses=errors(401))
def list_datasets(engine: EngineDep) -> dict:
    return {"datasets": datasets_db.list_all(engine)}


@router.get("/{dataset_id}", response_model=Dataset, responses=errors(401, 404))
def get_dataset(dataset_id: IdPath, engine: EngineDep) -> dict:
    return datasets_db.get(engine, dataset_id)


@router.post(
    "/{dataset_id}/items",
    response_model=ItemsAdded,
    responses=errors(401, 404, 413, 422, 502, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ItemsAdd.model_json_schema()}},
        }
    },
)
async def add_items(dataset_id: IdPath, request: Request, runtime: RuntimeDep) -> ItemsAdded:
    """Add items (images are embedded by the embedding service; vectors as JSON numbers
    or base64 float32). Ids already stored are skipped; all or nothing is stored."""
    started = time.perf_counter()
    body = await parse_body(request, ItemsAdd)
    result = await ingest(
        runtime.engine, runtime.embedder, runtime.settings, dataset_id, body.items
    )
    kinds = {"image" if item.image is not None else "embedding" for item in body.items}
    source = kinds.pop() if len(kinds) == 1 else "mixed"
    runtime.metrics.ingest_seconds.labels(source).observe(time.perf_counter() - started)
    runtime.metrics.items_ingested.inc(result.added)
    return ItemsAdded(
        added=result.added, duplicates=result.duplicates, count=result.count, dim=result.dim
    )


@router.post(
    "/{dataset_id}/items/lookup",
    response_model=ItemsFound,
    responses=errors(401, 404, 413, 422),
)
def lookup_items(dataset_id: IdPath, body: ItemsLookup, engine: EngineDep) -> ItemsFound:
    """Which of the ids the dataset holds (clients resuming an upload skip those)."""
    datasets_db.get(engine, dataset_id)
    stored = datasets_db.existing_ids(engine, dataset_id, body.ids)
    return ItemsFound(
        present=[i for i in body.ids if i in stored],
        missing=[i for i in body.ids if i not in stored],
    )


@router.delete(
    "/{dataset_id}/items", response_model=ItemsDeleted, responses=errors(401, 404, 413, 422)
)
def remove_items(dataset_id: IdPath, body: ItemsDelete, engine: EngineDep) -> ItemsDeleted:
    """Delete items by id (ids not stored are counted as ``missing``)."""
    ids = list(dict.fromkeys(body.ids))
    deleted, count = delete_items(engine, dataset_id, ids)
    return ItemsDeleted(deleted=deleted, missing=len(ids) - deleted, count=count)


@router.post(
    "/{dataset_id}/thumbnails/lookup",
    response_model=Thumbnails,
    responses=errors(401, 404, 413, 422),
)
async def lookup_thumbnails(
    dataset_id: IdPath, body: ThumbnailsLookup, engine: EngineDep
) -> Thumbnails:
    """Thumbnails of up to 500 items in one call, as data URIs (null for an item without
    one): what a page needs to show many images, with the API key in a header."""
    found = await asyncio.to_thread(datasets_db.thumbnails, engine, dataset_id, body.ids)
    return Thumbnails.model_validate(
        {
            "thumbnails": [
                {
                    "item_id": item_id,
                    "thumbnail": None
                    if item_id not in found
                    else "data:image/webp;base64," + pybase64.b64encode(found[item_id]).decode(),
                }
                for item_id in body.ids
            ]
        }
    )


# Item ids may hold '/': the thumbnail route must come first.
@router.get(
    "/{dataset_id}/items/{item_id:path}/thumbnail",
    response_class=Response,
    responses={200: {"content": {"image/webp": {}}}, **errors(401, 404)},
)
async def get_thumbnail(dataset_id: IdPath, item_id: ItemIdPath, engine: EngineDep) -> Response:
    """The item's WebP thumbnail (items added as images only)."""
    data = await asyncio.to_thread(datasets_db.thumbnail, engine, dataset_id, item_id)
    return Response(data, media_type="image/webp", headers={"Cache-Control": "max-age=86400"})


@router.get("/{dataset_id}/items/{item_id:path}", response_model=Item, responses=errors(401, 404))
def get_item(dataset_id: IdPath, item_id: ItemIdPath, engine: EngineDep) -> dict:
    """One item: id, label, meta, whether it has a thumbnail."""
    return datasets_db.get_item(engine, dataset_id, item_id)
