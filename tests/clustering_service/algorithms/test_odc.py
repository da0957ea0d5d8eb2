"""ODC: quality on digits, memory/predict consistency, small-cluster handling,
re-weighting, persistence, incremental update, determinism, progress and cancel.

One model is fitted per module on all of digits with a short schedule and shared.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score

from clustering_service.algorithms import ClusteringCancelled, ClusteringInputError, load
from clustering_service.algorithms.knn import (
    capped_neighbors,
    principal_components,
    smoothed_input,
)
from clustering_service.algorithms.metrics import clustering_accuracy
from clustering_service.algorithms.odc import (
    ODC,
    clip_centroids,
    fix_small_clusters,
    loss_weights,
    nearest_centroid,
)

SHORT = {"n_epochs": 12, "warmup_epochs": 4, "device": "cpu"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Batches of 256 rows gain nothing from intra-op threads, and on a busy
    machine spinning threads make these tests several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fitted(digits_data) -> ODC:
    X, _ = digits_data
    return ODC(n_clusters=10, random_state=0, **SHORT).fit(X)


def test_fit_beats_chance_widely(fitted, digits_data):
    X, y = digits_data
    assert fitted.labels_.shape == (X.shape[0],)
    assert normalized_mutual_info_score(y, fitted.labels_) > 0.6
    assert clustering_accuracy(y, fitted.labels_) > 0.6
    assert np.bincount(fitted.labels_, minlength=10).min() > 0
    # clustering space is the normalised neck space
    assert fitted.cluster_centers_.shape == (10, fitted.feature_dim)
    np.testing.assert_allclose(np.linalg.norm(fitted.cluster_centers_, axis=1), 1.0, atol=1e-5)
    assert [r["stage"] for r in fitted.history_][:4] == ["warmup"] * 4


def test_memory_labels_agree_with_predict(fitted, digits_data):
    X, _ = digits_data
    assert (fitted.predict(X) == fitted.labels_).mean() >= 0.99
    proba = fitted.predict_proba(X[:300])
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(proba.argmax(axis=1), fitted.predict(X[:300]))


def test_paper_initialisation_on_neck_features(digits_data):
    X, y = digits_data
    model = ODC(n_clusters=10, random_state=0, init_space="neck", **SHORT).fit(X)
    assert normalized_mutual_info_score(y, model.labels_) > 0.5
    assert all(r["stage"] == "train" for r in model.history_)


def _blob(center: list[float], n: int, gen: torch.Generator) -> torch.Tensor:
    c = torch.tensor(center, dtype=torch.float32)
    return F.normalize(c + 0.02 * torch.randn((n, 3), generator=gen), dim=1)


def test_initial_kmeans_runs_on_the_smoothed_principal_components(fitted, digits_data):
    """init_space="input": the rows k-means starts from are the centred unit input on
    its top 128 principal components, half-whitened (``whiten_power=-0.25``) and
    renormalised, then averaged over their neighbours in that space; X itself
    without smoothing. A wide input with fewer rows than 128 gets as many axes as
    rows."""
    X, _ = digits_data
    model = fitted  # the standardiser's mean is kept after fit
    Z = model._initial_space(X)
    assert Z.shape == X.shape and Z.dtype == np.float32  # 64-d: all axes, rotated
    np.testing.assert_allclose(np.linalg.norm(Z, axis=1), 1.0, rtol=1e-5)
    centred = X - X.mean(axis=0)
    unit = (centred / np.linalg.norm(centred, axis=1, keepdims=True)).astype(np.float32)
    W = principal_components(unit, 128, power=-0.25)
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    # each row moved toward its neighbours: closer to them than the unsmoothed row is
    neighbors = capped_neighbors(W, 10, 10, 0)
    before = np.einsum("nd,nkd->n", W, W[neighbors]).mean()
    after = np.einsum("nd,nkd->n", Z, Z[neighbors]).mean()
    assert after > before + 0.05

    # half whitening evens out the axes' spread: the leading axis holds less of it
    def leading_share(rows: np.ndarray) -> float:
        eig = np.linalg.eigvalsh(np.cov(rows.T))
        return float(eig[-1] / eig.sum())

    unwhitened = smoothed_input(X, X.mean(axis=0), 10, 10, 2, 0)  # whiten_power=0
    assert leading_share(Z) < 0.8 * leading_share(unwhitened)
    plain = ODC(n_clusters=10, smooth_steps=0, **SHORT)
    assert plain._initial_space(X) is X

    wide = np.random.default_rng(0).normal(size=(40, 384)).astype(np.float32)
    fitted = ODC(n_clusters=4, random_state=0, **SHORT).fit(wide)
    assert fitted.labels_.shape == (40,)


def test_small_cluster_is_disbanded_and_largest_is_split():
    gen = torch.Generator().manual_seed(0)
    # cluster 0: two well separated halves (30 + 30); cluster 1: 40 items;
    # cluster 2: 3 items, nearest other centroid is cluster 1's
    half_a = _blob([1.0, 0.0, 0.6], 30, gen)
    half_b = _blob([1.0, 0.0, -0.6], 30, gen)
    ones = _blob([0.0, 1.0, 0.0], 40, gen)
    tiny = _blob([-0.3, 1.0, 0.1], 3, gen)
    features = torch.cat([half_a, half_b, ones, tiny])
    labels = torch.tensor([0] * 60 + [1] * 40 + [2] * 3)
    centroids = F.normalize(torch.stack([features[labels == j].mean(0) for j in range(3)]), dim=1)
    before = labels.clone()

    fix = fix_small_clusters(features, labels, centroids, min_cluster=5)

    assert fix.disbanded == [2] and fix.split_from == [0]
    assert (labels[100:] == 1).all()  # the tiny cluster joined its nearest other cluster
    assert (labels[60:100] == 1).all()
    # the largest cluster (0) was cut along its two halves; id 2 took one of them
    assert {int(labels[:30].unique().item()), int(labels[30:60].unique().item())} == {0, 2}
    assert torch.bincount(labels, minlength=3).tolist() == [30, 43, 30]
    for j in range(3):
        expected = F.normalize(features[labels == j].mean(0), dim=0)
        if j != 1:  # cluster 1's centroid is refreshed by the caller's next update
            torch.testing.assert_close(centroids[j], expected)
    changed = torch.nonzero(labels != before).flatten()
    torch.testing.assert_close(fix.moved, changed)
    torch.testing.assert_close(fix.old_labels, before[changed])


def test_no_small_cluster_is_a_no_op():
    gen = torch.Generator().manual_seed(1)
    features = torch.cat([_blob([1.0, 0.0, 0.0], 10, gen), _blob([0.0, 1.0, 0.0], 10, gen)])
    labels = torch.tensor([0] * 10 + [1] * 10)
    centroids = F.normalize(torch.eye(3)[:2], dim=1)
    fix = fix_small_clusters(features, labels, centroids.clone(), min_cluster=10)
    assert fix.disbanded == [] and fix.moved.numel() == 0
    assert labels.tolist() == [0] * 10 + [1] * 10


def test_small_clusters_are_handled_during_fit(digits_data):
    X, _ = digits_data
    # a threshold above some natural cluster sizes forces disband-and-split events
    model = ODC(
        n_clusters=10, random_state=0, min_cluster=175, n_epochs=3, warmup_epochs=0, device="cpu"
    ).fit(X)
    assert sum(r["small_clusters_fixed"] for r in model.history_) > 0
    assert np.bincount(model.labels_, minlength=10).min() > 0


def test_loss_reweighting_is_inverse_square_root():
    w = loss_weights(torch.tensor([100, 25, 0, 4]))
    raw = np.array([1 / 10, 1 / 5, 1 / 2])
    np.testing.assert_allclose(w.numpy()[[0, 1, 3]], raw / raw.mean(), rtol=1e-6)
    assert w[2] == 0  # empty cluster
    np.testing.assert_allclose(loss_weights(torch.tensor([7, 70]), power=0.0).numpy(), [1, 1])


def test_clip_centroids_stays_on_sphere_within_bound():
    parents = F.normalize(torch.randn((6, 5), generator=torch.Generator().manual_seed(0)), dim=1)
    moved = F.normalize(parents + torch.tensor([0.0, 0.05, 0.5, 1.0, 2.0, 3.0])[:, None], dim=1)
    clipped, n = clip_centroids(moved, parents, 0.1)
    dist = (clipped - parents).norm(dim=1)
    assert (dist <= 0.1 + 1e-5).all()
    torch.testing.assert_close(clipped.norm(dim=1), torch.ones(6))
    assert n == int(((moved - parents).norm(dim=1) > 0.1).sum())
    assert math.isclose(float(dist.max()), 0.1, rel_tol=1e-4)


def test_save_load_identical_predictions(fitted, digits_data, tmp_path):
    X, _ = digits_data
    fitted.save(tmp_path / "odc")
    loaded = load(str(tmp_path / "odc"))
    assert isinstance(loaded, ODC)
    np.testing.assert_array_equal(loaded.predict(X), fitted.predict(X))
    np.testing.assert_allclose(loaded.predict_proba(X), fitted.predict_proba(X), atol=1e-6)


def _online_split(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    perm = rng.permutation(X.shape[0])
    first, rest = perm[:1200], perm[1200:]
    kept = np.sort(rng.choice(first, 600, replace=False))
    return first, kept, rest


def test_update_keeps_ids_and_takes_new_items(digits_data, tmp_path):
    X, _ = digits_data
    first, kept, new = _online_split(X)
    model = ODC(n_clusters=10, random_state=0, **SHORT).fit(X[first])
    old = dict(zip(first.tolist(), model.labels_.tolist(), strict=True))
    model.save(tmp_path / "parent")
    current = X[np.concatenate([kept, new])]

    model.update(current, max_epochs=2)

    info = model.update_info_
    assert info["epochs"] == 2
    assert {"centroid_shift_mean", "centroid_shift_max", "label_change"} <= set(info)
    assert model.labels_.shape == (current.shape[0],)
    keep = np.mean([model.labels_[i] == old[j] for i, j in enumerate(kept)])
    assert keep >= 0.9
    np.testing.assert_array_equal(model.predict(current), model.labels_)
    # new items entered the memory with their nearest parent centroid
    parent = load(str(tmp_path / "parent"))
    start = parent.update(current, max_epochs=0)
    np.testing.assert_array_equal(start.labels_, parent.predict(current))
    assert start.update_info_["centroid_shift_max"] == 0.0
    # the update continued from that memory: most labels stayed
    assert (model.labels_ == start.labels_).mean() >= 0.9


def test_update_honours_max_centroid_shift(digits_data):
    X, _ = digits_data
    model = ODC(n_clusters=10, random_state=0, **SHORT).fit(X[:1200])
    parents = model.cluster_centers_.copy()
    model.update(X[600:], max_epochs=2, max_centroid_shift=0.01)
    shift = np.linalg.norm(model.cluster_centers_ - parents, axis=1)
    assert shift.max() <= 0.01 + 1e-5
    assert model.update_info_["centroid_shift_max"] <= 0.01 + 1e-5
    assert model.update_info_["centroids_clipped"] > 0


def test_update_rejects_unknown_parameter(fitted, digits_data):
    X, _ = digits_data
    with pytest.raises(ClusteringInputError, match="unknown update"):
        fitted.update(X, max_epochs=0, strategy="x")


def test_deterministic_on_cpu(small_digits):
    X, _ = small_digits
    params = {"n_clusters": 5, "n_epochs": 3, "warmup_epochs": 1, "device": "cpu"}
    a = ODC(random_state=3, **params).fit(X)
    b = ODC(random_state=3, **params).fit(X)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))


def test_progress_and_cancel(small_digits):
    X, _ = small_digits
    events = []
    ODC(
        n_clusters=5, n_epochs=2, warmup_epochs=1, device="cpu", progress_callback=events.append
    ).fit(X)
    assert [(e.stage, e.epoch) for e in events] == [
        ("init", 1),
        ("warmup", 1),
        ("train", 1),
        ("train", 2),
    ]
    train = events[-1]
    assert train.epochs == 2 and train.loss > 0 and 0.0 <= train.label_change <= 1.0
    assert {"small_clusters_fixed", "cluster_size_min", "cluster_size_max"} <= set(train.extra)

    seen = []
    model = ODC(
        n_clusters=5,
        n_epochs=5,
        warmup_epochs=0,
        device="cpu",
        progress_callback=seen.append,
        cancel_check=lambda: any(e.stage == "train" for e in seen),
    )
    with pytest.raises(ClusteringCancelled):
        model.fit(X)
    assert [e.stage for e in seen].count("train") == 1


@pytest.mark.parametrize(
    "params",
    [
        {"init_space": "pixels"},
        {"memory_momentum": 0.0},
        {"batch_size": 1},
        {"n_epochs": 0},
        {"input_dropout": 1.0},
        {"temperature": 0.0},
        {"smooth_steps": -1},
        {"smooth_steps": None},
        {"n_neighbors": 1.5},
        {"whiten_power": 0.25},
        {"whiten_power": None},
    ],
)
def test_bad_parameters(small_digits, params):
    X, _ = small_digits
    with pytest.raises(ClusteringInputError):
        ODC(n_clusters=5, device="cpu", **params).fit(X)


def test_nearest_centroid_is_max_cosine():
    gen = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn((50, 4), generator=gen), dim=1)
    c = F.normalize(torch.randn((3, 4), generator=gen), dim=1)
    expected = torch.cdist(f, c).argmin(dim=1)
    torch.testing.assert_close(nearest_centroid(f, c), expected)
