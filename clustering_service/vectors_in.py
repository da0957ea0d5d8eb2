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
    fast = _decode_uniform_base64(values)
    if fast is not None:
        return _check_finite(fast, field, positions, max_dim)
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
    return _check_finite(np.vstack(rows).astype(np.float32, copy=False), field, positions, max_dim)


def _decode_uniform_base64(values: Sequence[list[float] | str]) -> np.ndarray | None:
    """All rows in one decode when every value is base64 of the same length without
    padding (the common case: 4 x dim bytes with dim a multiple of 3, e.g. 384 or 768),
    else None and the rows are decoded one by one (which names a bad row)."""
    first = values[0]
    if not isinstance(first, str) or len(first) % 4 or not first:
        return None
    width = len(first)
    if not all(isinstance(v, str) and len(v) == width and v[-1] != "=" for v in values):
        return None
    try:
        raw = pybase64.b64decode("".join(values), validate=True)  # type: ignore[arg-type]
    except (binascii.Error, ValueError):
        return None
    n_values = (width // 4) * 3 // 4
    if n_values == 0 or (width // 4) * 3 % 4:
        return None
    return np.frombuffer(raw, dtype=WIRE_DTYPE).reshape(len(values), n_values).astype(np.float32)


def _check_finite(X: np.ndarray, field: str, positions: Sequence[int], max_dim: int) -> np.ndarray:
    if X.shape[1] > max_dim:
        raise InvalidEmbedding(
            f"{field}[{positions[0]}]: {X.shape[1]} values; a vector needs 1 to {max_dim}",
            index=positions[0],
            field=f"{field}[{positions[0]}]",
        )
    finite = np.isfinite(X).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        index = positions[bad]
        raise InvalidEmbedding(
            f"{field}[{index}]: contains NaN or infinity", index=index, field=f"{field}[{index}]"
        )
    return X
