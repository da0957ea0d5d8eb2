"""k-means: the baseline estimator and the primitives the deep methods call."""

from __future__ import annotations

import numpy as np
import pytest

from clustering_service.algorithms import (
    ClusteringCancelled,
    ClusteringInputError,
    create,
    load,
)
from clustering_service.algorithms import kmeans as km
from clustering_service.algorithms.kmeans import (
    KMeansClusterer,
    assign_nearest,
    fill_empty_clusters,
    run_kmeans,
)
from clustering_service.algorithms.metrics import clustering_accuracy


@pytest.fixture(scope="module")
def fitted(digits_data):
    X, _ = digits_data
    return create("kmeans", n_clusters=10, random_state=0, n_init=4).fit(X)


def test_beats_chance_widely_on_digits(digits_data, fitted):
    from sklearn.metrics import normalized_mutual_info_score

    _, y = digits_data
    # chance is ~0.1 ACC / ~0 NMI; k-means on digits is known to reach ~0.79 / ~0.74
    assert clustering_accuracy(y, fitted.labels_) > 0.65
    assert normalized_mutual_info_score(y, fitted.labels_) > 0.65
    assert fitted.cluster_centers_.shape == (10, 64)
    assert np.bincount(fitted.labels_, minlength=10).min() > 0


def test_same_seed_same_result_other_seed_other_start(digits_data):
    X, _ = digits_data
    a = run_kmeans(X, 10, n_init=2, random_state=3)
    b = run_kmeans(X, 10, n_init=2, random_state=3)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
    assert a[2] == b[2]


def test_large_n_path_is_deterministic_and_fills_every_cluster(digits_data, monkeypatch):
    X, _ = digits_data
    monkeypatch.setattr(km, "SKLEARN_MAX_ROWS", 0)
    monkeypatch.setattr(km, "MIN_TRAIN_ROWS", 500)  # exercise the subsample too
    a_centers, a_labels, a_inertia = run_kmeans(X, 10, n_init=2, max_iter=20, random_state=1)
    b_centers, b_labels, _ = run_kmeans(X, 10, n_init=2, max_iter=20, random_state=1)
    np.testing.assert_array_equal(a_labels, b_labels)
    np.testing.assert_array_equal(a_centers, b_centers)
    assert a_labels.dtype == np.int64 and a_centers.dtype == np.float32
    assert np.bincount(a_labels, minlength=10).min() > 0
    # the returned inertia is that of the returned labels on ALL rows
    expected = ((X - a_centers[a_labels]) ** 2).sum()
    assert a_inertia == pytest.approx(expected, rel=1e-4)


def test_spherical_centres_have_unit_norm(digits_data):
    X, _ = digits_data
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    centers, labels, _ = run_kmeans(Xn, 10, n_init=1, spherical=True, random_state=0)
    np.testing.assert_allclose(np.linalg.norm(centers, axis=1), 1.0, atol=1e-5)
    assert len(np.unique(labels)) == 10


def test_given_init_is_used_once(digits_data):
    X, y = digits_data
    init = np.stack([X[y == c].mean(axis=0) for c in range(10)])
    _, labels, _ = run_kmeans(X, 10, init=init, max_iter=1)
    # one Lloyd step from the class means keeps the ids: cluster c ~ class c
    assert np.mean(labels == y) > 0.8
    with pytest.raises(ClusteringInputError):
        run_kmeans(X, 10, init=init[:5])


def test_assign_nearest_matches_brute_force_in_small_chunks():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(1000, 16)).astype(np.float16)  # any float dtype
    C = rng.normal(size=(7, 16)).astype(np.float32)
    labels, d2 = assign_nearest(X, C, batch_size=33)
    full = ((X.astype(np.float32)[:, None, :] - C[None]) ** 2).sum(axis=2)
    np.testing.assert_array_equal(labels, full.argmin(axis=1))
    np.testing.assert_allclose(d2, full.min(axis=1), rtol=1e-4, atol=1e-4)
    assert labels.dtype == np.int64 and d2.dtype == np.float32


