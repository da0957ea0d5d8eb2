"""What the dashboard shows of versions beyond their stored summaries: a 2-D
projection of a version's items, and the moves of items between two versions.

Both are computed on request (in a worker thread: the routes call them with
``asyncio.to_thread``) and kept in a small in-memory LRU. Versions are
immutable, so a transition table never goes stale; a projection also depends
on the dataset's vectors (items deleted since the version was made have none
any more), so it is keyed by the dataset's revision as well.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from clustering_service.db import datasets as datasets_db
from clustering_service.db import models as models_db
from clustering_service.errors import InvalidRequest, NotFound
from clustering_service.store.vectors import load_snapshot

if TYPE_CHECKING:  # the runtime holds a ViewCache
    from clustering_service.runtime import ClusteringRuntime

#: seed of the samples (projected items, listed moves): the same request gives the same answer
SEED = 0


class ViewCache:
    """At most ``size`` computed views, least recently used evicted first."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[Any, ...], dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_compute(
        self, key: tuple[Any, ...], compute: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit
        value = compute()  # outside the lock: two first requests may both compute, harmlessly
        with self._lock:
            self._entries[key] = value
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return value


def pca_2d(X: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Coordinates of the rows of ``X`` on its first two principal axes.

    X : ndarray of shape (n_samples, n_features). Returns ``(xy, ratio)``: xy of
    shape (n_samples, 2) (zeros where there are fewer than two axes) and the
    share of the variance each axis explains. The sign of each axis is fixed
    (its largest loading positive, as scikit-learn's ``svd_flip``), so the
    result does not depend on the LAPACK build.
    """
    n = X.shape[0]
    xy = np.zeros((n, 2), dtype=np.float64)
    if n == 0:
        return xy, [0.0, 0.0]
    centred = np.asarray(X, dtype=np.float64) - X.mean(axis=0, dtype=np.float64)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(2, len(s))
    signs = np.sign(vt[np.arange(k), np.argmax(np.abs(vt[:k]), axis=1)])
    signs[signs == 0] = 1.0
    xy[:, :k] = u[:, :k] * s[:k] * signs
    total = float(np.sum(s**2))
    ratio = [float(s[i] ** 2 / total) if total > 0 and i < k else 0.0 for i in range(2)]
    return xy, ratio


def _positions(ids: list[str], among: list[str]) -> np.ndarray:
    """For each id of ``ids`` its position in ``among`` (-1 where absent)."""
    if ids == among:  # the usual case: the version was made from this very revision
        return np.arange(len(ids), dtype=np.int64)
    where = {item_id: i for i, item_id in enumerate(among)}
    return np.fromiter((where.get(i, -1) for i in ids), dtype=np.int64, count=len(ids))


def _sample(rows: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` of ``rows`` (seeded), in their original order."""
    if len(rows) <= limit:
        return rows
    picked = np.random.default_rng(SEED).choice(len(rows), size=limit, replace=False)
    return rows[np.sort(picked)]


def projection(runtime: ClusteringRuntime, name: str, version: int, limit: int) -> dict[str, Any]:
    """A seeded sample of at most ``limit`` of the version's items, projected to 2-D by
    PCA of their vectors in the dataset now, with each item's cluster.

    Items of the version deleted from the dataset since have no vector: they are
    counted in ``missing`` and the sample is drawn from the others.
    """
    row = models_db.resolve(runtime.engine, name, version)
    try:
        revision = datasets_db.get(runtime.engine, row.dataset_id)["revision"]
    except NotFound:
        revision = None
    key = ("projection", row.pk, revision, limit)
    return runtime.views.get_or_compute(key, lambda: _projection(runtime, row, limit))


def _projection(runtime: ClusteringRuntime, row: Any, limit: int) -> dict[str, Any]:
    assert runtime.versions is not None
    assignments = runtime.versions.get(row.pk).assignments()
    try:
        snap = load_snapshot(runtime.engine, row.dataset_id, runtime.cache)
        ids, X = snap.ids, snap.X
    except NotFound:  # the dataset itself is gone: nothing left to project
        ids, X = [], np.zeros((0, row.dim), np.float32)
    rows = _positions(assignments.ids, ids)
    present = np.flatnonzero(rows >= 0)
    sample = _sample(present, limit)
    xy, ratio = pca_2d(np.asarray(X[rows[sample]], dtype=np.float32))
    xy = np.round(xy, 6)
    return {
        "model_name": row.model_name,
        "version": row.version,
        "dataset_id": row.dataset_id,
        "method": "pca",
        "seed": SEED,
        "total": len(assignments.ids),
        "missing": int(len(assignments.ids) - len(present)),
        "explained_variance_ratio": ratio,
        "points": [
            {
                "item_id": assignments.ids[i],
                "cluster": int(assignments.cluster[i]),
                "x": float(xy[j, 0]),
                "y": float(xy[j, 1]),
            }
            for j, i in enumerate(sample)
        ],
    }


def transitions(
    runtime: ClusteringRuntime, name: str, version: int, from_version: int | None, limit: int
) -> dict[str, Any]:
    """Where the items of ``from_version`` (default: the parent) went in ``version``.

    Counts per (from cluster, to cluster) pair over the items both versions
    hold, cluster sizes in each, and a seeded sample of at most ``limit`` moved
    items. Against the parent, the update's centroid shift per cluster (from
    its stability report) comes along.
    """
    row = models_db.resolve(runtime.engine, name, version)
    base_number = from_version if from_version is not None else row.parent_version
    if base_number is None:
        raise InvalidRequest(
            f"model {name!r} version {row.version} has no parent version: give from_version",
            field="query.from_version",
        )
    base = models_db.resolve(runtime.engine, name, base_number)
    key = ("transitions", base.pk, row.pk, limit)
    return runtime.views.get_or_compute(key, lambda: _transitions(runtime, base, row, limit))


def _transitions(runtime: ClusteringRuntime, base: Any, row: Any, limit: int) -> dict[str, Any]:
    assert runtime.versions is not None
    old = runtime.versions.get(base.pk).assignments()
    new = runtime.versions.get(row.pk).assignments()
    in_old = _positions(new.ids, old.ids)
    new_rows = np.flatnonzero(in_old >= 0)
    before = old.cluster[in_old[new_rows]].astype(np.int64)
    after = new.cluster[new_rows].astype(np.int64)
    width = int(max(after.max(initial=-1), row.n_clusters - 1)) + 1
    pairs, counts = np.unique(before * width + after, return_counts=True)
    moved = np.flatnonzero(before != after)
    shown = _sample(moved, limit)
    from_sizes = np.bincount(old.cluster.astype(np.int64), minlength=base.n_clusters)
    to_sizes = np.bincount(new.cluster.astype(np.int64), minlength=row.n_clusters)
    stability = row.stability or {}
    is_parent = row.parent_version == base.version
    return {
        "model_name": row.model_name,
        "version": row.version,
        "from_version": base.version,
        "is_parent": is_parent,
        "items_shared": len(new_rows),
        "items_added": len(new.ids) - len(new_rows),
        "items_removed": len(old.ids) - len(new_rows),
        "moved": len(moved),
        "kept_fraction": float(1 - len(moved) / len(new_rows)) if len(new_rows) else None,
        "from_sizes": from_sizes.tolist(),
        "to_sizes": to_sizes.tolist(),
        "emptied_clusters": [
            int(c)
            for c in range(len(from_sizes))
            if from_sizes[c] > 0 and (c >= len(to_sizes) or to_sizes[c] == 0)
        ],
        "centroid_shift": stability.get("centroid_shift") if is_parent else None,
        "transitions": [
            {"from_cluster": int(p // width), "to_cluster": int(p % width), "count": int(c)}
            for p, c in zip(pairs, counts, strict=True)
        ],
        "moved_items": [
            {
                "item_id": new.ids[new_rows[i]],
                "from_cluster": int(before[i]),
                "to_cluster": int(after[i]),
                "probability": float(new.probability[new_rows[i]]),
            }
            for i in shown
        ],
    }
