"""The pieces of a job that run after the fit: assignments, cluster summaries,
stability of an update."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clustering_service.algorithms import create
from clustering_service.jobs.train import (
    EXEMPLARS,
    Assignments,
    assign,
    stability,
    summarize_clusters,
)


def test_summary_matches_a_direct_computation() -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((5000, 12)).astype(np.float32)
    cluster = rng.integers(0, 7, 5000).astype(np.int32)
    cluster[cluster == 5] = 4  # an empty cluster id
    ids = [f"i{i}" for i in range(5000)]
    summary = summarize_clusters(X, cluster, ids, 7)
    for c, entry in enumerate(summary):
        members = np.flatnonzero(cluster == c)
        assert entry["size"] == len(members)
        if not len(members):
            assert entry["exemplars"] == []
            continue
        d = ((X[members] - X[members].mean(axis=0)) ** 2).sum(axis=1)
        expected = [ids[i] for i in members[np.argsort(d, kind="stable")[:EXEMPLARS]]]
        assert entry["exemplars"] == expected


def test_assignments_round_trip_and_agree_with_predict(tmp_path: Path) -> None:
    X = np.random.default_rng(1).standard_normal((300, 5)).astype(np.float32)
    est = create("kmeans", n_clusters=4, n_init=1).fit(X)
    cluster, probability = assign(est, X)
    np.testing.assert_array_equal(cluster, est.predict(X))
    assert np.all((probability > 0) & (probability <= 1))
    ids = [f"é/{i}" for i in range(300)]  # any text, slashes and accents included
    Assignments(ids, cluster, probability).save(tmp_path / "a.safetensors")
    back = Assignments.read(tmp_path / "a.safetensors")
    assert back.ids == ids
    np.testing.assert_array_equal(back.cluster, cluster)
    np.testing.assert_array_equal(back.probability, probability)


def test_dec_assignments_from_its_last_pass_are_what_predict_answers() -> None:
    """DEC keeps its last pass over the training data (labels_proba_); the job's
    assignments taken from it equal a fresh predict_proba over the same rows, after a
    fit and after an update (which may stop on tol or on its epoch budget)."""
    rng = np.random.default_rng(2)
    X = (rng.standard_normal((400, 8)) + 4 * rng.integers(0, 3, (400, 1))).astype(np.float32)
    est = create(
        "dec", n_clusters=3, pretrain_epochs=2, cluster_epochs=2, hidden_dims=[16], latent_dim=4
    ).fit(X)
    grown = np.concatenate([X, X[:50] + 0.1])
    for step, data in (("fit", X), ("update", grown)):
        if step == "update":
            est.update(data, max_epochs=1)
        assert est.labels_proba_ is not None, step
        cluster, probability = assign(est, data)
        proba = est.predict_proba(data)
        np.testing.assert_array_equal(cluster, proba.argmax(axis=1), err_msg=step)
        np.testing.assert_allclose(probability, proba.max(axis=1), rtol=1e-6, err_msg=step)


@pytest.mark.parametrize(
    ("n", "spherical"), [(600, False), (600, True), (25_000, False)], ids=["small", "sph", "large"]
)
def test_kmeans_probabilities_from_its_final_pass_are_what_predict_answers(
    n: int, spherical: bool
) -> None:
    """k-means computes each row's probability in its final assignment pass (its
    temperature is known before it), on scikit-learn's path (<= 20,000 rows) and on
    its own subsampled one; exemplars from its centres are the members closest to them."""
    rng = np.random.default_rng(3)
    X = (rng.standard_normal((n, 6)) + 3 * rng.integers(0, 4, (n, 1))).astype(np.float32)
    est = create("kmeans", n_clusters=5, n_init=2, spherical=spherical).fit(X)
    assert est.labels_proba_ is not None
    cluster, probability = assign(est, X)
    proba = est.predict_proba(X)
    np.testing.assert_array_equal(cluster, proba.argmax(axis=1))
    np.testing.assert_allclose(probability, proba.max(axis=1), rtol=1e-5)
    ids = [str(i) for i in range(n)]
    by_centre = summarize_clusters(X, cluster, ids, 5, est.cluster_centers_)
    for c, entry in enumerate(by_centre):
        members = np.flatnonzero(cluster == c)
        d = ((X[members].astype(np.float64) - est.cluster_centers_[c]) ** 2).sum(axis=1)
        expected = [ids[i] for i in members[np.argsort(d, kind="stable")[:EXEMPLARS]]]
        assert entry["exemplars"] == expected and entry["size"] == len(members)


def test_stability_counts_shared_items_only() -> None:
    old = Assignments(["a", "b", "c", "d"], np.array([0, 0, 1, 2]), np.ones(4, np.float32))
    report = stability(
        old, ["b", "c", "e", "f"], np.array([0, 1, 1, 1]), 3, {"centroid_shift_max": 0.1}
    )
    assert report["items_retained"] == 2 and report["items_added"] == 2
    assert report["items_removed"] == 2
    assert report["kept_fraction"] == 1.0
    assert report["emptied_clusters"] == [2]
    assert report["centroid_shift_max"] == 0.1
