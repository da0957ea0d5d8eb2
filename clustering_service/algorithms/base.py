"""The estimator contract shared by every clustering algorithm.

Scikit-learn conventions: ``__init__`` stores hyper-parameters only, ``fit``
returns ``self``, learned state ends with ``_``. On top of that every
estimator supports an incremental ``update``, a progress callback, a cancel
check, and pickle-free persistence (``weights.safetensors`` + ``config.json``).

Subclasses implement:

* ``_fit(X)`` -- train on validated float32 data with ``self.n_clusters_`` set;
  must set ``labels_``. It may also set ``labels_proba_`` (float32 (n,)) when its
  last pass over X computed ``predict_proba(X)`` with the final parameters: then
  ``labels_`` and ``labels_proba_`` are that pass's argmax and max, and callers
  need not run ``predict_proba`` over the training data again (fit and update
  reset it to None first).
* ``_update(X, max_epochs, max_centroid_shift, **params)`` -- warm-started
  incremental training; must set ``labels_`` and keep cluster ids.
* ``predict_proba(X)`` (via ``_predict_proba``).
* ``_state() -> (tensors, meta)`` and ``_set_state(tensors, meta)`` for save/load.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from clustering_service.algorithms.exceptions import (
    ClusteringCancelled,
    ClusteringInputError,
    ModelFormatError,
    NotFittedError,
)

FORMAT_NAME = "dinocluster.clusterer"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
# Validation of finite values is done in row chunks so a memory-mapped
# 1M x 384 input is never materialised twice.
_CHECK_CHUNK_ROWS = 65536


@dataclass
class Progress:
    """One progress event from ``fit``/``update``.

    ``epoch`` counts from 1 within ``stage``; ``epochs`` is the planned total
    for the stage (None when unknown). ``label_change`` is the fraction of
    items whose label changed since the previous report (None when not
    applicable).
    """

    stage: str
    epoch: int = 0
    epochs: int | None = None
    loss: float | None = None
    label_change: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ProgressCallback = Callable[[Progress], None]
CancelCheck = Callable[[], bool]


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available, else ``"cpu"``; other values pass through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_array(
    X: Any,
    *,
    min_samples: int = 1,
    n_features: int | None = None,
    name: str = "X",
) -> np.ndarray:
    """Validate a 2-D float matrix and return it as float32 (no copy when possible).

    Accepts float32/float16/float64 ndarrays, including ``np.memmap``. Raises
    :class:`ClusteringInputError` naming the problem: not 2-D, empty, too few
    rows, wrong number of features, non-float dtype, NaN or inf values.

    Returns ndarray of shape (n_samples, n_features), dtype float32.
    """
    if not isinstance(X, np.ndarray):
        try:
            X = np.asarray(X)
        except Exception as exc:  # ragged lists and the like
            raise ClusteringInputError(f"{name} cannot be converted to an array: {exc}") from exc
    if X.dtype.kind not in "fiu":
        raise ClusteringInputError(f"{name} must be a numeric array, got dtype {X.dtype}")
    if X.ndim != 2:
        raise ClusteringInputError(
            f"{name} must be 2-D (n_samples, n_features), got shape {X.shape}"
        )
    if X.shape[0] == 0:
        raise ClusteringInputError(f"{name} is empty (0 samples)")
    if X.shape[1] == 0:
        raise ClusteringInputError(f"{name} has 0 features")
    if X.shape[0] < min_samples:
        raise ClusteringInputError(
            f"{name} has {X.shape[0]} samples, fewer than the {min_samples} required"
        )
    if n_features is not None and X.shape[1] != n_features:
        raise ClusteringInputError(
            f"{name} has {X.shape[1]} features but the model was fitted on {n_features}"
        )
    converted = X.dtype != np.float32
    if converted:
        # checked after the cast: a finite float64 past float32's range becomes inf
        with np.errstate(over="ignore"):
            X = X.astype(np.float32)
    for start in range(0, X.shape[0], _CHECK_CHUNK_ROWS):
        chunk = X[start : start + _CHECK_CHUNK_ROWS]
        if not np.isfinite(chunk).all():
            bad = start + int(np.argwhere(~np.isfinite(chunk))[0, 0])
            beyond = " or values beyond the float32 range" if converted else ""
            raise ClusteringInputError(
                f"{name} contains NaN or infinite values{beyond} (first at row {bad})"
            )
    return X


class BaseClusterer:
    """Base class of all estimators. See the module docstring for the contract."""

    #: registry name, e.g. ``"dec"``
    name: ClassVar[str] = ""
    #: whether ``cluster_centers_`` exists for this method
    has_centers: ClassVar[bool] = True
    #: whether ``cluster_centers_`` (k, n_features_in_) lie in the input space (k-means)
    #: rather than in a learned one
    centers_in_input_space: ClassVar[bool] = False

    # Hyper-parameters common to all estimators. Subclasses list them in
    # their own ``__init__`` signature (sklearn-style ``get_params``).
    n_clusters: int | None
    random_state: int
    device: str
    progress_callback: ProgressCallback | None
    cancel_check: CancelCheck | None

    # -- parameters -------------------------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [
            p.name
            for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]

    def get_params(self) -> dict[str, Any]:
        """JSON-serialisable hyper-parameters (callbacks excluded)."""
        skip = {"progress_callback", "cancel_check"}
        return {k: getattr(self, k) for k in self._param_names() if k not in skip}

    def set_params(self, **params: Any) -> BaseClusterer:
        valid = set(self._param_names())
        for key, value in params.items():
            if key not in valid:
                raise ClusteringInputError(
                    f"unknown parameter {key!r} for {self.name}; valid: {sorted(valid)}"
                )
            setattr(self, key, value)
        return self

    def _validate_params(self) -> None:
        """Check hyper-parameters; subclasses extend (call super)."""
        if self.n_clusters is not None and (
            not isinstance(self.n_clusters, int | np.integer) or self.n_clusters < 2
        ):
            raise ClusteringInputError(
                f"n_clusters must be an integer >= 2, got {self.n_clusters!r}"
            )

    # -- progress and cancellation ---------------------------------------
    def _report(
        self,
        stage: str,
        epoch: int = 0,
        epochs: int | None = None,
        loss: float | None = None,
        label_change: float | None = None,
        **extra: Any,
    ) -> None:
        """Send a progress event and honour the cancel check (raises ClusteringCancelled)."""
        if self.progress_callback is not None:
            self.progress_callback(
                Progress(
                    stage,
                    epoch,
                    epochs,
                    None if loss is None else float(loss),
                    None if label_change is None else float(label_change),
                    extra,
                )
            )
        self._check_cancel()

    def _check_cancel(self) -> None:
        if self.cancel_check is not None and self.cancel_check():
            raise ClusteringCancelled(f"{self.name} cancelled by caller")

    # -- fit / predict / update -------------------------------------------
    def fit(self, X: Any, y: Any = None) -> BaseClusterer:
        """Train on ``X`` of shape (n_samples, n_features). ``y`` is ignored.

        When ``n_clusters`` is None the number of clusters is chosen
        automatically (see :mod:`clustering_service.algorithms.autok`) and the
        scores are kept in ``k_selection_``.
        """
        self._validate_params()
        X = check_array(X, min_samples=2)
        if self.n_clusters is None:
            from clustering_service.algorithms.autok import choose_k

            self.k_selection_ = choose_k(X, random_state=self.random_state)
            self.n_clusters_ = int(self.k_selection_["best_k"])
        else:
            self.k_selection_ = None
            self.n_clusters_ = int(self.n_clusters)
        if X.shape[0] < self.n_clusters_:
            raise ClusteringInputError(
                f"X has {X.shape[0]} samples, fewer than n_clusters={self.n_clusters_}"
            )
        self.n_features_in_ = int(X.shape[1])
        self.device_ = resolve_device(self.device)
        self.labels_proba_: np.ndarray | None = None
        self._fit(X)
        return self

    def fit_predict(self, X: Any, y: Any = None) -> np.ndarray:
        return self.fit(X).labels_

    def predict_proba(self, X: Any) -> np.ndarray:
        """Soft assignments, ndarray of shape (n_samples, n_clusters_), rows sum to 1."""
        self._check_fitted()
        X = check_array(X, n_features=self.n_features_in_)
        return self._predict_proba(X)

    def predict(self, X: Any) -> np.ndarray:
        """Hard assignments, ndarray of shape (n_samples,), int64 in [0, n_clusters_)."""
        self._check_fitted()
        X = check_array(X, n_features=self.n_features_in_)
        return self._predict(X)

    def _predict(self, X: np.ndarray) -> np.ndarray:
        return self._predict_proba(X).argmax(axis=1).astype(np.int64)

    def update(
        self,
        X: Any,
        *,
        max_epochs: int | None = None,
        max_centroid_shift: float | None = None,
        **params: Any,
    ) -> BaseClusterer:
        """Incrementally adapt the fitted model to ``X`` (the current dataset:
        retained items plus new ones), warm-started from the fitted state.

        Cluster ids keep their meaning. ``max_epochs`` bounds training,
        ``max_centroid_shift`` bounds how far any centre may move (in the
        model's clustering space, Euclidean). Sets ``labels_`` for ``X`` and
        ``update_info_`` (dict: epochs run, centroid shift mean/max, ...).
        """
        self._check_fitted()
        X = check_array(X, min_samples=self.n_clusters_, n_features=self.n_features_in_)
        if max_epochs is not None and (not isinstance(max_epochs, int) or max_epochs < 0):
            raise ClusteringInputError(f"max_epochs must be an integer >= 0, got {max_epochs!r}")
        if max_centroid_shift is not None and not max_centroid_shift >= 0:
            raise ClusteringInputError(
                f"max_centroid_shift must be >= 0, got {max_centroid_shift!r}"
            )
        self.device_ = resolve_device(self.device)
        self.labels_proba_ = None
        self._update(X, max_epochs=max_epochs, max_centroid_shift=max_centroid_shift, **params)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "n_features_in_"):
            raise NotFittedError(f"this {self.name} estimator is not fitted yet; call fit first")

    # -- subclass hooks ----------------------------------------------------
    def _fit(self, X: np.ndarray) -> None:
        raise NotImplementedError

    def _update(
        self,
        X: np.ndarray,
        *,
        max_epochs: int | None,
        max_centroid_shift: float | None,
        **params: Any,
    ) -> None:
        raise NotImplementedError

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Learned state: (named float/int arrays for safetensors, JSON-able metadata)."""
        raise NotImplementedError

    def _set_state(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        raise NotImplementedError

    # -- persistence ---------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` and ``weights.safetensors`` into ``directory``.

        Files are written to temporaries and renamed, so an interrupted save
        never leaves a half-written model behind under the final names.
        """
        from safetensors.numpy import save_file

        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors, meta = self._state()
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        config = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "algorithm": self.name,
            "params": self.get_params(),
            "n_clusters_": self.n_clusters_,
            "n_features_in_": self.n_features_in_,
            "k_selection_": getattr(self, "k_selection_", None),
            "state": meta,
        }
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as tmp:
            tmp_weights = Path(tmp.name)
        save_file(tensors, str(tmp_weights))
        tmp_config = directory / (CONFIG_FILE + ".tmp")
        tmp_config.write_text(json.dumps(config, indent=2, default=_json_default))
        os.replace(tmp_weights, directory / WEIGHTS_FILE)
        os.replace(tmp_config, directory / CONFIG_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str], device: str = "cpu") -> BaseClusterer:
        """Load an estimator written by :meth:`save` (on ``device``, CPU by default).

        Called on the base class it dispatches on the saved algorithm name;
        called on a subclass it also checks the algorithm matches.
        """
        from clustering_service.algorithms.registry import get_class

        config, tensors = read_model_dir(directory)
        algo = config["algorithm"]
        klass = get_class(algo)
        if cls is not BaseClusterer and klass is not cls:
            raise ModelFormatError(f"{directory} holds a {algo!r} model, not {cls.name!r}")
        try:
            est = klass(**config["params"])
        except TypeError as exc:
            raise ModelFormatError(f"{directory}: parameters do not fit {algo}: {exc}") from exc
        est.device = device
        est.device_ = resolve_device(device)
        est.n_clusters_ = int(config["n_clusters_"])
        est.n_features_in_ = int(config["n_features_in_"])
        est.k_selection_ = config.get("k_selection_")
        try:
            est._set_state(tensors, config.get("state") or {})
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelFormatError(
                f"{directory}: saved state is incomplete or corrupted: {exc}"
            ) from exc
        return est


def read_model_dir(
    directory: str | os.PathLike[str],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read and check ``config.json`` + ``weights.safetensors``; no code is executed.

    Raises :class:`ModelFormatError` for a missing, corrupted or foreign directory.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not directory.is_dir():
        raise ModelFormatError(f"{directory} is not a directory")
    if not config_path.is_file() or not weights_path.is_file():
        raise ModelFormatError(
            f"{directory} is not a saved clustering model (needs {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise ModelFormatError(f"{config_path} was not written by dinocluster (format field)")
    if config.get("format_version") != FORMAT_VERSION:
        raise ModelFormatError(
            f"{config_path} has format_version {config.get('format_version')!r}; "
            f"this version reads {FORMAT_VERSION}"
        )
    for key in ("algorithm", "params", "n_clusters_", "n_features_in_"):
        if key not in config:
            raise ModelFormatError(f"{config_path} lacks the field {key!r}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFormatError(f"{weights_path} is corrupted: {exc}") from exc
    return config, tensors


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj)}")
