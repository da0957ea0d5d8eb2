"""The pieces of a job that run after the fit: assignments, cluster summaries,
stability of an update."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
