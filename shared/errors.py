"""The closed set of errors both services report, each with one HTTP status.

Every error renders as ``{"error": {"type", "message", ...extra}}`` (see
``../shared/docs/api.md``). Core code raises these; each service's HTTP layer
maps them with :func:`shared.server.register_error_handlers`. A service adds
its own types by subclassing :class:`ServiceError` with a ``type`` and ``status``.
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

    def headers(self) -> dict[str, str]:
        """Extra response headers (``Retry-After`` for the retryable ones)."""
        return {}


class InvalidRequest(ServiceError):
    """The request body is not valid JSON or a field has the wrong type/value."""

    type, status = "invalid_request", 422


class Unauthorized(ServiceError):
    type, status = "unauthorized", 401


class NotFound(ServiceError):
    """A named resource (dataset, job, model, version, alias) does not exist."""

    type, status = "not_found", 404


class Conflict(ServiceError):
    """The request contradicts what is stored (a name taken, a state that forbids it)."""

    type, status = "conflict", 409


class PayloadTooLarge(ServiceError):
    type, status = "payload_too_large", 413


class _RetryLater(ServiceError):
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.extra.get("retry_after", 1))}


class Overloaded(_RetryLater):
    """The queue is full; the response carries ``Retry-After``."""

    type, status = "overloaded", 429


class NotReady(_RetryLater):
    type, status = "not_ready", 503