def test_fill_empty_clusters_splits_the_largest():
    X = np.array([[0.0, 0], [0.1, 0], [5, 0], [5.1, 0], [9, 0]], dtype=np.float32)
    centers = np.array([[3, 0], [100, 100], [-100, -100]], dtype=np.float32)
    labels = np.zeros(5, dtype=np.int64)
    new_centers, new_labels = fill_empty_clusters(X, centers, labels)
    assert np.bincount(new_labels, minlength=3).min() > 0
    for j in range(3):
        np.testing.assert_allclose(new_centers[j], X[new_labels == j].mean(axis=0), rtol=1e-6)


def test_predict_and_proba(digits_data, fitted):
    X, _ = digits_data
    np.testing.assert_array_equal(fitted.predict(X), fitted.labels_)
    proba = fitted.predict_proba(X)
    assert proba.shape == (len(X), 10) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(proba.argmax(axis=1), fitted.labels_)
    # informative, not one-hot and not uniform: the temperature follows the data scale
    top = proba.max(axis=1)
    assert 0.2 < np.median(top) < 0.999


def test_save_load_round_trip(tmp_path, digits_data, fitted):
    X, _ = digits_data
    fitted.save(tmp_path / "m")
    loaded = load(str(tmp_path / "m"))
    assert isinstance(loaded, KMeansClusterer)
    # load places the model on the device it is asked for (CPU by default)
    assert {**loaded.get_params(), "device": "auto"} == fitted.get_params()
    np.testing.assert_array_equal(loaded.predict(X), fitted.predict(X))
    np.testing.assert_array_equal(loaded.predict_proba(X), fitted.predict_proba(X))


def test_update_on_same_data_keeps_ids(digits_data):
    X, _ = digits_data
    est = create("kmeans", n_clusters=10, random_state=0, n_init=4).fit(X)
    before = est.labels_.copy()
    est.update(X)
    assert np.mean(est.labels_ == before) >= 0.99
    info = est.update_info_
    assert {"epochs", "centroid_shift_mean", "centroid_shift_max", "label_change"} <= set(info)
    assert info["centroid_shift_max"] < 0.05
    assert info["n_empty"] == 0


def test_update_keeps_ids_when_half_the_data_is_replaced(digits_data):
    X, y = digits_data
    rng = np.random.default_rng(0)
    order = rng.permutation(len(X))
    a, b = order[:900], np.concatenate([order[450:900], order[900:1350]])
    est = create("kmeans", n_clusters=10, random_state=0, n_init=4).fit(X[a])
    retained_before = est.labels_[450:]
    est.update(X[b])
    assert np.mean(est.labels_[:450] == retained_before) >= 0.95
    assert clustering_accuracy(y[b], est.labels_) > 0.65


def test_max_centroid_shift_is_honoured(digits_data):
    X, _ = digits_data
    est = create("kmeans", n_clusters=10, random_state=0, n_init=2).fit(X)
    parent = est.cluster_centers_.copy()
    moved = np.clip(X[:, ::-1] * 0.5 + 0.3, 0, 1)  # a very different data set
    est.update(moved, max_centroid_shift=0.25, max_epochs=5)
    shift = np.linalg.norm(est.cluster_centers_ - parent, axis=1)
    assert shift.max() <= 0.25 + 1e-5
    assert est.update_info_["centroid_shift_max"] == pytest.approx(shift.max(), abs=1e-6)
    assert est.update_info_["epochs"] <= 5
    # zero epochs: nothing moves, labels are the nearest centres
    est.update(moved, max_epochs=0)
    assert est.update_info_["centroid_shift_max"] == 0.0


def test_update_rejects_unknown_params(digits_data, fitted):
    X, _ = digits_data
    with pytest.raises(ClusteringInputError, match="bogus"):
        fitted.update(X, bogus=1)


def test_progress_and_cancel(digits_data):
    X, _ = digits_data
    events = []
    create("kmeans", n_clusters=5, n_init=3, progress_callback=events.append).fit(X)
    assert [e.epoch for e in events if e.stage == "kmeans"] == [0, 1, 2, 3]
    assert events[-1].loss is not None and events[-1].loss > 0
    with pytest.raises(ClusteringCancelled):
        create("kmeans", n_clusters=5, cancel_check=lambda: True).fit(X)


@pytest.mark.parametrize("params", [{"n_init": 0}, {"max_iter": -1}, {"tol": 1.5}])
def test_bad_hyper_parameters(digits_data, params):
    X, _ = digits_data
    with pytest.raises(ClusteringInputError):
        create("kmeans", n_clusters=3, **params).fit(X)
