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


def test_cache_is_written_under_a_name_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two benchmark processes may fill the cache at once: each writes its own
    temporary file, so neither renames the other's away (a shared name failed a
    run: the second rename found no file)."""
    calls = []

    def make() -> tuple[np.ndarray, np.ndarray]:
        calls.append(1)
        return np.ones((2, 3), dtype=np.float32), np.arange(2)

    real_savez = np.savez

    def savez_while_another_process_does(file: Path, **arrays: np.ndarray) -> None:
        real_savez(file, **arrays)
        if len(calls) == 1:  # ours is written: another process writes and renames
            with monkeypatch.context() as other:
                other.setattr(datasets.os, "getpid", lambda: 99999999)
                datasets._cached("some_set", make, tmp_path)

    monkeypatch.setattr(datasets.np, "savez", savez_while_another_process_does)
    X, y = datasets._cached("some_set", make, tmp_path)
    assert X.shape == (2, 3) and y.tolist() == [0, 1] and calls == [1, 1]
    assert [p.name for p in tmp_path.iterdir()] == ["some_set.npz"]
    datasets._cached("some_set", make, tmp_path)
    assert calls == [1, 1]  # read back, not made again
