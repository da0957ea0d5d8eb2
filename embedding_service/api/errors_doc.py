"""Error responses for the OpenAPI document (every route lists the ones it can give)."""

from __future__ import annotations

from typing import Any

from shared.openapi import error_responses

DESCRIPTIONS = {
    413: "too_many_images, or payload_too_large (refused unread)",
    422: "invalid_image (with index) or invalid_request (with field)",
    503: "not_ready: the model is loading or its worker died (Retry-After)",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route of this service that can answer with ``codes``."""
    return error_responses(codes, DESCRIPTIONS)
