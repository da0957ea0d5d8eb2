"""Property-based tests (Hypothesis) of the algorithms' input validation and of the
matching and metrics code.

* Validation: any array (every dtype, 0-3 dimensions, NaN, inf, huge values),
  any ``n_clusters`` and any mismatch with a fitted model is either accepted as a
  finite float32 matrix or refused with :class:`ClusteringInputError` (a
  ``ValueError``) before any training: never another exception, never a hang.
* Metrics: ACC in [0, 1], 1 on identical labelings and on any renaming of them,
  symmetric and invariant to the order of the samples; NMI and ARI 1 on renamings;
  the contingency table and size statistics count every sample once.
* Matching: Hungarian matches are one-to-one and optimal (checked against brute
  force on small cases), recover a known permutation, and ``relabel_to_parent``
  keeps matched ids, hands out fresh ids above ``next_id`` and never reuses one.

``DINOCLUSTER_HYPOTHESIS_EXAMPLES`` (default 30) sets the examples per test.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from clustering_service.algorithms import ALGORITHMS, ClusteringInputError, create
from clustering_service.algorithms.base import check_array
from clustering_service.algorithms.matching import (
    match_clusters,
    match_labels,
    relabel_to_parent,
    stability_report,
)
from clustering_service.algorithms.metrics import (
    cluster_size_stats,
    clustering_accuracy,
    contingency,
    evaluate,
)
from tests.support.clustering import fast_params

EXAMPLES = int(os.environ.get("DINOCLUSTER_HYPOTHESIS_EXAMPLES", "30"))
# no example database in the checkout; generous deadline on a shared CPU
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: the refusals are the base class's: a few examples per algorithm show none bypasses them
PER_ALGORITHM = settings(SETTINGS, max_examples=max(5, EXAMPLES // 4))
#: a refusal must come before any training: far below one epoch of any algorithm
REFUSE_WITHIN_S = 2.0

# --- strategies ------------------------------------------------------------------

DTYPES = st.sampled_from(
    [np.float16, np.float32, np.float64, np.int8, np.int64, np.uint8, np.bool_, np.complex64]
)


@st.composite
def any_array(draw: st.DrawFn) -> np.ndarray:
    """Arrays of any of DTYPES with 0-3 dimensions (2 half of the time), NaN, inf and
    extreme values."""
    dtype = np.dtype(draw(DTYPES))
    shape = draw(
        st.one_of(
            hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6),
            hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
        )
    )
    elements = None
    if dtype.kind == "f":
        elements = st.floats(allow_nan=True, allow_infinity=True, width=dtype.itemsize * 8)
    return draw(hnp.arrays(dtype, shape, elements=elements))


@st.composite
def invalid_matrix(draw: st.DrawFn) -> tuple[Any, str]:
    """An input ``fit`` must refuse, with the reason it is bad."""
    kind = draw(
        st.sampled_from(["nan", "inf", "1-d", "3-d", "empty", "no-features", "dtype", "ragged"])
    )
    n = draw(st.integers(2, 12))
    d = draw(st.integers(1, 5))
    X = draw(hnp.arrays(np.float32, (n, d), elements=st.floats(-10, 10, width=32)))
    if kind in ("nan", "inf"):
        row, col = draw(st.integers(0, n - 1)), draw(st.integers(0, d - 1))
        X[row, col] = np.nan if kind == "nan" else draw(st.sampled_from([np.inf, -np.inf]))
        return X, kind
    if kind == "1-d":
        return X[:, 0], kind
    if kind == "3-d":
        return X[:, :, None], kind
    if kind == "empty":
        return np.empty((0, d), np.float32), kind
    if kind == "no-features":
        return np.empty((n, 0), np.float32), kind
    if kind == "dtype":
        return draw(st.sampled_from([X.astype(str), X.astype(object), X > 0])), kind
    return [*(list(row) for row in X[:-1]), [*X[-1, :-1], 1.0, 2.0]], kind


labelings = st.lists(st.integers(0, 6), min_size=1, max_size=60).map(
    lambda v: np.asarray(v, np.int64)
)


@st.composite
def labeling_and_renaming(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``labels``, a one-to-one renaming of its ids, and the renamed labels."""
    labels = draw(labelings)
    k = int(labels.max()) + 1
    renaming = np.asarray(draw(st.permutations(range(k + 3)))[:k], np.int64)
    return labels, renaming, renaming[labels]


# --- input validation ------------------------------------------------------------


@SETTINGS
@given(any_array())
def test_check_array_accepts_finite_float32_or_refuses(X: np.ndarray) -> None:
    try:
        out = check_array(X)
    except ClusteringInputError:
        return
    assert out.dtype == np.float32
    assert out.shape == X.shape and out.ndim == 2 and out.size > 0
    assert np.isfinite(out).all(), "a value that is finite in X is not finite as float32"


