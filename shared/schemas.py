"""Wire format shared by the services and the client (see docs/api.md in ../shared).

The embedding service validates requests with these models and the client
builds and reads them, so both sides agree on names, defaults and encodings.
"""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StrictBool

Pooling = Literal["cls", "mean", "cls_mean"]
Encoding = Literal["float", "base64"]

# Little-endian float32, whatever the byte order of either machine.
WIRE_DTYPE = np.dtype("<f4")


class EmbeddingRequest(BaseModel):
    """Body of ``POST /v1/embeddings``."""

    model_config = ConfigDict(populate_by_name=True)

    images: list[str] = Field(
        min_length=1,
        validation_alias=AliasChoices("images", "base64_images"),
        description='Base64-encoded images or "data:image/...;base64," URIs. '
        '"base64_images" (the seed project\'s name) is accepted as an alias.',
    )
    normalize: StrictBool = Field(True, description="L2-normalise each embedding.")
    pooling: Pooling | None = Field(
        None,
        description="cls (CLS token), mean (mean of patch tokens) or cls_mean (both, "
        "concatenated: twice the model width). Default: the server's setting.",
    )
    encoding: Encoding = Field(
        "float",
        description="float: JSON numbers; base64: each vector as base64 of its "
        "little-endian float32 bytes (smaller, exact, faster to parse).",
    )


class EmbeddingResponse(BaseModel):
    """200 body of ``POST /v1/embeddings``; ``embeddings`` is in input order."""

    model: str
    dim: int
    pooling: Pooling
    normalized: bool
    encoding: Encoding
    embeddings: list[list[float]] | list[str]

    def to_numpy(self) -> np.ndarray:
        """The embeddings as float32 of shape (n_images, dim)."""
        return decode_embeddings(self.embeddings, self.encoding, self.dim)


class ErrorDetail(BaseModel):
    """``type`` is machine-readable (invalid_image, overloaded, ...)."""

    model_config = ConfigDict(extra="allow")

    type: str
    message: str
    index: int | None = Field(None, description="Position of the offending image.")
    field: str | None = Field(None, description="Request field that failed validation.")


class ErrorResponse(BaseModel):
    """Every error: ``{"error": {"type", "message", ...}}``."""

    error: ErrorDetail


def encode_embeddings(vectors: np.ndarray, encoding: Encoding) -> list[list[float]] | list[str]:
    """(n, dim) array -> the JSON ``embeddings`` value for ``encoding``."""
    if encoding == "base64":
        rows = np.ascontiguousarray(vectors, dtype=WIRE_DTYPE)
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
    return np.asarray(vectors, dtype=np.float32).tolist()


def decode_embeddings(
    embeddings: list[list[float]] | list[str], encoding: Encoding, dim: int
) -> np.ndarray:
    """The JSON ``embeddings`` value -> float32 array of shape (n, dim)."""
    if not embeddings:
        return np.empty((0, dim), np.float32)
    if encoding == "base64":
        raw = b"".join(base64.b64decode(row) for row in embeddings)
        return np.frombuffer(raw, dtype=WIRE_DTYPE).reshape(len(embeddings), dim).astype(np.float32)
    return np.asarray(embeddings, dtype=np.float32).reshape(len(embeddings), dim)
