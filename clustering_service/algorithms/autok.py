"""Automatic choice of the number of clusters.

Criterion: mean **cosine silhouette** of k-means, for every k in
``[k_min, k_max]``, computed on one seeded sample of at most ``sample_size``
rows; the best k is the one with the highest silhouette (the smallest such k
on ties). The cosine distance matrix of the sample is computed once and
shared by all k, so the cost is one ``sample_size^2`` matrix (100 MB at 5000
rows) plus a small k-means per k.

Why silhouette: it needs no reference distribution (unlike the gap
statistic), is bounded and comparable across k (unlike inertia, which always
falls), and cosine is the natural geometry of L2-normalised embeddings while
still behaving on pixel vectors. Its known bias -- a preference for few, well
separated clusters -- is why the whole curve is returned for reporting: a
caller can see a flat curve and pick k by hand.

``k_max`` defaults to ``min(30, n_sample // 10)`` (at least ``k_min``): more
clusters than one per 10 sampled points cannot be judged from the sample.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from clustering_service.algorithms.exceptions import ClusteringInputError

CRITERION = "silhouette_cosine"
DEFAULT_K_MAX = 30


def choose_k(
    X: np.ndarray,
    k_min: int = 2,
    k_max: int | None = None,
    random_state: int = 0,
    sample_size: int = 5000,
    n_init: int = 3,
) -> dict[str, Any]:
    """Pick k for ``X`` (n, d) by the cosine silhouette of k-means on a seeded sample.

    Returns a dict: ``best_k``, ``criterion`` (``"silhouette_cosine"``),
    ``k_values`` and ``scores`` (the curve, same order; higher is better),
    ``inertia`` per k (on the sample), ``sample_size`` (rows used), ``k_min``,
    ``k_max``.
    """
    from sklearn.metrics import pairwise_distances, silhouette_score

    from clustering_service.algorithms.kmeans import run_kmeans

    n = X.shape[0]
    if k_min < 2:
        raise ClusteringInputError(f"k_min must be >= 2, got {k_min}")
    if n < k_min:
        raise ClusteringInputError(f"X has {n} samples, fewer than k_min={k_min}")
    if n > sample_size:
        rows = np.sort(np.random.default_rng(random_state).choice(n, sample_size, replace=False))
        S = np.asarray(np.take(X, rows, axis=0), dtype=np.float32)
    else:
        S = np.asarray(X, dtype=np.float32)
    m = S.shape[0]
    if k_max is None:
        k_max = max(k_min, min(DEFAULT_K_MAX, m // 10))
    # silhouette needs 2 <= k <= m - 1
    k_max = min(k_max, m - 1)
    if k_max < k_min:
        return _result(k_min, [], [], [], m, k_min, k_min)
    dist = pairwise_distances(S, metric="cosine").astype(np.float32)
    np.fill_diagonal(dist, 0.0)
    k_values, scores, inertias = [], [], []
    for k in range(k_min, k_max + 1):
        _, labels, inertia = run_kmeans(S, k, n_init=n_init, random_state=random_state)
        score = float(silhouette_score(dist, labels, metric="precomputed"))
        k_values.append(k)
        scores.append(score)
        inertias.append(inertia)
    best_k = k_values[int(np.argmax(scores))]
    return _result(best_k, k_values, scores, inertias, m, k_min, k_max)


def _result(
    best_k: int,
    k_values: list[int],
    scores: list[float],
    inertias: list[float],
    m: int,
    k_min: int,
    k_max: int,
) -> dict[str, Any]:
    return {
        "best_k": int(best_k),
        "criterion": CRITERION,
        "k_values": k_values,
        "scores": scores,
        "inertia": inertias,
        "sample_size": m,
        "k_min": k_min,
        "k_max": k_max,
    }
