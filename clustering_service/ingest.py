"""Adding items to a dataset: validate, embed the images, store all or nothing.

Order of work, cheapest checks first: request limits and duplicate ids, the
dataset (404), the vectors sent as embeddings (decoded and checked), then the
images, skipping ids the dataset already holds (re-sending a batch costs no
embedding work), then thumbnails, then one transaction
(:func:`clustering_service.store.vectors.add_items`). If the embedding service
fails, nothing of the request is stored.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from clustering_service.config import Settings
from clustering_service.db import datasets as datasets_db
from clustering_service.embedder import Embedder
from clustering_service.errors import (
    DimensionMismatch,
    InvalidImage,
    InvalidRequest,
    TooManyItems,
)
from clustering_service.store.vectors import AddResult, NewItems, add_items
from clustering_service.thumbnails import make_thumbnail
from clustering_service.vectors_in import decode_vectors
from shared.clustering_schemas import ItemIn


def check_limits(items: list[ItemIn], settings: Settings) -> list[int]:
    """Positions of the image items; raises for too many items/images or repeated ids."""
    if len(items) > settings.max_items_per_request:
        raise TooManyItems(
            f"{len(items)} items in one request; the limit is {settings.max_items_per_request} "
            "(setting max_items_per_request): split the list into several requests",
            limit=settings.max_items_per_request,
        )
    images = [i for i, item in enumerate(items) if item.image is not None]
    if len(images) > settings.max_images_per_request:
        raise TooManyItems(
            f"{len(images)} images in one request; the limit is "
            f"{settings.max_images_per_request} (setting max_images_per_request)",
            limit=settings.max_images_per_request,
        )
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if item.id in seen:
            raise InvalidRequest(
                f"items[{i}].id: {item.id!r} appears twice in the request (first at "
                f"items[{seen[item.id]}])",
                field=f"items[{i}].id",
                index=i,
            )
        seen[item.id] = i
    return images


async def ingest(
    engine: Any, embedder: Embedder, settings: Settings, dataset_id: str, items: list[ItemIn]
) -> AddResult:
    """Store ``items`` in the dataset (see the module docstring)."""
    image_positions = check_limits(items, settings)
    dataset = await asyncio.to_thread(datasets_db.get, engine, dataset_id)
    vector_positions = [i for i, item in enumerate(items) if item.embedding is not None]
    vectors: dict[int, np.ndarray] = {}
    if vector_positions:
        X = decode_vectors(
            [items[i].embedding for i in vector_positions],  # type: ignore[misc]
            "items",
            settings.max_dim,
            vector_positions,
        )
        vectors.update(zip(vector_positions, X, strict=True))
    thumbnails: dict[int, bytes | None] = {}
    if image_positions:
        stored = await asyncio.to_thread(
            datasets_db.existing_ids, engine, dataset_id, [items[i].id for i in image_positions]
        )
        todo = [i for i in image_positions if items[i].id not in stored]
        if todo:
            try:
                embedded = await embedder.embed([items[i].image for i in todo])  # type: ignore[misc]
            except InvalidImage as exc:  # name the item, not the position among the images
                pos = todo[exc.extra["index"]]
                reason = exc.message.partition(": ")[2]
                raise InvalidImage(
                    f"items[{pos}].image ({items[pos].id!r}): {reason}",
                    index=pos,
                    field=f"items[{pos}].image",
                    reason=exc.extra.get("reason"),
                ) from None
            vectors.update(zip(todo, embedded, strict=True))
            if settings.thumbnail_size:
                thumbs = await asyncio.to_thread(
                    lambda: [make_thumbnail(items[i].image, settings.thumbnail_size) for i in todo]
                )
                thumbnails.update(zip(todo, thumbs, strict=True))
    keep = sorted(vectors)
    if not keep:  # every item was an image already stored
        count = dataset["count"]
        return AddResult(added=0, duplicates=len(items), count=count, dim=dataset["dim"] or 0)
    dims = {vectors[i].shape[0] for i in keep}
    if len(dims) > 1:
        raise DimensionMismatch(
            f"the request mixes vectors of {sorted(dims)} dimensions (images are embedded by "
            "the embedding service; vectors sent must match)"
        )
    new = NewItems(
        ids=[items[i].id for i in keep],
        vectors=np.stack([vectors[i] for i in keep]),
        labels=[items[i].label for i in keep],
        metas=[items[i].meta for i in keep],
        thumbnails=[thumbnails.get(i) for i in keep],
    )
    result = await asyncio.to_thread(add_items, engine, dataset_id, new)
    result.duplicates += len(items) - len(keep)
    return result
