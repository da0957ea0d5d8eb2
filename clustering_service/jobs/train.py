"""The work of one job: train or update a clusterer on a dataset snapshot and
store the result as a new immutable model version.

Everything here runs in a worker thread with a sync database engine; the
algorithms are called, never changed. A version's files are the estimator's
own save (``config.json`` + ``weights.safetensors``) and ``assignments.safetensors``:
for each item of the snapshot its id, cluster and probability.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file
from sqlalchemy import Engine

from clustering_service.algorithms import BaseClusterer, ClusteringInputError, create, load
from clustering_service.algorithms.matching import stability_report
from clustering_service.algorithms.metrics import evaluate
from clustering_service.db import models as models_db
from clustering_service.db.retry import through_outage
from clustering_service.errors import DimensionMismatch
from clustering_service.jobs.progress import ProgressWriter
from clustering_service.store.artifacts import fetch_files
from clustering_service.store.cache import CacheDir
from clustering_service.store.vectors import Snapshot, load_snapshot

log = logging.getLogger(__name__)

ASSIGNMENTS_FILE = "assignments.safetensors"
#: rows per predict_proba call when assigning a snapshot (bounds memory at n x k)
_ASSIGN_ROWS = 65536
#: rows per chunk of the summaries' passes: small enough that the temporaries
#: stay in cache and out of fresh mmaps (1M x 384: 0.5 s a pass against 0.9 s at 64k)
_SUMMARY_ROWS = 8192
#: item ids listed per cluster in the summary
EXEMPLARS = 8
#: rows of the seeded sample the silhouette is computed on: its cost grows with the
#: square (10,000 rows took 13 s of a job on 200k items here; 3,000 take ~1 s)
SILHOUETTE_SAMPLE = 3000


def preload() -> None:
    """Import every algorithm (torch for the deep ones: 1.1 s) and what a job's
    scoring needs (scikit-learn's metrics: 1.5 s), so that no job pays for them."""
    import scipy.sparse  # noqa: F401
    import sklearn.metrics  # noqa: F401

    from clustering_service.algorithms.registry import ALGORITHMS, get_class

    for name in ALGORITHMS:
        get_class(name)


@dataclass
class JobContext:
    """What a job needs from its worker."""

    engine: Engine
    cache: CacheDir
    device: str
    progress: ProgressWriter
    cancel_check: Any


@dataclass
class Assignments:
    """Per item of a version: ``ids`` (n,), ``cluster`` int32 (n,), ``probability`` float32 (n,)."""

    ids: list[str]
    cluster: np.ndarray
    probability: np.ndarray

    def save(self, path: Path) -> None:
        encoded = [i.encode("utf-8") for i in self.ids]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        save_file(
            {
                "cluster": self.cluster.astype(np.int32),
                "probability": self.probability.astype(np.float32),
                "ids_utf8": blob if blob.size else np.zeros(0, np.uint8),
                "ids_offsets": offsets,
            },
            str(path),
        )

    @classmethod
    def read(cls, path: Path) -> Assignments:
        t = load_file(str(path))
        blob = t["ids_utf8"].tobytes()
        offsets = t["ids_offsets"]
        ids = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]
        return cls(ids, t["cluster"], t["probability"])


