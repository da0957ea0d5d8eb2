"""The work of one job: train or update a clusterer on a dataset snapshot and
store the result as a new immutable model version.

Everything here runs in a worker thread with a sync database engine; the
algorithms are called, never changed. A version's files are the estimator's
own save (``config.json`` + ``weights.safetensors``) and ``assignments.safetensors``:
for each item of the snapshot its id, cluster and probability.
"""

from __future__ import annotations

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

ASSIGNMENTS_FILE = "assignments.safetensors"
#: rows per predict_proba call when assigning a snapshot (bounds memory at n x k)
_ASSIGN_ROWS = 65536
#: item ids listed per cluster in the summary
EXEMPLARS = 8
#: rows of the seeded sample the silhouette is computed on: its cost grows with the
#: square (10,000 rows took 13 s of a job on 200k items here; 3,000 take ~1 s)
SILHOUETTE_SAMPLE = 3000


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
    X: np.ndarray, cluster: np.ndarray, ids: list[str], n_clusters: int
) -> list[dict[str, Any]]:
    """Size and exemplar ids (closest to the cluster's mean vector) of every cluster id.

    Two chunked passes over X (cluster sums by a sparse indicator product, then
    each row's distance to its cluster's mean) and one sort: no per-cluster copy
    of the data.
    """
    from scipy.sparse import csr_matrix

    n, d = X.shape
    cluster = cluster.astype(np.int64)
    sizes = np.bincount(cluster, minlength=n_clusters)
    sums = np.zeros((n_clusters, d), dtype=np.float64)
    for start in range(0, n, _ASSIGN_ROWS):
        c = cluster[start : start + _ASSIGN_ROWS]
        indicator = csr_matrix(
            (np.ones(len(c), np.float32), (c, np.arange(len(c)))), shape=(n_clusters, len(c))
        )
        sums += indicator @ np.asarray(X[start : start + _ASSIGN_ROWS], dtype=np.float32)
    means = (sums / np.maximum(sizes, 1)[:, None]).astype(np.float32)
    dist = np.empty(n, dtype=np.float32)
    for start in range(0, n, _ASSIGN_ROWS):
        rows = np.asarray(X[start : start + _ASSIGN_ROWS], dtype=np.float32)
        diff = rows - means[cluster[start : start + _ASSIGN_ROWS]]
        dist[start : start + len(rows)] = np.einsum("ij,ij->i", diff, diff)
    order = np.lexsort((dist, cluster))
    bounds = np.searchsorted(cluster[order], np.arange(n_clusters + 1))
    return [
        {
            "cluster": c,
            "size": int(sizes[c]),
            "exemplars": [
                ids[i] for i in order[bounds[c] : min(bounds[c + 1], bounds[c] + EXEMPLARS)]
            ],
        }
        for c in range(n_clusters)
    ]


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


def _store_version(
    ctx: JobContext,
    job_id: str,
    model_name: str,
    est: BaseClusterer,
    snap: Snapshot,
    assignments: Assignments,
    values: dict[str, Any],
) -> int:
    ctx.progress.stage("saving")
    with tempfile.TemporaryDirectory(dir=ctx.cache.root) as tmp:
        files = Path(tmp)
        est.save(files)
        assignments.save(files / ASSIGNMENTS_FILE)
        return through_outage(
            models_db.create_version,
            ctx.engine,
            model_name=model_name,
            job_id=job_id,
            files=files,
            values={
                "algorithm": est.name,
                "params": est.get_params(),
                "n_clusters": est.n_clusters_,
                "dim": est.n_features_in_,
                "dataset_id": snap.dataset_id,
                "dataset_revision": snap.revision,
                "item_count": len(snap.ids),
                "k_selection": getattr(est, "k_selection_", None),
                **values,
            },
        )


def _snapshot(ctx: JobContext, dataset_id: str) -> Snapshot:
    ctx.progress.stage("loading")
    snap = load_snapshot(ctx.engine, dataset_id, ctx.cache, cache_in_background=True)
    if len(snap.ids) == 0:
        raise ClusteringInputError(f"dataset {dataset_id!r} is empty: add items first")
    return snap


def _attach(est: BaseClusterer, ctx: JobContext) -> None:
    est.device = ctx.device
    est.progress_callback = ctx.progress
    est.cancel_check = ctx.cancel_check


def train(ctx: JobContext, job_id: str, spec: dict[str, Any]) -> int:
    """Fit ``spec["algorithm"]`` on the dataset; returns the new version number."""
    snap = _snapshot(ctx, spec["dataset_id"])
    est = create(
        spec["algorithm"],
        n_clusters=spec.get("n_clusters"),
        random_state=spec.get("seed", 0),
        **spec.get("params", {}),
    )
    _attach(est, ctx)
    started = time.perf_counter()
    est.fit(snap.X)
    fit_seconds = time.perf_counter() - started
    ctx.progress.stage("assigning")
    cluster, probability = assign(est, snap.X)
    k = est.n_clusters_
    return _store_version(
        ctx,
        job_id,
        spec["model_name"],
        est,
        snap,
        Assignments(snap.ids, cluster, probability),
        {
            "parent_version": None,
            "next_cluster_id": k,
            "metrics": quality(snap, cluster, k, est.random_state),
            "stability": None,
            "clusters": summarize_clusters(snap.X, cluster, snap.ids, k),
            "fit_seconds": fit_seconds,
        },
    )


def update(ctx: JobContext, job_id: str, spec: dict[str, Any]) -> int:
    """Update the parent version on its dataset's current items; returns the new version."""
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
    started = time.perf_counter()
    est.update(
        snap.X,
        max_epochs=params.pop("max_epochs", None),
        max_centroid_shift=params.pop("max_centroid_shift", None),
        **params,
    )
    fit_seconds = time.perf_counter() - started
    ctx.progress.stage("assigning")
    cluster, probability = assign(est, snap.X)
    k = est.n_clusters_
    return _store_version(
        ctx,
        job_id,
        parent.model_name,
        est,
        snap,
        Assignments(snap.ids, cluster, probability),
        {
            "parent_version": parent.version,
            "next_cluster_id": max(parent.next_cluster_id, k),
            "metrics": quality(snap, cluster, k, est.random_state),
            "stability": stability(old, snap.ids, cluster, k, getattr(est, "update_info_", {})),
            "clusters": summarize_clusters(snap.X, cluster, snap.ids, k),
            "fit_seconds": fit_seconds,
        },
    )


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
