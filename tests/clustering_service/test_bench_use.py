"""The benchmarks' second embedding model: the Universal Sentence Encoder run by
Node.js from ``bench/use_embed`` (real model, real subprocess)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from bench import datasets
from bench.datasets import embed_use, use_text


@pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None, reason="needs Node.js and npm"
)
def test_embed_use_gives_unit_vectors_that_place_paraphrases_together() -> None:
    texts = [
        "How do I install a plugin in WordPress?",
        "Installing WordPress plugins",
        "Sort a list of tuples by the second element in Python",
    ]
    X = embed_use(texts)
    assert X.shape == (3, 512) and X.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-3)
    sim = X @ X.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[1, 2] + 0.2


def test_use_text_rejects_unknown_names_and_reads_its_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="stackoverflow_use"):
        use_text("stackoverflow", cache_dir=tmp_path)
    X = np.eye(3, 512, dtype=np.float32)
    y = np.arange(3)
    np.savez(tmp_path / "searchsnippets_use.npz", X=X, y=y)

    def no_embedding(texts: list[str]) -> np.ndarray:
        raise AssertionError("the cached vectors should have been used")

    monkeypatch.setattr(datasets, "embed_use", no_embedding)
    got_X, got_y = use_text("searchsnippets_use", cache_dir=tmp_path)
    np.testing.assert_array_equal(got_X, X)
    np.testing.assert_array_equal(got_y, y)
