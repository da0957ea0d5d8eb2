"""DEC: quality on digits, informative soft assignments, persistence, updates,
determinism, progress and cancellation, input validation.

Short schedules keep the file fast; the full-schedule numbers are in
docs/benchmarks/dec.md.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from clustering_service.algorithms import (
    ClusteringCancelled,
    ClusteringInputError,
    create,
    load,
)
from clustering_service.algorithms.dec import (
    DEC,
    log_soft_assignment,
    project_to_ball,
    target_distribution,
)
from clustering_service.algorithms.metrics import clustering_accuracy

#: a short schedule: about 15 s of CPU on digits
FAST = {
    "hidden_dims": [128, 128],
    "pretrain_epochs": 40,
    "cluster_epochs": 15,
    "kmeans_n_init": 5,
    "device": "cpu",
}
TINY = {**FAST, "pretrain_epochs": 3, "cluster_epochs": 2, "kmeans_n_init": 2}


@pytest.fixture(scope="module")
def fitted(digits_data) -> DEC:
    X, _ = digits_data
    return DEC(n_clusters=10, random_state=0, **FAST).fit(X)


def test_fit_beats_chance_widely(fitted, digits_data):
    X, y = digits_data
    labels = fitted.labels_
    assert labels.shape == (X.shape[0],) and labels.dtype == np.int64
    assert clustering_accuracy(y, labels) > 0.7
    assert normalized_mutual_info_score(y, labels) > 0.65
    assert np.bincount(labels, minlength=10).min() > 0
    assert fitted.cluster_centers_.shape == (10, fitted.latent_dim)
    np.testing.assert_array_equal(fitted.predict(X), labels)


def test_soft_assignment_is_informative(fitted, digits_data):
    X, _ = digits_data
    q = fitted.predict_proba(X)
    assert q.shape == (X.shape[0], 10)
    np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(q.argmax(axis=1), fitted.predict(X))
    # the seed's DEC had max q ~ 0.0145 against a uniform 0.01: nothing to sharpen
    assert q.max(axis=1).mean() > 3.0 / 10
    centers = torch.from_numpy(fitted.cluster_centers_)
    q_centres = log_soft_assignment(centers, centers, fitted.alpha).exp()
    assert q_centres.diagonal().min() > 3.0 / 10


def test_transform_is_the_space_of_the_centres(fitted, digits_data):
    X, _ = digits_data
    Z = fitted.transform(X[:50])
    assert Z.shape == (50, fitted.latent_dim)
    d2 = ((Z[:, None, :] - fitted.cluster_centers_[None]) ** 2).sum(axis=2)
    np.testing.assert_array_equal(d2.argmin(axis=1), fitted.predict(X[:50]))
    # inference folds the standardisation and latent scale into the encoder
    with torch.no_grad():
        reference = fitted.ae_.eval().encode(torch.from_numpy(X[:50])).numpy()
    np.testing.assert_allclose(Z, reference, rtol=1e-4, atol=1e-4)


def test_clustering_stage_trains_the_centres(fitted):
    info = fitted.fit_info_
    assert info["iterations"] > 0 and info["target_updates"] > 0
    # the centres are the parameter the optimiser updates: they left the k-means init
    assert info["centroid_shift_mean"] > 0


def test_kl_step_moves_centres_toward_their_points():
    """One optimiser step on KL(P || Q) as DEC takes it lowers the loss and pulls
    each centre toward its own points (sign of q's exponent, log taken once)."""
    torch.manual_seed(0)
    z = torch.cat([torch.randn(50, 2) + 3, torch.randn(50, 2) - 3])
    centers = torch.nn.Parameter(torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
    opt = torch.optim.SGD([centers], lr=0.5)
    with torch.no_grad():
        p = torch.from_numpy(
            target_distribution(log_soft_assignment(z, centers, 1.0).exp().numpy())
        )
    losses = []
    for _ in range(2):
        loss = torch.nn.functional.kl_div(
            log_soft_assignment(z, centers, 1.0), p, reduction="batchmean"
        )
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[1] < losses[0]
    assert centers[0, 0] > 1.0 and centers[1, 0] < -1.0


def test_target_distribution_sharpens_and_normalises():
    rng = np.random.default_rng(0)
    q = rng.dirichlet(np.ones(4), size=100).astype(np.float32)
    p = target_distribution(q)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    assert (p.max(axis=1) >= q.max(axis=1) - 1e-6).mean() > 0.9
    # in place over q (how fit uses it) gives the same result
    np.testing.assert_allclose(target_distribution(q.copy(), out=q), p)


def test_save_load_roundtrip(fitted, digits_data, tmp_path):
    X, _ = digits_data
    fitted.save(tmp_path / "m")
    loaded = load(str(tmp_path / "m"))
    assert isinstance(loaded, DEC)
    assert loaded.get_params() == fitted.get_params()
    np.testing.assert_array_equal(loaded.predict(X), fitted.predict(X))
    np.testing.assert_array_equal(loaded.predict_proba(X), fitted.predict_proba(X))
    np.testing.assert_array_equal(loaded.transform(X), fitted.transform(X))


@pytest.mark.parametrize("strategy", ["move_centroids", "refit_target"])
def test_update_keeps_ids_and_bounds_shift(fitted, digits_data, strategy):
    X, _ = digits_data
    rng = np.random.default_rng(1)
    # drop half, add as many perturbed copies of other items
    keep = np.sort(rng.choice(X.shape[0], X.shape[0] // 2, replace=False))
    new = np.clip(X[rng.choice(X.shape[0], keep.size)] + rng.normal(0, 0.05, (keep.size, 64)), 0, 1)
    X_new = np.concatenate([X[keep], new.astype(np.float32)])
    before = fitted.predict(X_new)
    model = copy.deepcopy(fitted)
    parents = model.cluster_centers_.copy()
    bound = 0.05
    model.update(X_new, max_epochs=2, max_centroid_shift=bound, strategy=strategy)
    info = model.update_info_
    assert info["strategy"] == strategy
    assert 0 < info["epochs"] <= 2
    shift = np.linalg.norm(model.cluster_centers_ - parents, axis=1)
    assert shift.max() <= bound + 1e-5
    assert info["centroid_shift_max"] == pytest.approx(shift.max(), abs=1e-6)
    assert info["centroid_shift_mean"] == pytest.approx(shift.mean(), abs=1e-6)
    assert model.labels_.shape == (X_new.shape[0],)
    assert info["label_change"] == pytest.approx(np.mean(model.labels_ != before))
    # ids keep their meaning: retained items mostly keep their label
    assert np.mean(model.labels_[: keep.size] == before[: keep.size]) > 0.9
    np.testing.assert_array_equal(model.predict(X_new), model.labels_)


def test_default_update_budget_is_capped_in_rows(fitted, digits_data, monkeypatch):
    import clustering_service.algorithms.dec as dec_module

    X, _ = digits_data
    monkeypatch.setattr(dec_module, "UPDATE_SAMPLES", 2 * fitted.batch_size)
    model = copy.deepcopy(fitted)
    model.update(X)  # update_epochs=3 would be 24 steps on 1797 rows
    assert 0 < model.update_info_["iterations"] <= 2
    model.update(X, max_epochs=1, tol=0.0)  # an explicit max_epochs is not capped
    assert model.update_info_["iterations"] == 8


def test_update_zero_epochs_moves_centres_only_within_bound(fitted, digits_data):
    X, _ = digits_data
    model = copy.deepcopy(fitted)
    parents = model.cluster_centers_.copy()
    model.update(X, max_epochs=0, max_centroid_shift=0.01, strategy="move_centroids")
    assert model.update_info_["epochs"] == 0
    assert np.linalg.norm(model.cluster_centers_ - parents, axis=1).max() <= 0.01 + 1e-6
    with pytest.raises(ClusteringInputError, match="strategy"):
        model.update(X, strategy="nope")


def test_project_to_ball():
    parents = torch.zeros(3, 2)
    centers = torch.tensor([[3.0, 4.0], [0.1, 0.0], [0.0, -2.0]])
    assert project_to_ball(centers, parents, 1.0) == 2
    np.testing.assert_allclose(centers.norm(dim=1).numpy(), [1.0, 0.1, 1.0], rtol=1e-6)
    np.testing.assert_allclose(centers[0].numpy(), [0.6, 0.8], rtol=1e-6)


def test_deterministic_on_cpu(small_digits):
    X, _ = small_digits
    threads = torch.get_num_threads()
    a = DEC(n_clusters=5, random_state=3, **TINY).fit(X)
    b = DEC(n_clusters=5, random_state=3, **TINY).fit(X)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    # training steps run single-threaded; the caller's setting comes back
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_idec_term_on_and_off(small_digits, gamma):
    X, y = small_digits
    params = {**FAST, "pretrain_epochs": 30, "cluster_epochs": 10}
    model = create("dec", n_clusters=5, random_state=0, gamma=gamma, **params).fit(X)
    assert model.fit_info_["iterations"] > 0
    assert clustering_accuracy(y, model.labels_) > 0.6


def test_progress_and_cancel(small_digits):
    X, _ = small_digits
    events = []
    DEC(n_clusters=5, progress_callback=events.append, **TINY).fit(X)
    stages = [e.stage for e in events]
    assert stages[0] == "pretrain" and "kmeans_init" in stages and stages[-1] == "cluster"
    assert [e.epoch for e in events if e.stage == "pretrain"] == [1, 2, 3]
    last = events[-1]
    assert last.label_change is not None and len(last.extra["sizes"]) == 5
    assert sum(last.extra["sizes"]) == X.shape[0]

    calls = []
    model = DEC(
        n_clusters=5,
        progress_callback=calls.append,
        cancel_check=lambda: len(calls) >= 2,
        **TINY,
    )
    with pytest.raises(ClusteringCancelled):
        model.fit(X)
    assert len(calls) == 2


def test_bad_input(fitted, small_digits):
    X, _ = small_digits
    bad = X.copy()
    bad[3, 5] = np.nan
    with pytest.raises(ClusteringInputError, match="NaN"):
        DEC(n_clusters=5, **TINY).fit(bad)
    with pytest.raises(ClusteringInputError, match="fewer than n_clusters"):
        DEC(n_clusters=5, **TINY).fit(X[:4])
    with pytest.raises(ClusteringInputError, match="n_clusters"):
        DEC(n_clusters=1, **TINY).fit(X)
    with pytest.raises(ClusteringInputError, match="empty"):
        DEC(n_clusters=5, **TINY).fit(np.zeros((0, 64), np.float32))
    with pytest.raises(ClusteringInputError, match="features"):
        fitted.predict(X[:, :10])
    with pytest.raises(ClusteringInputError, match="noise"):
        DEC(n_clusters=5, noise="salt").fit(X)
    with pytest.raises(ClusteringInputError, match="hidden_dims"):
        DEC(n_clusters=5, hidden_dims=[0]).fit(X)
    with pytest.raises(ClusteringInputError, match="update_strategy"):
        DEC(n_clusters=5, update_strategy="x").fit(X)


def test_init_space_input_starts_from_the_kmeans_partition(small_digits):
    """``init_space="input"`` (the default): the initial labels are k-means on X
    itself, so with no clustering epochs DEC's labels are that partition as seen
    from the latent centres (its clusters' mean codes); "latent" is the paper's."""
    from clustering_service.algorithms.kmeans import run_kmeans

    X, _ = small_digits
    _, km_labels, _ = run_kmeans(X, 5, n_init=TINY["kmeans_n_init"], random_state=0)
    events = []
    DEC(n_clusters=5, progress_callback=events.append, **TINY).fit(X)
    first = next(e for e in events if e.stage == "cluster")
    # round 0 compares the nearest-latent-centre labels with the initial labels
    assert first.label_change is not None and first.label_change < 0.5
    model = DEC(n_clusters=5, **{**TINY, "cluster_epochs": 1}).fit(X)
    assert clustering_accuracy(km_labels, model.labels_) > 0.6
    paper = DEC(n_clusters=5, init_space="latent", **TINY).fit(X)
    assert paper.labels_.shape == (X.shape[0],)
    with pytest.raises(ClusteringInputError, match="init_space"):
        DEC(n_clusters=5, init_space="pixels").fit(X)


def test_layerwise_pretraining_trains_each_layer_then_the_stack(small_digits):
    """``pretrain="layerwise"`` (the paper's): every encoder/decoder pair is
    trained alone, in order, before the whole stack is fine-tuned; a layer's
    weights move only during its own stage and the fine-tuning."""
    X, y = small_digits
    params = {**TINY, "pretrain_epochs": 4, "hidden_dims": [32, 32]}
    snapshots: dict[int, list[torch.Tensor]] = {}
    events = []
    model = DEC(n_clusters=5, pretrain="layerwise", init_space="latent", **params)

    def record(event):
        events.append(event)
        if event.stage == "pretrain_layer" and event.epoch == event.epochs:
            linears = [m for m in model.ae_.encoder if isinstance(m, torch.nn.Linear)]
            snapshots[event.extra["layer"]] = [m.weight.detach().clone() for m in linears]

    model.progress_callback = record
    model.fit(X)
    stages = [(e.stage, e.extra.get("layer")) for e in events]
    layer_stages = [s for s in stages if s[0] == "pretrain_layer"]
    # 3 linear layers (32, 32, latent), half of pretrain_epochs each, in order
    assert layer_stages == [("pretrain_layer", i) for i in (1, 2, 3) for _ in range(2)]
    assert [e.epoch for e in events if e.stage == "finetune"] == [1, 2, 3, 4]
    assert stages.index(("finetune", None)) > stages.index(("pretrain_layer", 3))
    # layer 1 is frozen while layer 2 trains; layer 3 is untouched until its turn
    assert torch.equal(snapshots[1][0], snapshots[2][0])
    assert not torch.equal(snapshots[1][1], snapshots[2][1])
    assert torch.equal(snapshots[1][2], snapshots[2][2])
    assert not torch.equal(snapshots[2][2], snapshots[3][2])
    assert np.isfinite(model.pretrain_loss_)
    assert clustering_accuracy(y, model.labels_) > 0.4  # chance is 0.2
    with pytest.raises(ClusteringInputError, match="pretrain must be one of"):
        DEC(n_clusters=5, pretrain="greedy").fit(X)
    with pytest.raises(ClusteringInputError, match="layer-wise dropout"):
        DEC(n_clusters=5, pretrain="layerwise", noise="gaussian", noise_level=1.5).fit(X)
