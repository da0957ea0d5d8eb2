"""The pure parts of the dashboard's views: PCA to 2-D, id matching, the view cache."""

from __future__ import annotations

import numpy as np
import pytest

from clustering_service.views import ViewCache, _positions, pca_2d


def test_pca_matches_scikit_learn(digits_data: tuple[np.ndarray, np.ndarray]) -> None:
    from sklearn.decomposition import PCA

    X = digits_data[0][:500]
    xy, ratio = pca_2d(X)
    reference = PCA(n_components=2, svd_solver="full").fit(X.astype(np.float64))
    expected = reference.transform(X.astype(np.float64))
    # same axes up to sign; ours has each axis's largest loading positive
    assert np.allclose(np.abs(xy), np.abs(expected), atol=1e-6)
    assert ratio == pytest.approx(reference.explained_variance_ratio_.tolist())
    # the sign rule makes the result independent of the row order
    order = np.random.default_rng(0).permutation(len(X))
    shuffled, _ = pca_2d(X[order])
    assert np.allclose(shuffled, xy[order], atol=1e-6)


@pytest.mark.parametrize("shape", [(0, 5), (1, 5), (3, 1), (4, 2)])
def test_pca_small_inputs(shape: tuple[int, int]) -> None:
    X = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) ** 1.5
    xy, ratio = pca_2d(X)
    assert xy.shape == (shape[0], 2) and np.isfinite(xy).all()
    assert len(ratio) == 2 and sum(ratio) <= 1 + 1e-9


def test_positions() -> None:
    assert _positions(["a", "b"], ["a", "b"]).tolist() == [0, 1]
    assert _positions(["b", "x", "a"], ["a", "b"]).tolist() == [1, -1, 0]


def test_view_cache_keeps_the_most_recent() -> None:
    cache = ViewCache(size=2)
    calls: list[str] = []

    def compute(name: str) -> dict[str, str]:
        calls.append(name)
        return {"name": name}

    for key in ("a", "b", "a", "c", "a", "b"):
        assert cache.get_or_compute((key,), lambda k=key: compute(k)) == {"name": key}
    assert calls == ["a", "b", "c", "b"]  # b was evicted by c (a had been used again)
