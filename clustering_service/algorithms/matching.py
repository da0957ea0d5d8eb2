"""Matching cluster ids across model versions, and how stable an update was.

Two ways to match an old clustering to a new one, both one-to-one by the
Hungarian algorithm (``scipy.optimize.linear_sum_assignment``):

* by centres (:func:`match_clusters`): minimise the total squared Euclidean
  distance between matched centres;
* by members (:func:`match_labels`): maximise the number of items that keep
  their cluster, from the old and new labels of the same items.

:func:`relabel_to_parent` turns a match into final ids: a matched new cluster
takes its parent's id, an unmatched one gets a FRESH id from a ``next_id``
counter that only grows, so an id that was retired in some version is never
handed out again. :func:`stability_report` measures an update.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from clustering_service.algorithms.exceptions import ClusteringInputError


def match_clusters(old_centers: np.ndarray, new_centers: np.ndarray) -> np.ndarray:
    """For each old centre, the index of the new centre matched to it.

    old_centers : (k_old, d); new_centers : (k_new, d).
    Returns ``perm`` int64 of shape (k_old,): old cluster ``i`` is matched to
    new cluster ``perm[i]`` (minimum total squared distance, one-to-one), so
    ``new_centers[perm]`` is the new clustering in the old ids' order when
    ``k_new >= k_old``. When ``k_new < k_old`` the old clusters left without a
    partner get ``-1``; when ``k_new > k_old`` the new clusters absent from
    ``perm`` are unmatched (new).
    """
    from scipy.optimize import linear_sum_assignment

    old = np.asarray(old_centers, dtype=np.float64)
    new = np.asarray(new_centers, dtype=np.float64)
    if old.ndim != 2 or new.ndim != 2 or old.shape[1] != new.shape[1]:
        raise ClusteringInputError(
            f"centres must be 2-D with the same width, got {old.shape} and {new.shape}"
        )
    cost = (old**2).sum(axis=1)[:, None] - 2.0 * old @ new.T + (new**2).sum(axis=1)[None, :]
    rows, cols = linear_sum_assignment(cost)
    perm = np.full(old.shape[0], -1, dtype=np.int64)
    perm[rows] = cols
    return perm


def match_labels(old_labels: Any, new_labels: Any, n_old: int, n_new: int) -> dict[int, int | None]:
    """Match new cluster ids to old ones by shared members.

    old_labels, new_labels : int arrays (n,) -- labels of the SAME items under the
    old (ids ``0..n_old-1``) and new (ids ``0..n_new-1``) clustering.
    Returns ``{new_id: old_id or None}`` for every new id: the one-to-one
    assignment maximising the number of shared items; a new cluster that is
    not assigned, or only to an old cluster it shares no item with, maps to
    None (it is a new cluster).
    """
    from scipy.optimize import linear_sum_assignment

    old = np.asarray(old_labels, dtype=np.int64)
    new = np.asarray(new_labels, dtype=np.int64)
    if old.shape != new.shape or old.ndim != 1:
        raise ClusteringInputError(
            f"old and new labels must be 1-D of the same length, got {old.shape}, {new.shape}"
        )
    for arr, n, name in ((old, n_old, "old"), (new, n_new, "new")):
        if arr.size and (arr.min() < 0 or arr.max() >= n):
            raise ClusteringInputError(f"{name} labels must lie in [0, {n})")
    overlap = np.zeros((n_new, n_old), dtype=np.int64)
    np.add.at(overlap, (new, old), 1)
    rows, cols = linear_sum_assignment(overlap, maximize=True)
    mapping: dict[int, int | None] = dict.fromkeys(range(n_new))
    for r, c in zip(rows, cols, strict=True):
        if overlap[r, c] > 0:
            mapping[int(r)] = int(c)
    return mapping


def relabel_to_parent(
    new_labels: Any,
    mapping: Mapping[int, int | None],
    next_id: int,
    parent_ids: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Final ids for a new clustering matched to its parent.

    new_labels : int array (n,) of new internal ids ``0..n_new-1``.
    mapping : ``{new_id: old internal id or None}`` (:func:`match_labels`, or
        built from :func:`match_clusters`).
    next_id : the parent version's counter: the smallest id never handed out.
    parent_ids : public id of each old internal id (default: the internal id).

    Returns ``(labels, ids, next_id)``: ``ids[j]`` is the public id of new
    cluster ``j`` (its parent's id when matched, else a fresh id
    ``next_id, next_id + 1, ...`` in increasing ``j``), ``labels = ids[new_labels]``,
    and the advanced counter to store with the new version. Old ids that are
    not matched are retired: they never come back because fresh ids start at
    ``next_id``.
    """
    new = np.asarray(new_labels, dtype=np.int64)
    n_new = len(mapping)
    ids = np.empty(n_new, dtype=np.int64)
    used: set[int] = set()
    for j in range(n_new):
        old = mapping[j]
        if old is None:
            ids[j] = next_id
            next_id += 1
            continue
        pid = int(old if parent_ids is None else parent_ids[old])
        if pid in used:
            raise ClusteringInputError(f"old cluster {old} is matched twice")
        if pid >= next_id:
            raise ClusteringInputError(f"parent id {pid} is not below next_id={next_id}")
        used.add(pid)
        ids[j] = pid
    if new.size and (new.min() < 0 or new.max() >= n_new):
        raise ClusteringInputError(f"new labels must lie in [0, {n_new})")
    return ids[new], ids, next_id


