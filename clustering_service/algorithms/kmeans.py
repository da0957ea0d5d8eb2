"""k-means: the baseline every deep method is judged against, and the
clustering primitive the deep methods call.

* :func:`run_kmeans` -- k-means++ seeding, ``n_init`` restarts, best by inertia.
  Seeding is always this module's float32 :func:`kmeans_plusplus`. Small
  inputs (at most :data:`SKLEARN_MAX_ROWS` rows) then run scikit-learn's
  Lloyd (exact, single-threaded). Large ones, and spherical k-means, use
  this module's chunked :func:`lloyd` on a seeded subsample of
  ``max(256 * k, MIN_TRAIN_ROWS)`` rows (faiss subsamples the same way, at
  256 points per centroid), followed by one exact assignment of every row.
  faiss-cpu was the first choice (the tool DeepCluster used) and was dropped
  on measurement: on this project's CPU its flat search assigned 65536 x 384
  rows to 100 centres in 1.3 s against 0.5 s for :func:`assign_nearest` (one
  thread each), and the scikit-learn k-means++ took 19 s on 20000 x 384,
  k = 100 (it up-casts to float64 in small chunks). The result never has an
  empty cluster: an empty id takes the far half of the largest cluster
  (:func:`fill_empty_clusters`).
* :func:`assign_nearest` -- nearest centre per row in chunks (BLAS matmul,
  memory ``O(batch_size * k)``), so memory-mapped inputs of millions of rows
  are read once and never copied.
* :class:`KMeansClusterer` -- the ``"kmeans"`` estimator.

Soft assignment (``predict_proba``): ``softmax_j(-|x - c_j|^2 / T)`` with the
temperature ``T`` fixed at fit time to the mean squared distance of a training
point to its own centre (the within-cluster variance), so the sharpness does
not depend on the scale of the data: a point one "typical cluster radius"
farther from centre ``a`` than from centre ``b`` gets odds ``e`` to 1. ``T`` is
measured on the rows Lloyd ran on, so it is known before the final assignment
of every row, and that one pass also gives each row its probability
(``labels_proba_``: a job stores it without another pass over the data).

Incremental update (:meth:`KMeansClusterer.update`): Lloyd iterations
warm-started from the current centres -- ids are kept by construction -- for
at most ``max_epochs`` passes (default ``update_max_iter``), stopping early
when fewer than ``tol`` of the labels change. After every pass each centre is
projected back into the ball of radius ``max_centroid_shift`` around its
position before the update, so the bound holds on the total movement. A
centre that receives no points stays where it was (its id is not reused or
re-seeded: the caller sees an empty cluster in ``update_info_``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from clustering_service.algorithms.base import BaseClusterer, ProgressCallback
from clustering_service.algorithms.exceptions import ClusteringInputError

#: inputs with more rows than this (and spherical k-means) use the large-N path
SKLEARN_MAX_ROWS = 20000
#: the large-N path trains on at least this many rows (when N allows), and on
#: at least 256 per centroid
MIN_TRAIN_ROWS = 65536
_POINTS_PER_CENTROID = 256
#: rows per chunk in :func:`assign_nearest`
ASSIGN_BATCH = 65536

#: below this many multiply-adds (n * k * d) assignment runs on one BLAS thread:
#: thread wake-up costs more than it saves, and on a busy machine spin-waiting
#: threads made a 2500 x 64 x 10 assignment 7x slower (28 ms vs 4 ms)
_SMALL_WORK = 1 << 26

#: up to this many features, per-cluster sums use one bincount per column
_BINCOUNT_MAX_DIM = 32

RestartCallback = Callable[[int, int, float], None]


@functools.cache
def _threadpools() -> Any:
    # Built once: threadpoolctl scans the loaded libraries on construction
    # (several ms), too slow to repeat for every assignment.
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _blas_limit(n_threads: int) -> Any:
    return _threadpools().limit(limits=n_threads, user_api="blas")


def assign_nearest(
    X: np.ndarray, centers: np.ndarray, batch_size: int = ASSIGN_BATCH
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centre (Euclidean) of every row of ``X``.

    X : ndarray (n, d), any float dtype, may be a memmap; read chunk by chunk.
    centers : ndarray (k, d).
    Returns ``(labels int64 (n,), squared distances float32 (n,))``. Memory is
    ``O(batch_size * k)``; ties go to the lowest centre index.
    """
    centers = np.ascontiguousarray(centers, dtype=np.float32)
    n = X.shape[0]
    if n * centers.size < _SMALL_WORK:
        with _blas_limit(1):
            return _assign(X, centers, batch_size)
    return _assign(X, centers, batch_size)


