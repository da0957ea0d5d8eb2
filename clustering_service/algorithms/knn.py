"""Nearest neighbours of unit vectors (cosine), shared by the deep clusterers, and
what they build on them: neighbour smoothing, and the (optionally whitened)
principal components the searches and k-means runs use.

Exact (one matmul per block of rows) up to :data:`EXACT_MAX_ROWS` rows; beyond,
an approximate search whose cost is linear in n (see :func:`nearest_neighbors`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from sklearn.decomposition import PCA

from clustering_service.algorithms.exceptions import ClusteringInputError
from clustering_service.algorithms.kmeans import assign_nearest
from clustering_service.algorithms.nn import INFERENCE_BATCH

#: exact neighbour search up to this many rows; beyond, cell-restricted
EXACT_MAX_ROWS = 50_000
#: rows per cell and cells probed in the approximate neighbour search
CELL_ROWS = 1024
PROBES = 4
#: in whitening, variances below this fraction of the largest are floored (here and
#: in DeepCluster's)
EIGEN_FLOOR = 1e-3


def nearest_neighbors(
    feats: np.ndarray,
    n_neighbors: int,
    seed: int,
    groups: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """``n_neighbors`` nearest neighbours of every row (cosine; rows are unit vectors),
    excluding the row itself and its exact copies: int64 (n, n_neighbors).

    Copies of a row (the same image uploaded twice) would otherwise fill its
    neighbour list, and a positive pair of two identical inputs teaches nothing:
    neighbours are searched among the distinct rows (the first row of each group
    of copies stands for it), so every neighbour is a different vector. With
    fewer distinct rows than ``n_neighbors + 1``, the list is padded with the row
    itself. ``groups``: :func:`distinct_rows` of ``feats`` if the caller has it.

    Exact up to :data:`EXACT_MAX_ROWS` rows. Beyond, approximate and linear
    in n: the rows are split into cells of about :data:`CELL_ROWS` rows by a coarse
    k-means, and each cell's rows are compared (one matmul) with the rows of the
    :data:`PROBES` cells whose centres are nearest to it. Neighbours serve as
    training positives, for which near-exact is plenty.
    """
    n = feats.shape[0]
    kk = min(n_neighbors, n - 1)
    first, inverse = distinct_rows(feats) if groups is None else groups
    if len(first) < n:
        every = np.arange(len(first))  # the rows of feats[first] are distinct
        found = nearest_neighbors(feats[first], n_neighbors, seed, groups=(every, every))
        out = first[found][inverse]
        if out.shape[1] < kk:  # too few distinct rows: pad with the row itself
            own = np.arange(n)[:, None].repeat(kk - out.shape[1], axis=1)
            out = np.concatenate([out, own], axis=1)
        return out
    if n <= EXACT_MAX_ROWS:
        base = torch.from_numpy(np.ascontiguousarray(feats))
        return knn_among(base, 0, base, 0, kk)
    import faiss

    n_cells = max(2, n // CELL_ROWS)
    rng = np.random.default_rng(seed)
    train = feats[np.sort(rng.choice(n, size=min(n, 64 * n_cells), replace=False))]
    coarse = faiss.Kmeans(feats.shape[1], n_cells, niter=10, seed=seed, spherical=True)
    coarse.train(np.ascontiguousarray(train))
    cell = assign_nearest(feats, coarse.centroids)[0]
    centres = torch.from_numpy(coarse.centroids)
    probes = (centres @ centres.T).topk(min(PROBES, n_cells), dim=1).indices.tolist()
    # rows sorted by cell: every cell is a contiguous block, no gathers per cell
    order = np.argsort(cell, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(cell, minlength=n_cells))])
    by_cell = torch.from_numpy(np.ascontiguousarray(feats[order]))
    local = np.empty((n, kk), dtype=np.int64)
    for c in range(n_cells):
        lo, hi = bounds[c], bounds[c + 1]
        if lo == hi:
            continue
        # candidate blocks: the own cell first, then the nearest others
        blocks = [c, *[p for p in probes[c] if p != c][: PROBES - 1]]
        cand_pos = np.concatenate([np.arange(bounds[b], bounds[b + 1]) for b in blocks])
        cands = torch.cat([by_cell[bounds[b] : bounds[b + 1]] for b in blocks])
        found = knn_among(by_cell[lo:hi], 0, cands, 0, kk)  # positions in cand_pos
        local[lo:hi] = cand_pos[found]
    out = np.empty((n, kk), dtype=np.int64)
    out[order] = order[local]
    return out


def distinct_rows(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Groups of identical rows: ``(first, inverse)``, ``first`` the index of the first
    row of each group (ascending), ``inverse`` (n,) the group of every row, so that
    ``feats[first][inverse]`` equals ``feats``. A hash of each row's bytes answers
    the common case (no copies) in one pass; only then are the rows sorted."""
    n = feats.shape[0]
    rows = np.ascontiguousarray(feats)
    if len({hash(row.tobytes()) for row in rows}) == n:
        return np.arange(n), np.arange(n)
    keys = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # groups numbered by first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return first[order], rank[inverse.ravel()]