@SETTINGS
@given(
    hnp.arrays(
        st.sampled_from([np.float64, np.float32, np.float16]),
        hnp.array_shapes(min_dims=2, max_dims=2),
        elements={"allow_nan": False, "allow_infinity": False},
    )
)
def test_check_array_output_is_finite_for_finite_input(X: np.ndarray) -> None:
    """A finite float64 past float32's range (1e300, say) became inf when converted."""
    try:
        out = check_array(X)
    except ClusteringInputError as exc:
        assert "beyond the float32 range" in str(exc)
        assert (np.abs(X) > np.finfo(np.float32).max).any()
        return
    assert np.isfinite(out).all()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@PER_ALGORITHM
@given(bad=invalid_matrix())
def test_fit_refuses_bad_data_before_training(algorithm: str, bad: tuple[Any, str]) -> None:
    X, kind = bad
    estimator = create(algorithm, n_clusters=2, **fast_params(algorithm))
    started = time.perf_counter()
    with pytest.raises(ClusteringInputError):
        estimator.fit(X)
    assert time.perf_counter() - started < REFUSE_WITHIN_S, kind


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@PER_ALGORITHM
@given(
    n=st.integers(1, 8),
    k=st.one_of(
        st.integers(-3, 12),
        st.floats(allow_nan=True),
        st.sampled_from(["3", True, [2], 2.0]),
    ),
)
def test_fit_refuses_bad_n_clusters(algorithm: str, n: int, k: Any) -> None:
    """k not an integer, k < 2, or more clusters than samples."""
    valid = isinstance(k, int) and not isinstance(k, bool) and 2 <= k <= n
    assume(not valid)
    X = np.random.default_rng(n).normal(size=(n, 3)).astype(np.float32)
    started = time.perf_counter()
    with pytest.raises(ClusteringInputError):
        create(algorithm, n_clusters=k, **fast_params(algorithm)).fit(X)
    assert time.perf_counter() - started < REFUSE_WITHIN_S


@pytest.fixture(scope="module")
def fitted_kmeans() -> Any:
    X = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    return create("kmeans", n_clusters=3, n_init=1).fit(X)


@SETTINGS
@given(bad=invalid_matrix(), extra=st.integers(1, 3))
def test_predict_and_update_refuse_bad_data(fitted_kmeans: Any, bad: tuple, extra: int) -> None:
    """Bad matrices, and good ones of the wrong width."""
    X, _ = bad
    wide = np.zeros((5, 4 + extra), np.float32)
    for data in (X, wide):
        for call in (fitted_kmeans.predict, fitted_kmeans.predict_proba, fitted_kmeans.update):
            with pytest.raises(ClusteringInputError):
                call(data)


# --- metrics -----------------------------------------------------------------------


@SETTINGS
@given(labelings, labelings)
def test_accuracy_is_a_fraction_and_symmetric(a: np.ndarray, b: np.ndarray) -> None:
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    acc = clustering_accuracy(a, b)
    assert 0.0 < acc <= 1.0
    assert acc == pytest.approx(clustering_accuracy(b, a))
    table, _, _ = contingency(a, b)
    assert table.sum() == n
    assert acc >= table.max() / n  # at least the largest matched cell


@SETTINGS
@given(labeling_and_renaming())
def test_metrics_are_one_on_renamed_labels(case: tuple) -> None:
    labels, _, renamed = case
    assert clustering_accuracy(labels, labels) == 1.0
    assert clustering_accuracy(labels, renamed) == 1.0
    report = evaluate(None, renamed, labels)
    assert report["acc"] == 1.0
    assert report["nmi"] == pytest.approx(1.0)
    assert report["ari"] == pytest.approx(1.0)


@SETTINGS
@given(labelings, labelings, st.randoms(use_true_random=False))
def test_metrics_ignore_sample_order(a: np.ndarray, b: np.ndarray, rnd: Any) -> None:
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    order = np.asarray(rnd.sample(range(n), n))
    first, shuffled = evaluate(None, b, a), evaluate(None, b[order], a[order])
    for key in ("acc", "nmi", "ari"):
        assert shuffled[key] == pytest.approx(first[key], abs=1e-12)
    assert shuffled["sizes"] == first["sizes"]


@SETTINGS
@given(labelings, st.integers(0, 4))
def test_size_stats_count_every_sample(labels: np.ndarray, spare: int) -> None:
    k = int(labels.max()) + 1 + spare
    stats = cluster_size_stats(labels, n_clusters=k)
    assert sum(stats["sizes"]) == len(labels) and len(stats["sizes"]) == k
    assert stats["n_empty"] == stats["sizes"].count(0) >= spare
    assert stats["min"] <= stats["mean"] <= stats["max"]


@SETTINGS
@given(
    st.one_of(
        st.tuples(labelings, labelings).filter(lambda ab: len(ab[0]) != len(ab[1])),
        labelings.map(lambda a: (a[:, None], a)),
        labelings.map(lambda a: (a, a[None, :])),
    )
)
def test_metrics_refuse_mismatched_labelings(pair: tuple) -> None:
    a, b = pair
    with pytest.raises(ClusteringInputError):
        clustering_accuracy(a, b)
    with pytest.raises(ClusteringInputError):
        stability_report(a, b)


# --- matching --------------------------------------------------------------------