def assign_soft(
    X: np.ndarray, centers: np.ndarray, temperature: float, batch_size: int = ASSIGN_BATCH
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`assign_nearest` that also returns each row's largest soft assignment.

    Returns ``(labels int64 (n,), squared distances float32 (n,), max_proba
    float32 (n,))`` where ``max_proba = max_j softmax_j(-|x - c_j|^2 / temperature)``,
    the probability :meth:`KMeansClusterer.predict_proba` gives the row's own
    cluster, computed in the same pass over X.
    """
    centers = np.ascontiguousarray(centers, dtype=np.float32)
    return _assign(X, centers, batch_size, temperature)  # type: ignore[return-value]


def _assign(
    X: np.ndarray, centers: np.ndarray, batch_size: int, temperature: float | None = None
) -> tuple[np.ndarray, ...]:
    n = X.shape[0]
    labels = np.empty(n, dtype=np.int64)
    dist2 = np.empty(n, dtype=np.float32)
    max_proba = np.empty(n, dtype=np.float32) if temperature is not None else None
    c_sq = np.einsum("kd,kd->k", centers, centers)
    c_t = np.ascontiguousarray(centers.T)
    for start in range(0, n, batch_size):
        chunk = np.asarray(X[start : start + batch_size], dtype=np.float32)
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 does not change the argmin
        scores = chunk @ c_t
        scores *= -2.0
        scores += c_sq
        idx = scores.argmin(axis=1)
        best = np.take_along_axis(scores, idx[:, None], axis=1)[:, 0]
        if max_proba is not None:
            # softmax of -scores / T at its argmax: 1 / sum_j exp(-(s_j - s_best) / T)
            scores -= best[:, None]
            scores *= np.float32(-1.0 / temperature)
            np.exp(scores, out=scores)
            max_proba[start : start + len(chunk)] = 1.0 / scores.sum(axis=1)
        best += np.einsum("nd,nd->n", chunk, chunk)
        np.maximum(best, 0.0, out=best)
        labels[start : start + len(chunk)] = idx
        dist2[start : start + len(chunk)] = best
    if max_proba is None:
        return labels, dist2
    return labels, dist2, max_proba


def fill_empty_clusters(
    X: np.ndarray, centers: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Give every empty cluster id the far half of the currently largest cluster.

    The largest cluster is cut by the hyperplane through its centre orthogonal
    to the direction of its farthest member; the far side becomes the empty
    id and both centres are recomputed as means. Deterministic. Returns new
    ``(centers, labels)`` (copies).
    """
    centers = np.array(centers, dtype=np.float32)
    labels = np.array(labels, dtype=np.int64)
    k = centers.shape[0]
    counts = np.bincount(labels, minlength=k)
    for j in np.flatnonzero(counts == 0):
        big = int(counts.argmax())
        if counts[big] < 2:
            break
        members = np.flatnonzero(labels == big)
        pts = np.asarray(X[members], dtype=np.float32)
        direction = pts[np.argmax(((pts - centers[big]) ** 2).sum(axis=1))] - centers[big]
        far = (pts - centers[big]) @ direction > 0
        if far.all() or not far.any():  # degenerate (duplicate points): split by order
            far = np.arange(len(members)) >= len(members) // 2
        labels[members[far]] = j
        centers[j] = pts[far].mean(axis=0)
        centers[big] = pts[~far].mean(axis=0)
        counts[j], counts[big] = far.sum(), (~far).sum()
    return centers, labels


def _kmeans_sklearn(
    X: np.ndarray,
    k: int,
    seeds: list[int],
    max_iter: int,
    init: np.ndarray | None,
    callback: RestartCallback | None,
) -> tuple[np.ndarray, float]:
    """Best of the restarts by inertia: ``(centers (k, d), mean squared distance of a
    row to its centre)``."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    best, best_inertia = None, np.inf
    data = np.asarray(X, dtype=np.float32)
    for i, seed in enumerate(seeds):
        # Single-threaded on purpose: on inputs this small OpenMP start-up and
        # spin-waiting dominate, and on a busy machine they made a 3000-row fit
        # 100x slower than one thread (1.0 s vs 0.01 s).
        with threadpool_limits(limits=1):
            start = kmeans_plusplus(data, k, np.random.default_rng(seed)) if init is None else init
            km = KMeans(
                n_clusters=k,
                init=start,
                n_init=1,
                max_iter=max_iter,
                random_state=seed,
            ).fit(data)
        if km.inertia_ < best_inertia:
            best, best_inertia = km.cluster_centers_, km.inertia_
        if callback is not None:
            callback(i + 1, len(seeds), float(km.inertia_))
    return np.asarray(best, dtype=np.float32), float(best_inertia) / data.shape[0]


def kmeans_plusplus(X: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007, with
    ``2 + ln k`` candidate draws per centre as in scikit-learn), float32 BLAS.

    scikit-learn's ``kmeans_plusplus`` up-casts float32 to float64 in small
    chunks; on 20000 x 384 with k = 100 it took 19 s where this takes about 1 s.
    Returns centres float32 (k, d).
    """
    n = X.shape[0]
    n_trials = 2 + int(np.log(k))
    if n * X.shape[1] * n_trials < _SMALL_WORK:
        with _blas_limit(1):
            return _kmeans_plusplus(X, k, rng, n_trials)
    return _kmeans_plusplus(X, k, rng, n_trials)


def _kmeans_plusplus(X: np.ndarray, k: int, rng: np.random.Generator, n_trials: int) -> np.ndarray:
    n = X.shape[0]
    x_sq = np.einsum("nd,nd->n", X, X)

    def dist2(rows: np.ndarray) -> np.ndarray:  # (n, len(rows)) squared distances
        d2 = x_sq[:, None] - 2.0 * (X @ X[rows].T) + x_sq[rows][None, :]
        return np.maximum(d2, 0.0, out=d2)

    chosen = [int(rng.integers(n))]
    closest = dist2(np.array(chosen))[:, 0].astype(np.float64)
    for _ in range(1, k):
        cum = np.cumsum(closest)
        if cum[-1] <= 0:  # fewer distinct points than k: any row will do
            candidates = rng.integers(n, size=n_trials)
        else:
            candidates = np.searchsorted(cum, rng.random(n_trials) * cum[-1], side="right")
            candidates = np.minimum(candidates, n - 1)
        trial = np.minimum(closest[:, None], dist2(candidates))
        best = int(trial.sum(axis=0).argmin())
        chosen.append(int(candidates[best]))
        closest = trial[:, best]
    return np.array(X[np.array(chosen)], dtype=np.float32)


def _normalize_rows(C: np.ndarray) -> np.ndarray:
    return (C / np.maximum(np.linalg.norm(C, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def lloyd(
    X: np.ndarray, centers: np.ndarray, max_iter: int, spherical: bool = False, tol: float = 1e-4
) -> tuple[np.ndarray, np.ndarray, float]:
    """Lloyd iterations from ``centers`` until fewer than ``tol`` of the labels
    change (or ``max_iter``); chunked over X. A centre that loses all its
    points stays where it was. Returns ``(centers, labels, inertia)``, labels
    and inertia for the returned centres."""
    labels, d2 = assign_nearest(X, centers)
    for _ in range(max_iter):
        centers = _mean_step(X, labels, centers, spherical)
        new_labels, d2 = assign_nearest(X, centers)
        changed = float(np.mean(new_labels != labels))
        labels = new_labels
        if changed < tol:
            break
    return centers, labels, float(d2.sum(dtype=np.float64))


def _mean_step(
    X: np.ndarray, labels: np.ndarray, centers: np.ndarray, spherical: bool
) -> np.ndarray:
    """One Lloyd mean update: each centre moves to the mean of its rows (unit
    length when ``spherical``); a centre without rows stays where it was."""
    sums, counts = center_sums(X, labels, centers.shape[0])
    means = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centers)
    return _normalize_rows(means) if spherical else means.astype(np.float32)


def _kmeans_large(
    X: np.ndarray,
    k: int,
    seeds: list[int],
    max_iter: int,
    init: np.ndarray | None,
    spherical: bool,
    random_state: int,
    callback: RestartCallback | None,
) -> tuple[np.ndarray, float]:
    """Best restart on the training rows: ``(centers (k, d), mean squared distance of a
    training row to its centre)``."""
    n = X.shape[0]
    n_train = min(n, max(_POINTS_PER_CENTROID * k, MIN_TRAIN_ROWS))
    if n_train < n:
        rng = np.random.default_rng(random_state)
        rows = np.sort(rng.choice(n, size=n_train, replace=False))
        train = np.ascontiguousarray(np.take(X, rows, axis=0), dtype=np.float32)
    else:
        train = np.ascontiguousarray(X, dtype=np.float32)
    best, best_inertia = None, np.inf
    for i, seed in enumerate(seeds):
        start = kmeans_plusplus(train, k, np.random.default_rng(seed)) if init is None else init
        if spherical:
            start = _normalize_rows(start)
        centers, _, inertia = lloyd(train, start, max_iter, spherical)
        if inertia < best_inertia or best is None:
            best, best_inertia = centers, inertia
        if callback is not None:
            callback(i + 1, len(seeds), inertia)
    return best, float(best_inertia) / n_train


@dataclass
class KMeansResult:
    """What :func:`fit_kmeans` found.

    ``centers`` float32 (k, d); ``labels`` int64 (n,) and ``inertia`` (sum of
    squared distances of all rows to their centre); ``temperature`` the mean
    squared distance of a row Lloyd trained on to its centre; ``max_proba``
    float32 (n,) with ``soft=True``: each row's ``softmax(-|x - c|^2 /
    temperature)`` at its own centre (None otherwise, and when an empty cluster
    had to be filled, which moves centres after that pass).
    """

    centers: np.ndarray
    labels: np.ndarray
    inertia: float
    temperature: float
    max_proba: np.ndarray | None = None


def run_kmeans(
    X: np.ndarray,
    n_clusters: int,
    *,
    n_init: int = 10,
    max_iter: int = 100,
    random_state: int = 0,
    init: np.ndarray | None = None,
    spherical: bool = False,
    callback: RestartCallback | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """k-means on X (n, d); returns ``(centers float32 (k, d), labels int64 (n,), inertia)``.

    k-means++ seeding (or the given ``init`` (k, d), then a single run),
    best of ``n_init`` restarts by inertia, deterministic for a given
    ``random_state``. ``spherical`` re-normalises the centres to unit length
    after each iteration (for L2-normalised inputs). ``inertia`` is the sum of
    squared distances of all rows to their centre. No cluster of the result is
    empty. ``callback(restart, n_init, inertia)`` is called after each restart
    (it may raise to abort).
    """
    r = fit_kmeans(
        X,
        n_clusters,
        n_init=n_init,
        max_iter=max_iter,
        random_state=random_state,
        init=init,
        spherical=spherical,
        callback=callback,
    )
    return r.centers, r.labels, r.inertia


def fit_kmeans(
    X: np.ndarray,
    n_clusters: int,
    *,
    n_init: int = 10,
    max_iter: int = 100,
    random_state: int = 0,
    init: np.ndarray | None = None,
    spherical: bool = False,
    callback: RestartCallback | None = None,
    soft: bool = False,
) -> KMeansResult:
    """:func:`run_kmeans` with its temperature and, with ``soft``, each row's soft
    assignment to its own centre, from the final assignment pass (no extra pass
    over X)."""
    n = X.shape[0]
    k = int(n_clusters)
    if k < 1 or n < k:
        raise ClusteringInputError(f"k-means needs 1 <= n_clusters <= n_samples, got {k} and {n}")
    if init is not None:
        init = np.ascontiguousarray(init, dtype=np.float32)
        if init.shape != (k, X.shape[1]):
            raise ClusteringInputError(f"init must have shape {(k, X.shape[1])}, got {init.shape}")
        n_init = 1
    seeds = [int(s) for s in np.random.RandomState(random_state).randint(0, 2**31 - 1, n_init)]
    if n <= SKLEARN_MAX_ROWS and not spherical:
        centers, train_d2 = _kmeans_sklearn(X, k, seeds, max_iter, init, callback)
    else:
        centers, train_d2 = _kmeans_large(
            X, k, seeds, max_iter, init, spherical, random_state, callback
        )
    temperature = _temperature(train_d2)
    max_proba = None
    if soft:
        labels, dist2, max_proba = assign_soft(X, centers, temperature)
    else:
        labels, dist2 = assign_nearest(X, centers)
    if np.bincount(labels, minlength=k).min() == 0:
        centers, labels = fill_empty_clusters(X, centers, labels)
        dist2 = _dist2_to(X, centers, labels)
        max_proba = None
    return KMeansResult(centers, labels, float(dist2.sum(dtype=np.float64)), temperature, max_proba)


def _dist2_to(X: np.ndarray, centers: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Squared distance of each row to the centre given by ``labels`` (chunked)."""
    out = np.empty(X.shape[0], dtype=np.float32)
    for start in range(0, X.shape[0], ASSIGN_BATCH):
        chunk = np.asarray(X[start : start + ASSIGN_BATCH], dtype=np.float32)
        diff = chunk - centers[labels[start : start + len(chunk)]]
        out[start : start + len(chunk)] = np.einsum("nd,nd->n", diff, diff)
    return out


def center_sums(
    X: np.ndarray, labels: np.ndarray, k: int, batch_size: int = ASSIGN_BATCH
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums (k, d) float64 and counts (k,), chunked over X."""
    from scipy import sparse

    d = X.shape[1]
    sums = np.zeros((k, d), dtype=np.float64)
    for start in range(0, X.shape[0], batch_size):
        chunk = np.asarray(X[start : start + batch_size], dtype=np.float32)
        rows = labels[start : start + len(chunk)]
        if d <= _BINCOUNT_MAX_DIM:  # one bincount per column beats building a sparse matrix
            for j in range(d):
                sums[:, j] += np.bincount(rows, weights=chunk[:, j], minlength=k)
            continue
        onehot = sparse.csr_matrix(
            (np.ones(len(rows), dtype=np.float32), (rows, np.arange(len(rows)))),
            shape=(k, len(rows)),
        )
        sums += onehot @ chunk
    return sums, np.bincount(labels, minlength=k)


def clip_shift(centers: np.ndarray, reference: np.ndarray, max_shift: float | None) -> np.ndarray:
    """Project each row of ``centers`` into the ball of radius ``max_shift`` around
    the same row of ``reference`` (no-op when ``max_shift`` is None)."""
    if max_shift is None:
        return centers
    delta = centers - reference
    norm = np.linalg.norm(delta, axis=1, keepdims=True)
    scale = np.minimum(1.0, max_shift / np.maximum(norm, 1e-30))
    return (reference + delta * scale).astype(np.float32)


class KMeansClusterer(BaseClusterer):
    """k-means (k-means++ seeding, ``n_init`` restarts, seeded); see the module docstring.

    Parameters
    ----------
    n_clusters : number of clusters (None: chosen automatically at fit time).
    random_state : seed of the k-means++ seeding and restarts.
    device : accepted for interface compatibility; k-means runs on the CPU.
    n_init : restarts; the one with the lowest inertia is kept.
    max_iter : Lloyd iterations per restart.
    spherical : unit-length centres (cosine k-means, for L2-normalised data).
    update_max_iter : default ``max_epochs`` (Lloyd passes) of :meth:`update`.
    tol : :meth:`update` stops when fewer than this fraction of labels change.

    Attributes: ``cluster_centers_`` (k, d), ``labels_`` (n,), ``inertia_``,
    ``temperature_`` (of ``predict_proba``), ``update_info_`` after update.
    """

    name: ClassVar[str] = "kmeans"
    centers_in_input_space: ClassVar[bool] = True

    def __init__(
        self,
        n_clusters: int | None = 8,
        random_state: int = 0,
        device: str = "auto",
        progress_callback: ProgressCallback | None = None,
        cancel_check: Callable[[], bool] | None = None,
        n_init: int = 10,
        max_iter: int = 300,
        spherical: bool = False,
        update_max_iter: int = 10,
        tol: float = 1e-3,
    ) -> None:
        self.n_clusters = n_clusters
        self.random_state = random_state
        self.device = device
        self.progress_callback = progress_callback
        self.cancel_check = cancel_check
        self.n_init = n_init
        self.max_iter = max_iter
        self.spherical = spherical
        self.update_max_iter = update_max_iter
        self.tol = tol

    def _validate_params(self) -> None:
        super()._validate_params()
        for key in ("n_init", "max_iter", "update_max_iter"):
            value = getattr(self, key)
            if not isinstance(value, int | np.integer) or value < 1:
                raise ClusteringInputError(f"{key} must be an integer >= 1, got {value!r}")
        if not 0 <= self.tol < 1:
            raise ClusteringInputError(f"tol must be in [0, 1), got {self.tol!r}")

    # -- fit ---------------------------------------------------------------
    def _fit(self, X: np.ndarray) -> None:
        def on_restart(restart: int, n_init: int, inertia: float) -> None:
            self._report("kmeans", restart, n_init, loss=inertia / X.shape[0])

        self._report("kmeans", 0, self.n_init)
        result = fit_kmeans(
            X,
            self.n_clusters_,
            n_init=int(self.n_init),
            max_iter=int(self.max_iter),
            random_state=self.random_state,
            spherical=bool(self.spherical),
            callback=on_restart,
            soft=True,
        )
        self.cluster_centers_ = result.centers
        self.labels_ = result.labels
        self.labels_proba_ = result.max_proba
        self.inertia_ = result.inertia
        self.temperature_ = result.temperature

    # -- predict -----------------------------------------------------------
    def _predict(self, X: np.ndarray) -> np.ndarray:
        return assign_nearest(X, self.cluster_centers_)[0]

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        centers = self.cluster_centers_
        c_sq = np.einsum("kd,kd->k", centers, centers)
        out = np.empty((X.shape[0], centers.shape[0]), dtype=np.float32)
        for start in range(0, X.shape[0], ASSIGN_BATCH):
            chunk = np.asarray(X[start : start + ASSIGN_BATCH], dtype=np.float32)
            # -|x-c|^2 / T up to a per-row constant (|x|^2), which softmax ignores
            logits = (2.0 * (chunk @ centers.T) - c_sq) / self.temperature_
            logits -= logits.max(axis=1, keepdims=True)
            np.exp(logits, out=logits)
            logits /= logits.sum(axis=1, keepdims=True)
            out[start : start + len(chunk)] = logits
        return out

    # -- update ------------------------------------------------------------
    def _update(
        self,
        X: np.ndarray,
        *,
        max_epochs: int | None,
        max_centroid_shift: float | None,
        **params: Any,
    ) -> None:
        if params:
            raise ClusteringInputError(
                f"unknown update parameter(s) {sorted(params)} for kmeans; "
                "valid: max_epochs, max_centroid_shift"
            )
        epochs = self.update_max_iter if max_epochs is None else max_epochs
        k = self.n_clusters_
        parent = self.cluster_centers_.copy()
        centers = parent
        labels, dist2 = assign_nearest(X, centers)
        initial_labels = labels
        run = 0
        for epoch in range(1, epochs + 1):
            means = _mean_step(X, labels, centers, bool(self.spherical))
            centers = clip_shift(means, parent, max_centroid_shift)
            new_labels, dist2 = assign_nearest(X, centers)
            change = float(np.mean(new_labels != labels))
            labels = new_labels
            run = epoch
            self._report("update", epoch, epochs, loss=float(dist2.mean()), label_change=change)
            if change < self.tol:
                break
        shift = np.linalg.norm(centers - parent, axis=1)
        counts = np.bincount(labels, minlength=k)
        self.cluster_centers_ = centers
        self.labels_ = labels
        self.inertia_ = float(dist2.sum(dtype=np.float64))
        self.temperature_ = _temperature(self.inertia_ / X.shape[0])
        self.update_info_ = {
            "epochs": run,
            "centroid_shift_mean": float(shift.mean()),
            "centroid_shift_max": float(shift.max()),
            "centroid_shift": shift.tolist(),
            "label_change": float(np.mean(labels != initial_labels)),
            "cluster_sizes": counts.tolist(),
            "n_empty": int((counts == 0).sum()),
            "inertia": self.inertia_,
        }

    # -- persistence ---------------------------------------------------------
    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return (
            {"cluster_centers": self.cluster_centers_},
            {"temperature": self.temperature_, "inertia": self.inertia_},
        )

    def _set_state(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        centers = np.asarray(tensors["cluster_centers"], dtype=np.float32)
        if centers.shape != (self.n_clusters_, self.n_features_in_):
            raise ValueError(
                f"cluster_centers has shape {centers.shape}, expected "
                f"{(self.n_clusters_, self.n_features_in_)}"
            )
        temperature = float(meta["temperature"])
        if not np.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.cluster_centers_ = centers
        self.temperature_ = temperature
        self.inertia_ = float(meta.get("inertia", np.nan))


def _temperature(mean_d2: float) -> float:
    """The mean squared distance to the own centre, floored so duplicates-only data works."""
    return max(float(mean_d2), 1e-12)
