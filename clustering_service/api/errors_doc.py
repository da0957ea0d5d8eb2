"""Error responses for the OpenAPI document (every route lists the ones it can give)."""

from __future__ import annotations

from typing import Any

from shared.openapi import error_responses

DESCRIPTIONS = {
    404: "not_found: the named dataset, job, model, version or alias does not exist",
    413: "payload_too_large (refused unread) or too_many_items",
    422: "invalid_request (with field), invalid_embedding / invalid_image (with index), "
    "dimension_mismatch, empty_dataset",
    502: "embedding_service_error: the embedding service refused the request",
    503: "embedding_service_unavailable or not_ready (Retry-After)",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route of this service that can answer with ``codes``."""
    return error_responses(codes, DESCRIPTIONS)