def knn_among(
    queries: torch.Tensor, q_offset: int, cands: torch.Tensor, c_offset: int, kk: int
) -> np.ndarray:
    """Row ``i`` of ``queries`` is candidate row ``i + q_offset - c_offset`` (its own
    hit, excluded). Returns, per query, the candidate row indices of its ``kk`` most
    similar other candidates (padded with itself if there are too few)."""
    n_q, n_c = queries.shape[0], cands.shape[0]
    own = torch.arange(n_q) + (q_offset - c_offset)
    top = min(kk + 1, n_c)
    out = np.empty((n_q, kk), dtype=np.int64)
    for start in range(0, n_q, 4096):
        rows = own[start : start + 4096]
        idx = (queries[start : start + 4096] @ cands.T).topk(top, dim=1).indices
        # drop the own hit (ties with duplicates: whichever copy is own), keep kk
        not_self = idx != rows[:, None]
        keep = torch.argsort((~not_self).to(torch.int8), dim=1, stable=True)[:, :kk]
        found = torch.gather(idx, 1, keep)
        if found.shape[1] < kk:
            found = torch.cat([found, rows[:, None].expand(-1, kk - found.shape[1])], dim=1)
        out[start : start + len(rows)] = found.numpy()
    return out


def smooth(Z: np.ndarray, neighbors: np.ndarray, steps: int) -> np.ndarray:
    """``steps`` rounds of ``z <- normalise((z + mean of its neighbours' z) / 2)``.

    Z: (n, d) unit rows; neighbors: int (n, m) row indices. Returns float (n, d),
    Z itself when ``steps`` is 0. Each row moves toward the consensus of its
    neighbourhood, so k-means on the result follows the neighbour graph more
    than the noise of single rows (used for neighbors' and ODC's initial
    partitions and DeepCluster's pseudo-labels)."""
    out = Z
    for _ in range(steps):
        nxt = np.empty_like(out)
        for start in range(0, out.shape[0], INFERENCE_BATCH):
            rows = slice(start, start + INFERENCE_BATCH)
            avg = 0.5 * (out[rows] + out[neighbors[rows]].mean(axis=1))
            nxt[rows] = avg / np.maximum(np.linalg.norm(avg, axis=1, keepdims=True), 1e-12)
        out = nxt
    return out


