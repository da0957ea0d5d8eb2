"""Accepting a job: check it against what is stored, then queue it.

Everything that can be known before training is checked here, so a bad
request gets a 4xx naming the field instead of a job that fails later: the
dataset exists and is not empty, ``n_clusters`` fits the item count, the
algorithm and each parameter are valid, an update's model and version exist
and its dataset has the model's dimension. The data may still change before a
worker starts; the job re-checks and fails with the reason if so.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import Engine

from clustering_service import catalog
from clustering_service.db import datasets as datasets_db
from clustering_service.db import jobs as jobs_db
from clustering_service.db import models as models_db
from clustering_service.errors import DimensionMismatch, EmptyDataset, InvalidRequest
from shared.clustering_schemas import TrainJobCreate, UpdateJobCreate


def _dataset(engine: Engine, dataset_id: str) -> dict[str, Any]:
    dataset = datasets_db.get(engine, dataset_id)
    if dataset["count"] == 0:
        raise EmptyDataset(
            f"dataset {dataset_id!r} is empty; add items before training", field="dataset_id"
        )
    return dataset


def train_spec(engine: Engine, request: TrainJobCreate) -> dict[str, Any]:
    params = catalog.validate_train(
        request.algorithm, request.n_clusters, request.seed, request.params
    )
    dataset = _dataset(engine, request.dataset_id)
    if request.n_clusters is not None and request.n_clusters > dataset["count"]:
        raise InvalidRequest(
            f"n_clusters: {request.n_clusters} clusters asked for but dataset "
            f"{request.dataset_id!r} has {dataset['count']} items",
            field="n_clusters",
        )
    if dataset["count"] < 2:
        raise InvalidRequest(
            f"dataset_id: dataset {request.dataset_id!r} has {dataset['count']} item; "
            "clustering needs at least 2",
            field="dataset_id",
        )
    return {
        "type": "train",
        "dataset_id": request.dataset_id,
        "algorithm": request.algorithm,
        "model_name": request.model_name,
        "n_clusters": request.n_clusters,
        "seed": request.seed,
        "params": params,
    }


def update_spec(engine: Engine, request: UpdateJobCreate) -> dict[str, Any]:
    parent = models_db.resolve(engine, request.model_name, request.from_version)
    params = catalog.validate_update(parent.algorithm, request.params)
    dataset_id = request.dataset_id or parent.dataset_id
    dataset = _dataset(engine, dataset_id)
    if dataset["dim"] != parent.dim:
        raise DimensionMismatch(
            f"dataset {dataset_id!r} holds {dataset['dim']}-d vectors but model "
            f"{request.model_name!r} version {parent.version} was trained on {parent.dim}-d",
            expected=parent.dim,
            got=dataset["dim"],
        )
    if dataset["count"] < parent.n_clusters:
        raise InvalidRequest(
            f"dataset_id: dataset {dataset_id!r} has {dataset['count']} items, fewer than the "
            f"model's {parent.n_clusters} clusters",
            field="dataset_id",
        )
    return {
        "type": "update",
        "dataset_id": dataset_id,
        "algorithm": parent.algorithm,
        "model_name": request.model_name,
        "from_version": parent.version,
        "params": params,
    }


def submit(
    engine: Engine,
    defer: jobs_db.Deferrer,
    request: TrainJobCreate | UpdateJobCreate,
    idempotency_key: str | None,
) -> tuple[Any, bool]:
    """Validate and queue; returns ``(job row, created)`` (see ``db.jobs.create``)."""
    request_hash = hashlib.sha256(
        json.dumps(request.model_dump(mode="json"), sort_keys=True).encode()
    ).hexdigest()
    if idempotency_key is not None:
        # a repeated request is answered from the record, even if the data changed since
        existing = jobs_db.find_by_key(engine, idempotency_key)
        if existing is not None:
            return jobs_db.create(engine, {}, defer, idempotency_key, request_hash)
    if isinstance(request, TrainJobCreate):
        spec = train_spec(engine, request)
    else:
        spec = update_spec(engine, request)
    return jobs_db.create(engine, spec, defer, idempotency_key, request_hash)
