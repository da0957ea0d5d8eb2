"""Metrics against small cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from clustering_service.algorithms import ClusteringInputError
from clustering_service.algorithms.metrics import (
    cluster_size_stats,
    clustering_accuracy,
    contingency,
    evaluate,
    silhouette_cosine,
)


def test_acc_fewer_clusters_than_classes():
    # 6 items, 3 classes, 2 clusters.
    #   y_true = 0 0 0 1 1 2
    #   y_pred = 1 1 0 0 0 0
    # contingency (cluster x class): c0 = [1, 2, 1], c1 = [2, 0, 0]
    # best one-to-one: c1 -> class 0 (2), c0 -> class 1 (2); class 2 unmatched
    # ACC = 4 / 6
    assert clustering_accuracy([0, 0, 0, 1, 1, 2], [1, 1, 0, 0, 0, 0]) == pytest.approx(4 / 6)


def test_acc_more_clusters_than_classes():
    # y_true = 0 0 1 1, y_pred = 0 1 2 2: c2 -> class 1 (2), c0 or c1 -> class 0 (1)
    # the third cluster has no class left: ACC = 3 / 4
    assert clustering_accuracy([0, 0, 1, 1], [0, 1, 2, 2]) == pytest.approx(3 / 4)


def test_acc_is_invariant_to_renaming_and_uses_arbitrary_values():
    y = np.array([5, 5, 7, 7, 9, 9])
    pred = np.array([30, 30, 10, 10, 20, 20])
    assert clustering_accuracy(y, pred) == 1.0
    table, clusters, classes = contingency(y, pred)
    assert clusters.tolist() == [10, 20, 30] and classes.tolist() == [5, 7, 9]
    assert table.tolist() == [[0, 2, 0], [0, 0, 2], [2, 0, 0]]


def test_acc_greedy_would_be_wrong():
    # contingency (cluster x class): c0 = [3, 2, 0], c1 = [3, 1, 0], c2 = [0, 0, 1]
    # greedy (largest cell first): c0 -> 0 (3), c1 -> 1 (1), c2 -> 2 (1) = 5
    # Hungarian: c0 -> 1 (2), c1 -> 0 (3), c2 -> 2 (1) = 6 -> ACC 6 / 10
    y_true = [0, 0, 0, 1, 1, 0, 0, 0, 1, 2]
    y_pred = [0, 0, 0, 0, 0, 1, 1, 1, 1, 2]
    assert clustering_accuracy(y_true, y_pred) == pytest.approx(6 / 10)


def test_acc_rejects_mismatched_lengths():
    with pytest.raises(ClusteringInputError):
        clustering_accuracy([0, 1], [0, 1, 1])


def test_cluster_size_stats_counts_empty_ids():
    # sizes of ids 0..4 for labels 0 0 0 2 2 3: [3, 0, 2, 1, 0]
    stats = cluster_size_stats([0, 0, 0, 2, 2, 3], n_clusters=5)
    assert stats["sizes"] == [3, 0, 2, 1, 0]
    assert (stats["min"], stats["max"], stats["n_empty"]) == (0, 3, 2)
    assert stats["mean"] == pytest.approx(6 / 5)
    assert stats["std"] == pytest.approx(np.std([3, 0, 2, 1, 0]))


def test_silhouette_cosine_by_hand():
    # Four 2-D points: two along the x axis, two along y. Cosine distances:
    # within a pair 0, across pairs 1. Each point: a = 0, b = 1 -> s = 1.
    X = np.array([[1, 0], [2, 0], [0, 1], [0, 3]], dtype=np.float32)
    assert silhouette_cosine(X, [0, 0, 1, 1]) == pytest.approx(1.0)
    # undefined with a single cluster
    assert silhouette_cosine(X, [0, 0, 0, 0]) is None


def test_silhouette_sample_is_seeded():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 5)).astype(np.float32)
    labels = (X[:, 0] > 0).astype(int)
    a = silhouette_cosine(X, labels, sample_size=100, random_state=1)
    b = silhouette_cosine(X, labels, sample_size=100, random_state=1)
    assert a == b
    assert 0 < a < 1


def test_evaluate_reports_everything(digits_data):
    X, y = digits_data
    report = evaluate(X, y, y, n_clusters=10)
    assert report["acc"] == 1.0 and report["nmi"] == pytest.approx(1.0)
    assert report["ari"] == pytest.approx(1.0)
    assert report["n_samples"] == len(y) and report["n_clusters"] == 10
    assert report["sizes"]["n_empty"] == 0 and report["sizes"]["min"] > 150
    assert 0 < report["silhouette"] < 1
    without = evaluate(None, y)
    assert "acc" not in without and without["silhouette"] is None