def stability_report(
    old_labels: Any,
    new_labels: Any,
    old_centers: np.ndarray | None = None,
    new_centers: np.ndarray | None = None,
    *,
    old_sizes: Sequence[int] | None = None,
    new_sizes: Sequence[int] | None = None,
) -> dict[str, Any]:
    """How much an update changed the clustering of the items it kept.

    old_labels, new_labels : labels (n,) of the RETAINED items (same items, same
        order) before and after the update, in a shared id space.
    old_centers, new_centers : optional (k, d) centres indexed by the same ids.
    old_sizes, new_sizes : optional full cluster sizes per id (e.g. over the
        whole old and new data sets); by default sizes count the retained items.

    Keys: ``n_retained``; ``kept_fraction`` (same id before and after);
    ``kept_fraction_matched`` (after the best one-to-one relabelling -- equals
    ``kept_fraction`` when ids were preserved perfectly; the gap measures id
    drift); ``ari``; with centres, ``centroid_shift`` per id shared by both
    (Euclidean) and its ``centroid_shift_mean``/``centroid_shift_max``;
    ``sizes_old``, ``sizes_new``, ``size_change`` (new - old) per id.
    """
    from sklearn.metrics import adjusted_rand_score

    from clustering_service.algorithms.metrics import clustering_accuracy

    old = np.asarray(old_labels, dtype=np.int64)
    new = np.asarray(new_labels, dtype=np.int64)
    if old.shape != new.shape or old.ndim != 1:
        raise ClusteringInputError(
            f"old and new labels must be 1-D of the same length, got {old.shape}, {new.shape}"
        )
    n = len(old)
    report: dict[str, Any] = {
        "n_retained": n,
        "kept_fraction": float(np.mean(old == new)) if n else None,
        "kept_fraction_matched": clustering_accuracy(old, new) if n else None,
        "ari": float(adjusted_rand_score(old, new)) if n else None,
    }
    if old_centers is not None and new_centers is not None:
        oc = np.asarray(old_centers, dtype=np.float64)
        nc = np.asarray(new_centers, dtype=np.float64)
        k = min(len(oc), len(nc))
        shift = np.linalg.norm(nc[:k] - oc[:k], axis=1)
        report["centroid_shift"] = shift.tolist()
        report["centroid_shift_mean"] = float(shift.mean()) if k else 0.0
        report["centroid_shift_max"] = float(shift.max()) if k else 0.0
    if old_sizes is None:
        old_sizes = np.bincount(old) if n else np.zeros(0, dtype=np.int64)
    if new_sizes is None:
        new_sizes = np.bincount(new) if n else np.zeros(0, dtype=np.int64)
    k = max(len(old_sizes), len(new_sizes))
    so = np.zeros(k, dtype=np.int64)
    sn = np.zeros(k, dtype=np.int64)
    so[: len(old_sizes)] = old_sizes
    sn[: len(new_sizes)] = new_sizes
    report["sizes_old"] = so.tolist()
    report["sizes_new"] = sn.tolist()
    report["size_change"] = (sn - so).tolist()
    return report
