"""The closed set of errors the embedding service reports, each with one HTTP status.

Every error renders as ``{"error": {"type", "message", ...extra}}`` (see
``../shared/docs/api.md``). Algorithm code raises these; the HTTP layer maps
them with :func:`error_body`.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base: ``type`` is the machine-readable name, ``status`` the HTTP code."""

    type: str = "internal_error"
    status: int = 500

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.type, "message": self.message, **self.extra}}


class InvalidImage(ServiceError):
    """One image could not be decoded or breaks a per-image limit; ``index`` names it."""

    type, status = "invalid_image", 422


class InvalidRequest(ServiceError):
    """The request body is not valid JSON or a field has the wrong type/value."""

    type, status = "invalid_request", 422


class TooManyImages(ServiceError):
    type, status = "too_many_images", 413


class PayloadTooLarge(ServiceError):
    type, status = "payload_too_large", 413


class Overloaded(ServiceError):
    """The queue is full; the response carries ``Retry-After``."""

    type, status = "overloaded", 429


class NotReady(ServiceError):
    type, status = "not_ready", 503


class Unauthorized(ServiceError):
    type, status = "unauthorized", 401


class ModelLoadError(RuntimeError):
    """The model could not be loaded at start-up (message says how to provide weights)."""
