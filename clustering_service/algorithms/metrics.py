"""Clustering quality metrics.

Ground-truth labels are for REPORTING only: nothing in the algorithms reads
these functions to choose epochs, models or hyper-parameters.

* :func:`clustering_accuracy` -- ACC: the best one-to-one mapping of clusters
  to classes (Hungarian algorithm on the contingency matrix, maximised),
  matched count / N. With more clusters than classes the surplus clusters
  count as errors; with fewer, the surplus classes do.
* :func:`evaluate` -- ACC, NMI, ARI (when ``y_true`` is given), cosine
  silhouette on a seeded sample, and cluster-size statistics.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from clustering_service.algorithms.exceptions import ClusteringInputError


def _as_labels(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ClusteringInputError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def contingency(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contingency table ``(n_cluster_values, n_class_values)`` int64 with the
    sorted distinct cluster and class values it is indexed by."""
    y_true = _as_labels(y_true, "y_true")
    y_pred = _as_labels(y_pred, "y_pred")
    if y_true.shape != y_pred.shape:
        raise ClusteringInputError(
            f"y_true and y_pred differ in length: {len(y_true)} vs {len(y_pred)}"
        )
    classes, t = np.unique(y_true, return_inverse=True)
    clusters, p = np.unique(y_pred, return_inverse=True)
    table = np.zeros((len(clusters), len(classes)), dtype=np.int64)
    np.add.at(table, (p, t), 1)
    return table, clusters, classes


def clustering_accuracy(y_true: Any, y_pred: Any) -> float:
    """Best one-to-one cluster -> class accuracy in [0, 1] (Hungarian, maximised)."""
    from scipy.optimize import linear_sum_assignment

    table, _, _ = contingency(y_true, y_pred)
    if table.size == 0:
        return 0.0
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / table.sum())


def cluster_size_stats(labels: Any, n_clusters: int | None = None) -> dict[str, Any]:
    """Sizes of clusters ``0 .. n_clusters - 1`` (default: ``max(labels) + 1``).

    Returns min/max/mean/std of the sizes (empty clusters included), the number
    of empty clusters and the sizes themselves.
    """
    labels = _as_labels(labels, "labels").astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ClusteringInputError("labels must be >= 0")
    k = int(labels.max()) + 1 if labels.size else 0
    if n_clusters is not None:
        if k > n_clusters:
            raise ClusteringInputError(f"labels go up to {k - 1}, beyond n_clusters={n_clusters}")
        k = int(n_clusters)
    sizes = np.bincount(labels, minlength=k)
    if k == 0:
        return {"min": 0, "max": 0, "mean": 0.0, "std": 0.0, "n_empty": 0, "sizes": []}
    return {
        "min": int(sizes.min()),
        "max": int(sizes.max()),
        "mean": float(sizes.mean()),
        "std": float(sizes.std()),
        "n_empty": int((sizes == 0).sum()),
        "sizes": sizes.tolist(),
    }


def silhouette_cosine(
    X: np.ndarray, labels: Any, *, sample_size: int = 10000, random_state: int = 0
) -> float | None:
    """Mean cosine silhouette on a seeded sample of at most ``sample_size`` rows.

    None when it is undefined (fewer than 2 or more than n-1 distinct labels in
    the sample).
    """
    from sklearn.metrics import silhouette_score

    labels = _as_labels(labels, "labels")
    n = X.shape[0]
    if n != len(labels):
        raise ClusteringInputError(f"X has {n} rows but labels has {len(labels)}")
    if n > sample_size:
        rows = np.sort(np.random.default_rng(random_state).choice(n, sample_size, replace=False))
        Xs, ls = np.asarray(np.take(X, rows, axis=0), dtype=np.float32), labels[rows]
    else:
        Xs, ls = np.asarray(X, dtype=np.float32), labels
    n_labels = len(np.unique(ls))
    if n_labels < 2 or n_labels > len(ls) - 1:
        return None
    return float(silhouette_score(Xs, ls, metric="cosine"))


def evaluate(
    X: np.ndarray | None,
    labels: Any,
    y_true: Any = None,
    *,
    random_state: int = 0,
    silhouette_sample: int = 10000,
    n_clusters: int | None = None,
) -> dict[str, Any]:
    """Quality report of ``labels`` (n,) for data ``X`` (n, d).

    Keys: ``n_samples``, ``n_clusters`` (distinct labels), ``sizes`` (see
    :func:`cluster_size_stats`), ``silhouette`` (cosine, seeded sample of at
    most ``silhouette_sample`` rows; None when X is None or undefined), and
    with ``y_true``: ``acc``, ``nmi``, ``ari``.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    labels = _as_labels(labels, "labels")
    report: dict[str, Any] = {
        "n_samples": len(labels),
        "n_clusters": len(np.unique(labels)),
        "sizes": cluster_size_stats(labels, n_clusters),
        "silhouette": None
        if X is None
        else silhouette_cosine(X, labels, sample_size=silhouette_sample, random_state=random_state),
    }
    if y_true is not None:
        y_true = _as_labels(y_true, "y_true")
        report["acc"] = clustering_accuracy(y_true, labels)
        report["nmi"] = float(normalized_mutual_info_score(y_true, labels))
        report["ari"] = float(adjusted_rand_score(y_true, labels))
    return report