def assign(est: BaseClusterer, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(cluster int32 (n,), probability float32 (n,))``: argmax of predict_proba, so an
    item's stored assignment is what predict answers for its vector. Taken from the
    estimator's own last pass over X when it kept one (``labels_proba_``)."""
    n = X.shape[0]
    known = getattr(est, "labels_proba_", None)
    if known is not None and len(known) == n:
        return est.labels_.astype(np.int32), known.astype(np.float32, copy=False)
    cluster = np.empty(n, dtype=np.int32)
    probability = np.empty(n, dtype=np.float32)
    for start in range(0, n, _ASSIGN_ROWS):
        proba = est.predict_proba(X[start : start + _ASSIGN_ROWS])
        best = proba.argmax(axis=1)
        cluster[start : start + len(best)] = best
        probability[start : start + len(best)] = proba[np.arange(len(best)), best]
    return cluster, probability


def summarize_clusters(
    X: np.ndarray,
    cluster: np.ndarray,
    ids: list[str],
    n_clusters: int,
    centers: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Size and exemplar ids of every cluster id: its :data:`EXEMPLARS` items closest
    to its centre, ``centers`` (k, d) in the space of X when given (k-means' own),
    else the mean of its items.

    X (n, d) is read once in chunks for the distances (|x|^2 - 2 x.c + |c|^2), and
    once more for the means when no centres are given: no per-cluster copy of the
    data, no sort of all n rows. The few closest candidates of each cluster are
    then ranked by their exact distance, ties by item order.
    """
    from clustering_service.algorithms.kmeans import center_sums

    n = X.shape[0]
    cluster = cluster.astype(np.int64)
    if centers is None:
        sums, sizes = center_sums(X, cluster, n_clusters, _SUMMARY_ROWS)
        centers = (sums / np.maximum(sizes, 1)[:, None]).astype(np.float32)
    else:
        sizes = np.bincount(cluster, minlength=n_clusters)
        centers = np.asarray(centers, dtype=np.float32)
    c_sq = np.einsum("kd,kd->k", centers, centers)
    dist = np.empty(n, dtype=np.float32)
    for start in range(0, n, _SUMMARY_ROWS):
        rows = np.asarray(X[start : start + _SUMMARY_ROWS], dtype=np.float32)
        c = cluster[start : start + len(rows)]
        dist[start : start + len(rows)] = (
            np.einsum("ij,ij->i", rows, rows)
            - 2.0 * np.einsum("ij,ij->i", rows, centers[c])
            + c_sq[c]
        )
    members = np.argsort(cluster, kind="stable")
    bounds = np.searchsorted(cluster[members], np.arange(n_clusters + 1))
    summary = []
    for c in range(n_clusters):
        rows = members[bounds[c] : bounds[c + 1]]
        if len(rows) > 2 * EXEMPLARS:  # the cancellation in the identity is ~1e-6 relative
            rows = np.sort(rows[np.argpartition(dist[rows], 2 * EXEMPLARS)[: 2 * EXEMPLARS]])
        exact = ((np.asarray(X[rows], dtype=np.float64) - centers[c]) ** 2).sum(axis=1)
        best = rows[np.argsort(exact, kind="stable")[:EXEMPLARS]]
        summary.append({"cluster": c, "size": int(sizes[c]), "exemplars": [ids[i] for i in best]})
    return summary


def quality(snap: Snapshot, cluster: np.ndarray, n_clusters: int, seed: int) -> dict[str, Any]:
    """Silhouette and cluster sizes; ACC/NMI/ARI over the items that have a label."""
    metrics = evaluate(
        snap.X,
        cluster,
        random_state=seed,
        n_clusters=n_clusters,
        silhouette_sample=SILHOUETTE_SAMPLE,
    )
    if snap.labels is not None:
        known = np.array([label is not None for label in snap.labels])
        if known.any():
            _, y = np.unique(snap.labels[known].astype(str), return_inverse=True)
            scored = evaluate(None, cluster[known], y, n_clusters=n_clusters)
            metrics.update(acc=scored["acc"], nmi=scored["nmi"], ari=scored["ari"])
            metrics["labelled_items"] = int(known.sum())
    return metrics


class _Stages:
    """Seconds spent in each stage of a job, logged when it ends (where the time of
    a job beyond its fit goes)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._mark = time.perf_counter()

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._mark
        self._mark = now
        return self.seconds[name]

    def __str__(self) -> str:
        return ", ".join(f"{name} {s:.2f} s" for name, s in self.seconds.items())


def _snapshot(ctx: JobContext, dataset_id: str) -> Snapshot:
    ctx.progress.stage("loading")
    snap = load_snapshot(ctx.engine, dataset_id, ctx.cache, cache_in_background=True)
    if len(snap.ids) == 0:
        raise ClusteringInputError(f"dataset {dataset_id!r} is empty: add items first")
    return snap


def _centers(est: BaseClusterer) -> np.ndarray | None:
    """The estimator's centres when they lie in the input space (exemplars are then
    the items closest to them, found without computing the cluster means)."""
    return est.cluster_centers_ if est.centers_in_input_space else None


def _attach(est: BaseClusterer, ctx: JobContext) -> None:
    est.device = ctx.device
    est.progress_callback = ctx.progress
    est.cancel_check = ctx.cancel_check


def _store_result(
    ctx: JobContext,
    job_id: str,
    model_name: str,
    est: BaseClusterer,
    snap: Snapshot,
    stages: _Stages,
    values: dict[str, Any],
    old: Assignments | None = None,
) -> int:
    """Assign every item, score and summarise the clusters, and store the version
    (with the stability report against ``old``, the parent's assignments)."""
    ctx.progress.stage("assigning")
    cluster, probability = assign(est, snap.X)
    k = est.n_clusters_
    stages.lap("assign")
    values["metrics"] = quality(snap, cluster, k, est.random_state)
    stages.lap("metrics")
    values["clusters"] = summarize_clusters(snap.X, cluster, snap.ids, k, _centers(est))
    stages.lap("summaries")
    if old is not None:
        values["stability"] = stability(old, snap.ids, cluster, k, getattr(est, "update_info_", {}))
        stages.lap("stability")
    ctx.progress.stage("saving")
    with tempfile.TemporaryDirectory(dir=ctx.cache.root) as tmp:
        files = Path(tmp)
        est.save(files)
        Assignments(snap.ids, cluster, probability).save(files / ASSIGNMENTS_FILE)
        stages.lap("files")
        version = through_outage(
            models_db.create_version,
            ctx.engine,
            model_name=model_name,
            job_id=job_id,
            files=files,
            values={
                "algorithm": est.name,
                "params": est.get_params(),
                "n_clusters": k,
                "dim": est.n_features_in_,
                "dataset_id": snap.dataset_id,
                "dataset_revision": snap.revision,
                "item_count": len(snap.ids),
                "k_selection": getattr(est, "k_selection_", None),
                **values,
            },
        )
    stages.lap("store")
    log.info("job %s stored %s version %d: %s", job_id, model_name, version, stages)
    return version


def train(ctx: JobContext, job_id: str, spec: dict[str, Any]) -> int:
    """Fit ``spec["algorithm"]`` on the dataset; returns the new version number."""
    stages = _Stages()
    snap = _snapshot(ctx, spec["dataset_id"])
    est = create(
        spec["algorithm"],
        n_clusters=spec.get("n_clusters"),
        random_state=spec.get("seed", 0),
        **spec.get("params", {}),
    )
    _attach(est, ctx)
    stages.lap("load")
    est.fit(snap.X)
    values = {
        "parent_version": None,
        "next_cluster_id": est.n_clusters_,
        "stability": None,
        "fit_seconds": stages.lap("fit"),
    }
    return _store_result(ctx, job_id, spec["model_name"], est, snap, stages, values)


def update(ctx: JobContext, job_id: str, spec: dict[str, Any]) -> int:
    """Update the parent version on its dataset's current items; returns the new version."""
    stages = _Stages()
    parent = models_db.resolve(ctx.engine, spec["model_name"], spec.get("from_version"))
    dataset_id = spec.get("dataset_id") or parent.dataset_id
    ctx.progress.stage("loading")
    files = fetch_files(ctx.engine, parent.pk, ctx.cache)
    est = load(str(files), device="cpu")
    old = Assignments.read(files / ASSIGNMENTS_FILE)
    snap = _snapshot(ctx, dataset_id)
    if snap.X.shape[1] != parent.dim:
        raise DimensionMismatch(
            f"dataset {dataset_id!r} holds {snap.X.shape[1]}-d vectors but model "
            f"{parent.model_name!r} version {parent.version} was trained on {parent.dim}-d"
        )
    _attach(est, ctx)
    params = dict(spec.get("params", {}))
    stages.lap("load")
    est.update(
        snap.X,
        max_epochs=params.pop("max_epochs", None),
        max_centroid_shift=params.pop("max_centroid_shift", None),
        **params,
    )
    values = {
        "parent_version": parent.version,
        "next_cluster_id": max(parent.next_cluster_id, est.n_clusters_),
        "fit_seconds": stages.lap("fit"),
    }
    return _store_result(ctx, job_id, parent.model_name, est, snap, stages, values, old)


def stability(
    old: Assignments,
    new_ids: list[str],
    new_cluster: np.ndarray,
    n_clusters: int,
    update_info: dict[str, Any],
) -> dict[str, Any]:
    """The update's stability report on the items both versions share.

    ``kept_fraction`` (same cluster id before and after), ``ari``,
    ``centroid_shift`` per cluster (in the model's clustering space, from the
    estimator), ``emptied_clusters`` (ids that had items and have none now),
    item counts retained/added/removed, and the estimator's ``update_info``.
    """
    position = {item_id: i for i, item_id in enumerate(old.ids)}
    new_rows, old_rows = [], []
    for j, item_id in enumerate(new_ids):
        i = position.get(item_id)
        if i is not None:
            new_rows.append(j)
            old_rows.append(i)
    old_labels = old.cluster[np.asarray(old_rows, dtype=np.int64)].astype(np.int64)
    new_labels = new_cluster[np.asarray(new_rows, dtype=np.int64)].astype(np.int64)
    k = max(n_clusters, int(old.cluster.max(initial=-1)) + 1)
    old_sizes = np.bincount(old.cluster.astype(np.int64), minlength=k)
    new_sizes = np.bincount(new_cluster.astype(np.int64), minlength=k)
    report = stability_report(old_labels, new_labels, old_sizes=old_sizes, new_sizes=new_sizes)
    for key in ("centroid_shift", "centroid_shift_mean", "centroid_shift_max"):
        if key in update_info:
            report[key] = update_info[key]
    report["emptied_clusters"] = [
        int(c) for c in np.flatnonzero((old_sizes > 0) & (new_sizes == 0))
    ]
    report["items_retained"] = len(new_rows)
    report["items_added"] = len(new_ids) - len(new_rows)
    report["items_removed"] = len(old.ids) - len(new_rows)
    report["update_info"] = {
        k: v for k, v in update_info.items() if not isinstance(v, list) or len(v) <= 10_000
    }
    return report
