"""Nearest neighbours among distinct rows (shared by neighbors and DeepCluster)."""

from __future__ import annotations

import numpy as np

from clustering_service.algorithms.knn import (
    capped_neighbors,
    distinct_rows,
    nearest_neighbors,
    principal_components,
    smooth,
)


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


def test_principal_components_keep_the_leading_axes():
    rng = np.random.default_rng(0)
    # spread 10, 5, 1 along three axes, noise 0.01 along 5 more, rotated
    Z = rng.normal(size=(2000, 8)) * np.array([10, 5, 1] + [0.01] * 5)
    rot = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    Z = (Z @ rot).astype(np.float32)
    P = principal_components(Z, 3, max_rows=500)
    assert P.shape == (2000, 3) and P.dtype == np.float32
    np.testing.assert_allclose(P.std(axis=0), [10, 5, 1], rtol=0.1)
    # distances survive: the dropped axes held almost nothing
    d_full = np.linalg.norm(Z[:100, None] - Z[None, :100], axis=-1)
    d_pca = np.linalg.norm(P[:100, None] - P[None, :100], axis=-1)
    assert np.abs(d_full - d_pca).max() < 0.1
    assert principal_components(Z, 8) is Z  # nothing to drop


def test_principal_components_prepare_each_block_without_copying_z_whole():
    rng = np.random.default_rng(1)
    Z = rng.normal(size=(1000, 6)).astype(np.float32) + 3.0
    blocks = []

    def unit(rows: np.ndarray) -> np.ndarray:
        blocks.append(len(rows))
        return _unit(rows - 3.0)

    P = principal_components(Z, 4, max_rows=300, prepare=unit)
    assert P.shape == (1000, 4)
    # the axes are fitted on one sample of 300 prepared rows, then 4 blocks are projected
    assert blocks == [300, 300, 300, 300, 100]
    expected = principal_components(_unit(Z - 3.0), 4, max_rows=300)
    np.testing.assert_allclose(P, expected, atol=1e-5)
    # fewer rows than axes asked for: as many axes as rows
    assert principal_components(Z[:5], 4, prepare=unit).shape == (5, 4)
    assert principal_components(Z[:3], 4, prepare=unit).shape == (3, 3)
    # nothing to drop: the prepared rows themselves
    np.testing.assert_allclose(principal_components(Z, 6, prepare=unit), _unit(Z - 3.0))


def test_principal_components_whiten_by_the_given_power():
    rng = np.random.default_rng(3)
    # variances 100, 16, 1 along three rotated axes, nothing along a fourth
    Z = rng.normal(size=(4000, 4)) * np.array([10.0, 4.0, 1.0, 0.0])
    rot = np.linalg.qr(rng.normal(size=(4, 4)))[0]
    Z = (Z @ rot).astype(np.float32)
    full = principal_components(Z, 3, power=-0.5)
    np.testing.assert_allclose(full.var(axis=0), [1.0, 1.0, 1.0], rtol=0.05)
    half = principal_components(Z, 3, power=-0.25)
    np.testing.assert_allclose(half.var(axis=0), [10.0, 4.0, 1.0], rtol=0.1)
    # the rows are rotated onto their axes even when nothing is dropped, and an
    # empty axis is floored (1e-3 of the largest variance), not blown up
    every = principal_components(Z, 8, power=-0.5)
    assert every.shape == (4000, 4)
    np.testing.assert_allclose(every[:, :3].var(axis=0), [1.0, 1.0, 1.0], rtol=0.05)
    assert np.abs(every[:, 3]).max() < 1e-2
    # rows that are all equal: nothing to whiten, no division by zero (sklearn's
    # explained-variance ratio warns of its own 0 / 0)
    with np.errstate(invalid="ignore"):
        flat = principal_components(np.ones((50, 4), dtype=np.float32), 2, power=-0.25)
    assert np.isfinite(flat).all()


def test_capped_neighbors_stay_within_half_the_average_cluster():
    feats = _unit(np.random.default_rng(2).normal(size=(60, 8)))
    assert capped_neighbors(feats, 10, 3, 0).shape == (60, 10)  # 60 / 6 = 10
    assert capped_neighbors(feats, 10, 6, 0).shape == (60, 5)
    assert capped_neighbors(feats, 10, 60, 0).shape == (60, 1)  # at least one
    # copies count once: 20 distinct rows, 3 copies each, k = 4 -> 20 / 8 = 2
    copies = np.repeat(feats[:20], 3, axis=0)
    found = capped_neighbors(copies, 10, 4, 0)
    assert found.shape == (60, 2)
    assert not np.any(np.all(copies[found] == copies[:, None], axis=-1))
