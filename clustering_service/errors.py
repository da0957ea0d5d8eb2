"""The errors the clustering service reports: the shared set plus its own.

Every error renders as ``{"error": {"type", "message", ...extra}}``;
:mod:`shared.errors` has the common types, :mod:`shared.server` maps them to HTTP.
"""

from __future__ import annotations

import errno
import os

import psycopg
from sqlalchemy.exc import DBAPIError

from shared.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    NotReady,
    PayloadTooLarge,
    ServiceError,
    Unauthorized,
)

__all__ = [
    "Conflict",
    "DatabaseUnavailable",
    "DimensionMismatch",
    "EmbeddingServiceDown",
    "EmbeddingServiceError",
    "EmptyDataset",
    "InvalidEmbedding",
    "InvalidImage",
    "InvalidRequest",
    "NotFound",
    "NotReady",
    "PayloadTooLarge",
    "ServiceError",
    "StorageFull",
    "TooManyItems",
    "Unauthorized",
]


class InvalidEmbedding(ServiceError):
    """A vector is not finite, not decodable, or of the wrong length; ``index`` names it."""

    type, status = "invalid_embedding", 422


class DimensionMismatch(ServiceError):
    """Vectors whose dimension differs from the dataset's or the model's."""

    type, status = "dimension_mismatch", 422


class InvalidImage(ServiceError):
    """The embedding service refused an image; ``index`` is its position in the request."""

    type, status = "invalid_image", 422


class EmptyDataset(ServiceError):
    """Training or updating on a dataset without items."""

    type, status = "empty_dataset", 422


class TooManyItems(ServiceError):
    type, status = "too_many_items", 413


class EmbeddingServiceDown(ServiceError):
    """The embedding service could not be reached or stayed overloaded through retries."""

    type, status = "embedding_service_unavailable", 503

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.extra.get("retry_after", 5))}


class EmbeddingServiceError(ServiceError):
    """The embedding service answered with an error this service cannot fix by retrying."""

    type, status = "embedding_service_error", 502


class DatabaseUnavailable(ServiceError):
    """PostgreSQL cannot be reached or dropped the connection (restarting, say)."""

    type, status = "database_unavailable", 503

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.extra.get("retry_after", 2))}


class StorageFull(ServiceError):
    """A disk the service writes to (its data directory, or the database's) is full."""

    type, status = "storage_full", 503

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.extra.get("retry_after", 30))}


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = os.strerror(errno.ENOSPC)  # "No space left on device"

#: the exception classes :func:`from_exception` may turn into a client-facing error
TRANSLATED_ERRORS: tuple[type[Exception], ...] = (DBAPIError, psycopg.Error, OSError)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def from_exception(exc: BaseException) -> ServiceError | None:
    """The client-facing error for a failure of the environment (the database away,
    a full disk), or None for anything else (a bug: an internal error).

    A request that failed so is safe to send again: every write is one transaction
    and ingest is idempotent per item id.
    """
    if isinstance(exc, ServiceError):
        return exc
    cause = exc.orig if isinstance(exc, DBAPIError) else exc
    if isinstance(cause, psycopg.errors.DiskFull):
        return StorageFull(
            f"the database's disk is full ({_first_line(cause)}): free space on the "
            "database server, then retry"
        )
    if isinstance(cause, psycopg.OperationalError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    ):
        return DatabaseUnavailable(
            f"the database is unavailable ({_first_line(cause)}): retry shortly"
        )
    # libraries that write files in native code (safetensors) keep only the message
    if (isinstance(cause, OSError) and cause.errno in _NO_SPACE) or _NO_SPACE_TEXT in str(cause):
        filename = getattr(cause, "filename", None)
        where = f" writing {filename}" if filename else ""
        return StorageFull(
            f"no space left on the service's disk{where}: free space in the data "
            "directory (CLUSTERING_DATA_DIR), then retry"
        )
    return None
