"""Nearest neighbours of unit vectors (cosine), shared by the deep clusterers.

Exact (one matmul per block of rows) up to :data:`EXACT_MAX_ROWS` rows; beyond,
an approximate search whose cost is linear in n (see :func:`nearest_neighbors`).
"""

from __future__ import annotations

import numpy as np
import torch

from clustering_service.algorithms.kmeans import assign_nearest

#: exact neighbour search up to this many rows; beyond, cell-restricted
EXACT_MAX_ROWS = 50_000
#: rows per cell and cells probed in the approximate neighbour search
CELL_ROWS = 1024
PROBES = 4


def nearest_neighbors(feats: np.ndarray, n_neighbors: int, seed: int) -> np.ndarray:
    """``n_neighbors`` nearest neighbours of every row (cosine; rows are unit vectors),
    excluding the row itself: int64 (n, n_neighbors).

    Exact up to :data:`EXACT_MAX_ROWS` rows. Beyond, approximate and linear
    in n: the rows are split into cells of about :data:`CELL_ROWS` rows by a coarse
    k-means, and each cell's rows are compared (one matmul) with the rows of the
    :data:`PROBES` cells whose centres are nearest to it. Neighbours serve as
    training positives, for which near-exact is plenty.
    """
    n = feats.shape[0]
    kk = min(n_neighbors, n - 1)
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
