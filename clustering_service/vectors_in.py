"""Vectors sent by clients: JSON numbers or base64 little-endian float32."""

from __future__ import annotations

import binascii
from collections.abc import Sequence

import numpy as np
import pybase64

from clustering_service.errors import DimensionMismatch, InvalidEmbedding
from shared.schemas import WIRE_DTYPE


def decode_vectors(
    values: Sequence[list[float] | str], field: str, max_dim: int, positions: Sequence[int]
) -> np.ndarray:
    """float32 (n, dim) from each value (a list of numbers or a base64 string).

    ``positions`` gives each value's index in the request, for the error
    (InvalidEmbedding with ``index`` and ``field``) that names a value that is
    not decodable, empty, too long, of another length than the first, or not
    finite.
    """
    rows: list[np.ndarray] = []
    dim: int | None = None
    for value, index in zip(values, positions, strict=True):
        where = f"{field}[{index}]"
        if isinstance(value, str):
            try:
                raw = pybase64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidEmbedding(
                    f"{where}: not valid base64", index=index, field=where
                ) from None
            if len(raw) % 4:
                raise InvalidEmbedding(
                    f"{where}: {len(raw)} bytes is not a whole number of float32 values",
                    index=index,
                    field=where,
                )
            row = np.frombuffer(raw, dtype=WIRE_DTYPE)
        else:
            row = np.asarray(value, dtype=np.float32)
        if row.size == 0 or row.size > max_dim:
            raise InvalidEmbedding(
                f"{where}: {row.size} values; a vector needs 1 to {max_dim}",
                index=index,
                field=where,
            )
        if dim is None:
            dim = row.size
        elif row.size != dim:
            raise DimensionMismatch(
                f"{where} has {row.size} values but the first vector of the request has {dim}",
                index=index,
                field=where,
            )
        rows.append(row)
    X = np.vstack(rows).astype(np.float32, copy=False)
    finite = np.isfinite(X).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        index = positions[bad]
        raise InvalidEmbedding(
            f"{field}[{index}]: contains NaN or infinity", index=index, field=f"{field}[{index}]"
        )
    return X
