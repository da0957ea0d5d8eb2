"""Prediction with a stored version, and paging through its assignments."""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any

import numpy as np

from clustering_service.db import models as models_db
from clustering_service.errors import DimensionMismatch, InvalidRequest, TooManyItems
from clustering_service.runtime import ClusteringRuntime
from clustering_service.vectors_in import decode_vectors
from shared.clustering_schemas import PredictRequest


async def predict(
    runtime: ClusteringRuntime,
    name: str,
    version: int | None,
    alias: str | None,
    body: PredictRequest,
) -> dict[str, Any]:
    """Clusters (and probabilities) of the request's images or embeddings."""
    settings = runtime.settings
    if version is not None and alias is not None:
        raise InvalidRequest("give version= or alias=, not both", field="alias")
    assert runtime.versions is not None
    pk, number, dim = await asyncio.to_thread(runtime.versions.resolve, name, version, alias)
    if body.images is not None:
        if len(body.images) > settings.max_images_per_request:
            raise TooManyItems(
                f"{len(body.images)} images in one request; the limit is "
                f"{settings.max_images_per_request} (setting max_images_per_request)",
                limit=settings.max_images_per_request,
            )
        X = await runtime.embedder.embed(body.images)
    else:
        embeddings = body.embeddings or []
        if len(embeddings) > settings.max_predict_rows:
            raise TooManyItems(
                f"{len(embeddings)} embeddings in one request; the limit is "
                f"{settings.max_predict_rows} (setting max_predict_rows)",
                limit=settings.max_predict_rows,
            )
        X = decode_vectors(embeddings, "embeddings", settings.max_dim, range(len(embeddings)))
    if X.shape[1] != dim:
        raise DimensionMismatch(
            f"the vectors are {X.shape[1]}-d but model {name!r} version {number} takes {dim}-d",
            expected=dim,
            got=int(X.shape[1]),
        )
    proba = await asyncio.to_thread(_proba, runtime, pk, X)
    best = proba.argmax(axis=1)
    top = proba[np.arange(len(best)), best]
    predictions = []
    for i in range(len(best)):
        p: dict[str, Any] = {"cluster": int(best[i]), "probability": float(top[i])}
        if body.return_probabilities:
            p["probabilities"] = proba[i].tolist()
        predictions.append(p)
    return {"model_name": name, "version": number, "predictions": predictions}


def _proba(runtime: ClusteringRuntime, pk: int, X: np.ndarray) -> np.ndarray:
    assert runtime.versions is not None
    return runtime.versions.get(pk).estimator.predict_proba(X)


def encode_cursor(position: int) -> str:
    return base64.urlsafe_b64encode(f"p{position}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not text.startswith("p"):
            raise ValueError
        position = int(text[1:])
        if position < 0:
            raise ValueError
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise InvalidRequest("cursor: not a cursor this service gave out", field="cursor") from None
    return position


def assignments_page(
    runtime: ClusteringRuntime,
    name: str,
    version: int,
    cluster: int | None,
    limit: int,
    cursor: str | None,
) -> dict[str, Any]:
    """One page of (item id, cluster, probability), in dataset order, optionally one cluster."""
    row = models_db.resolve(runtime.engine, name, version)
    assert runtime.versions is not None
    loaded = runtime.versions.get(row.pk)
    members = loaded.members(cluster)
    start = decode_cursor(cursor) if cursor else 0
    page = members[start : start + limit]
    a = loaded.assignments()
    end = start + len(page)
    return {
        "model_name": name,
        "version": row.version,
        "total": len(members),
        "items": [
            {
                "item_id": a.ids[i],
                "cluster": int(a.cluster[i]),
                "probability": float(a.probability[i]),
            }
            for i in page
        ],
        "next_cursor": encode_cursor(end) if end < len(members) else None,
    }
