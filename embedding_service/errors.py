"""The errors the embedding service reports: the shared set plus its own.

Every error renders as ``{"error": {"type", "message", ...extra}}`` (see
``../shared/docs/api.md``); :mod:`shared.errors` has the common types and
:mod:`shared.server` maps them to HTTP.
"""

from __future__ import annotations

from shared.errors import (
    InvalidRequest,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    Unauthorized,
)

__all__ = [
    "InvalidImage",
    "InvalidRequest",
    "ModelLoadError",
    "NotReady",
    "Overloaded",
    "PayloadTooLarge",
    "ServiceError",
    "TooManyImages",
    "Unauthorized",
]


class InvalidImage(ServiceError):
    """One image could not be decoded or breaks a per-image limit; ``index`` names it."""

    type, status = "invalid_image", 422


class TooManyImages(ServiceError):
    type, status = "too_many_images", 413


class ModelLoadError(RuntimeError):
    """The model could not be loaded at start-up (message says how to provide weights)."""