def _overlap(old: np.ndarray, new: np.ndarray, mapping: dict[int, int | None]) -> int:
    return sum(int(np.sum((new == j) & (old == i))) for j, i in mapping.items() if i is not None)


@st.composite
def two_labelings(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Labels of the same items under an old (k_old) and a new (k_new) clustering."""
    n_old, n_new = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    n = draw(st.integers(0, 40))
    old = draw(hnp.arrays(np.int64, n, elements=st.integers(0, n_old - 1)))
    new = draw(hnp.arrays(np.int64, n, elements=st.integers(0, n_new - 1)))
    return old, new, n_old, n_new


@SETTINGS
@given(two_labelings())
def test_match_labels_is_an_optimal_bijection(case: tuple) -> None:
    old, new, n_old, n_new = case
    mapping = match_labels(old, new, n_old, n_new)
    assert sorted(mapping) == list(range(n_new))
    matched = [i for i in mapping.values() if i is not None]
    assert len(matched) == len(set(matched)) and all(0 <= i < n_old for i in matched)
    for j, i in mapping.items():  # a match shares at least one item
        assert i is None or np.any((new == j) & (old == i))
    # no one-to-one assignment keeps more items (brute force over all of them)
    m = max(n_old, n_new)
    overlap = np.zeros((m, m), np.int64)
    np.add.at(overlap, (new, old), 1)
    best = max(sum(overlap[j, p[j]] for j in range(m)) for p in itertools.permutations(range(m)))
    assert _overlap(old, new, mapping) == best


@SETTINGS
@given(labeling_and_renaming())
def test_match_labels_recovers_a_renaming(case: tuple) -> None:
    old, renaming, _ = case
    k = len(renaming)
    # the new clustering is the old one under a permutation of 0..k-1
    perm = np.argsort(renaming)
    new = perm[old]
    mapping = match_labels(old, new, k, k)
    for i in np.unique(old):
        assert mapping[int(perm[i])] == i


@SETTINGS
@given(
    st.integers(1, 5),
    st.integers(1, 5),
    st.integers(1, 3),
    st.randoms(use_true_random=False),
)
def test_match_clusters_is_optimal_and_one_to_one(k_old: int, k_new: int, d: int, rnd) -> None:
    rng = np.random.default_rng(rnd.randrange(2**32))
    old, new = rng.normal(size=(k_old, d)), rng.normal(size=(k_new, d))
    perm = match_clusters(old, new)
    assert perm.shape == (k_old,)
    matched = perm[perm >= 0]
    assert len(matched) == min(k_old, k_new) == len(set(matched.tolist()))
    assert matched.max() < k_new

    def cost(p: Any) -> float:
        return sum(float(((old[i] - new[j]) ** 2).sum()) for i, j in enumerate(p) if j >= 0)

    slots = [*range(k_new), *[-1] * max(0, k_old - k_new)]
    best = min(cost(p) for p in itertools.permutations(slots, k_old))
    assert cost(perm) == pytest.approx(best, rel=1e-9, abs=1e-9)


@SETTINGS
@given(st.permutations(range(6)), st.integers(1, 6))
def test_match_clusters_recovers_shuffled_centres(order: list[int], k: int) -> None:
    old = np.arange(k, dtype=np.float64)[:, None] * 10.0  # well apart
    shuffled = [i for i in order if i < k]
    perm = match_clusters(old, old[shuffled] + 0.1)
    assert [shuffled[j] for j in perm] == list(range(k))


@SETTINGS
@given(two_labelings(), st.integers(0, 20))
def test_relabel_keeps_matched_ids_and_never_reuses_one(case: tuple, spare: int) -> None:
    old, new, n_old, n_new = case
    mapping = match_labels(old, new, n_old, n_new)
    parent_ids = np.arange(n_old) * 2 + 1  # public ids need not be 0..k-1
    next_id = int(parent_ids.max()) + 1 + spare
    labels, ids, advanced = relabel_to_parent(new, mapping, next_id, parent_ids.tolist())
    assert len(set(ids.tolist())) == n_new  # one id per new cluster
    fresh = [int(ids[j]) for j, i in mapping.items() if i is None]
    assert fresh == list(range(next_id, next_id + len(fresh)))
    assert advanced == next_id + len(fresh)
    for j, i in mapping.items():
        if i is not None:
            assert ids[j] == parent_ids[i]
    np.testing.assert_array_equal(labels, ids[new])


@SETTINGS
@given(two_labelings())
def test_stability_report_bounds(case: tuple) -> None:
    old, new, _, _ = case
    report = stability_report(old, new)
    assert report["n_retained"] == len(old)
    if len(old) == 0:
        assert report["kept_fraction"] is None
        return
    assert 0.0 <= report["kept_fraction"] <= report["kept_fraction_matched"] <= 1.0
    assert sum(report["sizes_old"]) == sum(report["sizes_new"]) == len(old)
    same = stability_report(old, old)
    assert same["kept_fraction"] == same["kept_fraction_matched"] == 1.0
    assert same["ari"] == pytest.approx(1.0)
