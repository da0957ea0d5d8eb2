"""Client vectors: base64 float32 or JSON numbers, decoded fast, bad rows named."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from clustering_service.errors import DimensionMismatch, InvalidEmbedding
from clustering_service.vectors_in import decode_vectors


def b64(row: np.ndarray) -> str:
    return base64.b64encode(np.asarray(row, dtype="<f4").tobytes()).decode()


@pytest.mark.parametrize("dim", [384, 5, 1])  # one decode for 384; padded rows one by one
def test_base64_and_lists_decode_exactly(dim: int) -> None:
    X = np.random.default_rng(0).standard_normal((50, dim)).astype(np.float32)
    out = decode_vectors([b64(r) for r in X], "items", 16384, range(50))
    np.testing.assert_array_equal(out, X)
    np.testing.assert_array_equal(decode_vectors(X.tolist(), "items", 16384, range(50)), X)


def test_bad_rows_are_named_by_their_request_position() -> None:
    good = b64(np.ones(384))
    with pytest.raises(InvalidEmbedding, match=r"items\[7\]: contains NaN") as info:
        decode_vectors([good, b64(np.full(384, np.nan))], "items", 16384, [3, 7])
    assert info.value.extra["index"] == 7
    with pytest.raises(InvalidEmbedding, match=r"items\[1\]: not valid base64"):
        decode_vectors([good, "@@@@" * 512], "items", 16384, [0, 1])
    with pytest.raises(DimensionMismatch, match=r"items\[1\] has 383"):
        decode_vectors([good, b64(np.ones(383))], "items", 16384, [0, 1])
    with pytest.raises(InvalidEmbedding, match="1 to 100"):
        decode_vectors([good], "items", 100, [0])
    with pytest.raises(InvalidEmbedding, match="whole number of float32"):
        decode_vectors([base64.b64encode(b"12345").decode()], "items", 100, [0])