def capped_neighbors(feats: np.ndarray, wanted: int, n_clusters: int, seed: int) -> np.ndarray:
    """:func:`nearest_neighbors` of the unit rows ``feats`` (n, d), int64 (n, m), with
    ``m`` = ``wanted`` capped at half the average cluster size, ``n_distinct / (2
    n_clusters)`` (at least 1): an item's neighbours must mostly share its cluster,
    or averaging over them (and the SCAN loss) merges clusters (with 20 neighbours
    and 10 items per cluster, every ``neighbors`` head left clusters empty)."""
    groups = distinct_rows(feats)
    m = min(int(wanted), max(1, len(groups[0]) // (2 * n_clusters)))
    return nearest_neighbors(feats, m, seed, groups=groups)


def check_whiten_power(value: object) -> None:
    """Raise ClusteringInputError unless ``value`` is a whitening power: a number in
    [-1, 0] (0: none, -0.25: half, -0.5: full whitening; see
    :func:`principal_components`)."""
    number = isinstance(value, int | float | np.floating) and not isinstance(value, bool)
    if not (number and -1.0 <= value <= 0.0):
        raise ClusteringInputError(f"whiten_power must be a number in [-1, 0], got {value!r}")


def principal_components(
    Z: np.ndarray,
    dims: int,
    max_rows: int = 65536,
    prepare: Callable[[np.ndarray], np.ndarray] | None = None,
    power: float = 0.0,
) -> np.ndarray:
    """The rows of Z (n, d), mapped by ``prepare`` (a function of a block of rows;
    none: the rows as they are), on their top ``dims`` principal axes: float32 (n,
    dims); when ``d <= dims``, the prepared rows (Z itself without ``prepare``).
    The axes are fitted on at most ``max_rows`` rows (a seeded sample), and Z is
    prepared and projected ``max_rows`` rows at a time, so a memmapped Z is never
    copied whole. Fewer rows than ``dims`` give as many axes as rows. k-means
    only sees distances, and the leading axes hold the between-cluster spread: at
    ``dims`` = 128 it costs a quarter of k-means on the 512-d input-and-learned
    space of ``neighbors`` at about the same result
    (docs/benchmarks/neighbors.md, eighth round).

    ``power`` (<= 0) whitens: each axis is scaled by its variance to that power
    (-0.5: unit variance on every axis, -0.25: half whitening), variances floored
    at :data:`EIGEN_FLOOR` times the largest so that empty axes stay near zero.
    The rows are then rotated onto their axes even when ``d <= dims``."""
    n = Z.shape[0]
    prep = prepare or (lambda rows: rows)
    dims = min(dims, n)  # n rows span at most n axes
    if power:
        dims = min(dims, Z.shape[1])
    elif Z.shape[1] <= dims:
        if prepare is None:
            return Z
        out = np.empty(Z.shape, dtype=np.float32)
        for start in range(0, n, max_rows):
            out[start : start + max_rows] = prep(Z[start : start + max_rows])
        return out
    sample = Z
    if n > max_rows:
        sample = Z[np.sort(np.random.default_rng(0).choice(n, max_rows, replace=False))]
    pca = PCA(n_components=dims, svd_solver="covariance_eigh").fit(prep(sample))
    scale = None
    top = float(pca.explained_variance_.max())
    if power and top > 0:  # (all rows equal: nothing to whiten)
        scale = (np.maximum(pca.explained_variance_, EIGEN_FLOOR * top) ** power).astype(np.float32)
    out = np.empty((n, dims), dtype=np.float32)
    for start in range(0, n, max_rows):
        block = pca.transform(prep(Z[start : start + max_rows]))
        out[start : start + max_rows] = block if scale is None else block * scale
    return out


def smoothed_input(
    X: np.ndarray,
    mean: np.ndarray,
    n_neighbors: int,
    n_clusters: int,
    steps: int,
    seed: int,
    dims: int = 128,
    power: float = 0.0,
) -> np.ndarray:
    """The rows of X (n, d) centred on ``mean`` (d,) and L2-normalised, on their top
    ``dims`` principal components (whitened by ``power``, see
    :func:`principal_components`; renormalised), then :func:`smooth`-ed ``steps``
    times over their :func:`capped_neighbors` in that space: float32 (n, min(d,
    dims, n)) unit rows, each the consensus of its neighbourhood. The space the
    initial k-means of ODC partitions. X is read in blocks, never copied
    whole; the peak is three (n, dims) arrays."""
    mean = np.asarray(mean, dtype=np.float32)

    def unit(rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.float32) - mean
        return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)

    Z = principal_components(X, dims, prepare=unit, power=power)
    Z /= np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)
    neighbors = capped_neighbors(Z, n_neighbors, n_clusters, seed)
    return smooth(Z, neighbors, steps)
