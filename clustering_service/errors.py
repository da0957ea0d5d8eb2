"""The errors the clustering service reports: the shared set plus its own.

Every error renders as ``{"error": {"type", "message", ...extra}}``;
:mod:`shared.errors` has the common types, :mod:`shared.server` maps them to HTTP.
"""

from __future__ import annotations

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
