"""Automatic choice of k."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import make_blobs

from clustering_service.algorithms import ClusteringInputError, create, load
from clustering_service.algorithms.autok import choose_k


@pytest.fixture(scope="module")
def blobs():
    X, y = make_blobs(
        n_samples=1200, centers=4, n_features=6, cluster_std=0.5, random_state=3, center_box=(-8, 8)
    )
    return X.astype(np.float32) + 20.0, y  # shifted off the origin: cosine is meaningful


def test_picks_the_true_k_and_keeps_the_curve(blobs):
    X, _ = blobs
    result = choose_k(X, k_max=10)
    assert result["best_k"] == 4
    assert result["criterion"] == "silhouette_cosine"
    assert result["k_values"] == list(range(2, 11))
    assert len(result["scores"]) == len(result["inertia"]) == 9
    assert result["scores"][2] == max(result["scores"])
    assert result["sample_size"] == len(X)


def test_default_range_and_sampling_are_seeded(blobs):
    X, _ = blobs
    a = choose_k(X, sample_size=400, random_state=5)
    b = choose_k(X, sample_size=400, random_state=5)
    assert a == b
    assert a["sample_size"] == 400
    assert a["k_max"] == 30 and a["k_values"][-1] == 30  # min(30, 400 // 10)
    assert a["best_k"] == 4


def test_tiny_inputs():
    X = np.array([[0, 1], [1, 0], [0, 2]], dtype=np.float32)
    assert choose_k(X)["best_k"] == 2
    with pytest.raises(ClusteringInputError):
        choose_k(X, k_min=1)


def test_estimator_without_n_clusters_uses_it(blobs, tmp_path):
    X, _ = blobs
    est = create("kmeans", n_clusters=None, n_init=2).fit(X)
    assert est.n_clusters_ == 4
    assert est.k_selection_["best_k"] == 4 and est.k_selection_["scores"]
    est.save(tmp_path / "m")
    assert load(str(tmp_path / "m")).k_selection_ == est.k_selection_
