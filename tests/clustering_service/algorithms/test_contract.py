"""The estimator contract, checked for every registered algorithm.

Each algorithm is fitted once per module on a 300-row digits subset with a
short schedule (``FAST``: only the keys its ``__init__`` accepts are passed,
so a renamed knob makes the model slower, not the test wrong). A name is
skipped only while its module does not exist; a module that exists but fails
to import fails the test.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clustering_service.algorithms import (
    ALGORITHMS,
    BaseClusterer,
    ClusteringCancelled,
    ClusteringInputError,
    ModelFormatError,
    NotFittedError,
    create,
    load,
)
from clustering_service.algorithms.base import CONFIG_FILE, WEIGHTS_FILE
from clustering_service.algorithms.registry import _CLASSES, get_class

K = 5

#: short schedules; keys an algorithm does not accept are dropped
FAST: dict[str, dict[str, Any]] = {
    "kmeans": {"n_init": 2},
    "dec": {
        "hidden_dims": [32, 32],
        "latent_dim": 5,
        "pretrain_epochs": 2,
        "cluster_epochs": 1,
        "kmeans_n_init": 2,
        "update_epochs": 1,
    },
    "deepcluster": {
        "epochs": 1,
        "trunk_dim": 16,
        "hidden_dim": 32,
        "pca_dim": None,
        "kmeans_n_init": 2,
        "kmeans_max_iter": 10,
        "update_epochs": 1,
    },
    "odc": {
        "hidden_dim": 32,
        "feature_dim": 16,
        "n_epochs": 1,
        "warmup_epochs": 0,
        "kmeans_n_init": 2,
        "update_epochs": 1,
        "min_cluster": 2,
    },
    "neighbors": {
        "n_neighbors": 5,
        "hidden_dim": 32,
        "proj_dim": 16,
        "n_heads": 2,
        "epochs": 1,
        "distill_epochs": 1,
        "self_label_epochs": 1,
        "kmeans_n_init": 2,
        "update_epochs": 1,
    },
}


def _klass(name: str) -> type[BaseClusterer]:
    module_name, _ = _CLASSES[name]
    if importlib.util.find_spec(module_name) is None:
        pytest.skip(f"{module_name} does not exist yet")
    return get_class(name)  # an import error here fails the test


def make(name: str, n_clusters: int | None = K, **extra: Any) -> BaseClusterer:
    valid = set(_klass(name)._param_names())
    params = {k: v for k, v in FAST[name].items() if k in valid}
    return create(name, n_clusters=n_clusters, random_state=0, device="cpu", **params, **extra)


@pytest.fixture(scope="module", params=ALGORITHMS)
def algo(request) -> str:
    _klass(request.param)
    return request.param


@pytest.fixture(scope="module")
def fitted(algo: str, small_digits) -> tuple[BaseClusterer, list]:
    X, _ = small_digits
    events: list = []
    est = make(algo, progress_callback=events.append).fit(X)
    return est, events


@pytest.fixture(scope="module")
def saved(fitted, tmp_path_factory) -> Path:
    est, _ = fitted
    return est.save(tmp_path_factory.mktemp(f"saved_{est.name}") / "model")


@pytest.fixture
def copy_of(saved, tmp_path):
    def _copy() -> Path:
        return Path(shutil.copytree(saved, tmp_path / "copy"))

    return _copy


# -- creation ---------------------------------------------------------------
def test_every_algorithm_is_registered():
    assert set(ALGORITHMS) == {"kmeans", "dec", "deepcluster", "odc", "neighbors"}


def test_unknown_algorithm():
    with pytest.raises(ClusteringInputError, match="unknown algorithm"):
        create("dbscan")


def test_unknown_parameter(algo):
    with pytest.raises(ClusteringInputError, match="no_such_knob"):
        create(algo, n_clusters=3, no_such_knob=1)


def test_constructor_only_stores(algo):
    est = make(algo)
    assert not hasattr(est, "labels_") and not hasattr(est, "n_features_in_")
    json.dumps(est.get_params())  # every param is JSON-able


# -- fit / predict -------------------------------------------------------------
def test_fit_predict_contract(fitted, small_digits):
    est, events = fitted
    X, _ = small_digits
    assert est.n_clusters_ == K and est.n_features_in_ == X.shape[1]
    assert est.labels_.shape == (len(X),)
    assert est.labels_.min() >= 0 and est.labels_.max() < K
    labels = est.predict(X)
    assert labels.dtype == np.int64 and labels.shape == (len(X),)
    proba = est.predict_proba(X)
    assert proba.shape == (len(X), K)
    assert np.all(proba >= 0)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-4)
    if est.has_centers:
        assert est.cluster_centers_.shape[0] == K
    assert events, "the progress callback was never called"
    assert all(isinstance(e.stage, str) for e in events)


def test_memmap_and_float16_input_and_determinism(algo, fitted, small_digits, tmp_path):
    est, _ = fitted
    X, _ = small_digits
    path = tmp_path / "x.npy"
    np.save(path, X)
    mm = np.load(path, mmap_mode="r")
    np.testing.assert_array_equal(est.predict(mm), est.predict(X))
    assert est.predict(X.astype(np.float16)).shape == (len(X),)
    # same seed, same data (as a read-only memmap this time): same labels
    np.testing.assert_array_equal(make(algo).fit(mm).labels_, est.labels_)
    assert make(algo).fit(X.astype(np.float16)).labels_.shape == (len(X),)


def test_cancel(algo, small_digits):
    X, _ = small_digits
    with pytest.raises(ClusteringCancelled):
        make(algo, cancel_check=lambda: True).fit(X)


def test_not_fitted(algo, small_digits):
    X, _ = small_digits
    est = make(algo)
    for call in (est.predict, est.predict_proba, est.update):
        with pytest.raises(NotFittedError):
            call(X)
    with pytest.raises(NotFittedError):
        est.save("/nonexistent/never-written")


_nan = np.ones((50, 64), dtype=np.float32)
_nan[7, 3] = np.nan
_inf = np.ones((50, 64), dtype=np.float32)
_inf[9, 1] = np.inf
BAD_FIT_INPUT = {
    "nan": _nan,
    "inf": _inf,
    "empty": np.zeros((0, 64), dtype=np.float32),
    "no_features": np.zeros((10, 0), dtype=np.float32),
    "one_dim": np.ones(64, dtype=np.float32),
    "three_dim": np.ones((4, 4, 4), dtype=np.float32),
    "strings": np.array([["a", "b"], ["c", "d"]]),
    "fewer_samples_than_clusters": np.random.default_rng(0).random((K - 1, 64)),
}


@pytest.mark.parametrize("case", sorted(BAD_FIT_INPUT))
def test_bad_fit_input(algo, case):
    with pytest.raises(ClusteringInputError):
        make(algo).fit(BAD_FIT_INPUT[case])


@pytest.mark.parametrize("n_clusters", [1, 0, -3, 2.5, "4"])
def test_bad_n_clusters(algo, small_digits, n_clusters):
    X, _ = small_digits
    with pytest.raises(ClusteringInputError):
        make(algo, n_clusters=n_clusters).fit(X)


def test_bad_input_to_a_fitted_model(fitted, small_digits):
    est, _ = fitted
    X, _ = small_digits
    for bad in (X[:, :10], X[:, :10].astype(np.float16), BAD_FIT_INPUT["nan"][:, :64]):
        with pytest.raises(ClusteringInputError):
            est.predict(bad)
        with pytest.raises(ClusteringInputError):
            est.predict_proba(bad)
    with pytest.raises(ClusteringInputError):
        est.update(X[:, :10])
    with pytest.raises(ClusteringInputError):
        est.update(X[: K - 1])
    with pytest.raises(ClusteringInputError):
        est.update(X, max_epochs=-1)
    with pytest.raises(ClusteringInputError):
        est.update(X, max_centroid_shift=-0.5)


# -- update ----------------------------------------------------------------------
def test_update_keeps_ids_and_reports(algo, saved, small_digits, digits_data):
    X, _ = small_digits
    est = load(str(saved))
    before = est.predict(X)
    # half of the items kept, half replaced by other digits of the same classes
    Xall, yall = digits_data
    others = Xall[np.flatnonzero(yall < K)[-150:]]
    X_new = np.vstack([X[150:], others])
    est.update(X_new, max_epochs=1, max_centroid_shift=0.05)
    info = est.update_info_
    assert {"epochs", "centroid_shift_mean", "centroid_shift_max"} <= set(info)
    assert info["centroid_shift_max"] <= 0.05 + 1e-4
    assert est.labels_.shape == (len(X_new),)
    assert est.labels_.max() < K
    # retained items mostly keep their id (a short, bounded update)
    assert np.mean(est.labels_[:150] == before[150:]) >= 0.8


# -- persistence ---------------------------------------------------------------
def test_save_load_round_trip(fitted, saved, small_digits):
    est, _ = fitted
    X, _ = small_digits
    assert sorted(p.name for p in saved.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    loaded = load(str(saved))
    assert type(loaded) is type(est)
    assert loaded.n_clusters_ == est.n_clusters_
    np.testing.assert_array_equal(loaded.predict(X), est.predict(X))
    np.testing.assert_allclose(loaded.predict_proba(X), est.predict_proba(X), rtol=1e-6, atol=1e-7)
    assert type(loaded).load(str(saved)).n_features_in_ == X.shape[1]


def _edit_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / CONFIG_FILE).read_text())
    config.update(changes)
    (path / CONFIG_FILE).write_text(json.dumps(config))


CORRUPTIONS = {
    "missing_config": lambda p: (p / CONFIG_FILE).unlink(),
    "missing_weights": lambda p: (p / WEIGHTS_FILE).unlink(),
    "bad_json": lambda p: (p / CONFIG_FILE).write_text("{not json"),
    "json_not_object": lambda p: (p / CONFIG_FILE).write_text("[1, 2]"),
    "binary_config": lambda p: (p / CONFIG_FILE).write_bytes(b"\xff\xfe\x00garbage"),
    "foreign_format": lambda p: _edit_config(p, format="someone.else"),
    "future_version": lambda p: _edit_config(p, format_version=99),
    "missing_field": lambda p: _drop_config_field(p, "params"),
    "unknown_param": lambda p: _edit_config(
        p, params={**json.loads((p / CONFIG_FILE).read_text())["params"], "evil": 1}
    ),
    "truncated_weights": lambda p: (p / WEIGHTS_FILE).write_bytes(
        (p / WEIGHTS_FILE).read_bytes()[:100]
    ),
    "empty_weights": lambda p: (p / WEIGHTS_FILE).write_bytes(b""),
    "garbage_weights": lambda p: (p / WEIGHTS_FILE).write_bytes(b"\x00" * 4096),
    "wrong_feature_count": lambda p: _edit_config(p, n_features_in_=7),
    "empty_tensors": lambda p: _write_empty_weights(p),
}


def _drop_config_field(path: Path, key: str) -> None:
    config = json.loads((path / CONFIG_FILE).read_text())
    del config[key]
    (path / CONFIG_FILE).write_text(json.dumps(config))


def _write_empty_weights(path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({"unrelated": np.zeros(3, dtype=np.float32)}, str(path / WEIGHTS_FILE))


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupted_save_dir(algo, copy_of, case):
    path = copy_of()
    CORRUPTIONS[case](path)
    with pytest.raises(ModelFormatError):
        load(str(path))


def test_not_a_directory(tmp_path):
    with pytest.raises(ModelFormatError):
        load(str(tmp_path / "missing"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelFormatError):
        load(str(tmp_path / "file"))


def test_algorithm_mismatch(algo, saved):
    other = "kmeans" if algo != "kmeans" else next(a for a in ALGORITHMS if a != "kmeans")
    with pytest.raises(ModelFormatError):
        get_class(other).load(str(saved))


def test_unknown_algorithm_in_config(copy_of):
    path = copy_of()
    _edit_config(path, algorithm="not-an-algorithm")
    # ModelFormatError is a ClusteringInputError; base.load reports the unknown
    # name through the registry's ClusteringInputError
    with pytest.raises(ClusteringInputError):
        load(str(path))
