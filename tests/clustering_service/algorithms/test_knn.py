"""Nearest neighbours among distinct rows (shared by neighbors and DeepCluster)."""

from __future__ import annotations

import numpy as np

from clustering_service.algorithms.knn import distinct_rows, nearest_neighbors, smooth


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_distinct_rows_groups_copies_in_order_of_first_appearance():
    base = _unit(np.random.default_rng(0).normal(size=(4, 3)))
    X = base[[2, 0, 2, 1, 0, 3]]
    first, inverse = distinct_rows(X)
    np.testing.assert_array_equal(first, [0, 1, 3, 5])
    np.testing.assert_array_equal(inverse, [0, 1, 0, 2, 1, 3])
    np.testing.assert_array_equal(X[first][inverse], X)
    first, inverse = distinct_rows(base)  # no copies: the identity
    np.testing.assert_array_equal(first, np.arange(4))
    np.testing.assert_array_equal(inverse, np.arange(4))


def test_copies_are_never_neighbours():
    """20 copies of each of 30 vectors: without the grouping, a row's 5 neighbours
    would all be its own copies."""
    base = _unit(np.random.default_rng(1).normal(size=(30, 8)))
    X = np.repeat(base, 20, axis=0)
    nb = nearest_neighbors(X, 5, 0)
    assert nb.shape == (600, 5)
    assert not np.any(np.all(X[nb] == X[:, None, :], axis=2))
    # the neighbours are those of the distinct vectors, carried to every copy
    sims = base @ base.T
    np.fill_diagonal(sims, -np.inf)
    np.testing.assert_array_equal(X[nb[:, 0]], base[sims.argmax(axis=1)].repeat(20, axis=0))


def test_too_few_distinct_rows_pad_with_the_row_itself():
    base = _unit(np.random.default_rng(2).normal(size=(2, 4)))
    X = base[[0, 0, 0, 1, 1]]
    nb = nearest_neighbors(X, 3, 0)
    assert nb.shape == (5, 3)
    np.testing.assert_array_equal(nb[:, 0], [3, 3, 3, 0, 0])
    np.testing.assert_array_equal(nb[:, 1:], np.arange(5)[:, None].repeat(2, axis=1))


def test_smooth_moves_toward_neighbours_and_keeps_unit_length():
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(50, 6)).astype(np.float32)
    Z /= np.linalg.norm(Z, axis=1, keepdims=True)
    neighbors = np.stack([np.roll(np.arange(50), -1), np.roll(np.arange(50), 1)], axis=1)
    out = smooth(Z, neighbors, 2)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    agree_before = np.einsum("nd,nd->n", Z, Z[neighbors[:, 0]]).mean()
    agree_after = np.einsum("nd,nd->n", out, out[neighbors[:, 0]]).mean()
    assert agree_after > agree_before
    np.testing.assert_array_equal(smooth(Z, neighbors, 0), Z)
