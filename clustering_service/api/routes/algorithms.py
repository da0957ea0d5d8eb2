"""``GET /v1/algorithms``: every algorithm with its parameters, from the estimators."""

from __future__ import annotations

import functools

from fastapi import APIRouter, Depends

from clustering_service import catalog
from clustering_service.api.deps import require_api_key
from shared.clustering_schemas import AlgorithmList

router = APIRouter(prefix="/v1", tags=["algorithms"], dependencies=[Depends(require_api_key)])


@functools.cache
def _all() -> AlgorithmList:
    return AlgorithmList.model_validate({"algorithms": catalog.describe_all()})


@router.get("/algorithms", response_model=AlgorithmList, response_model_by_alias=True)
def algorithms() -> AlgorithmList:
    """Name, one-line description, and each train and update parameter (JSON schema of
    its type, default)."""
    return _all()
