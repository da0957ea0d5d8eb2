"""Deep Embedded Clustering (Xie et al. 2016, arXiv 1511.06335) with IDEC's
reconstruction term (Guo et al. 2017).

Three stages:

1. **Denoising autoencoder.** The input is standardised with a stored mean
   vector and ONE global scale (per-dimension RMS 1 on average), so the geometry
   of X is kept and the same defaults fit pixels in [0, 1] and L2-normalised
   embeddings alike. An MLP encoder ``d -> hidden_dims -> latent_dim`` and a
   mirrored decoder are trained with MSE on corrupted input (masking noise:
   each standardised value set to 0, the mean, with probability
   ``noise_level``; or Gaussian noise of that std). ``pretrain="layerwise"``
   is the paper's schedule instead: each encoder/decoder pair is trained alone
   as a denoising autoencoder (dropout) of the frozen layers below it, then
   the stack is fine-tuned without corruption.
2. **Initial centres.** ``init_space="input"`` (default): k-means
   (``kmeans_n_init`` restarts, best by inertia) on X itself, i.e. the
   partition of the k-means baseline, and the centres are its clusters' mean
   latent codes; ``"latent"``: k-means on the latent codes, as in the paper.
   The paper's choice made DEC's outcome hinge on how the auto-encoder of one
   seed happened to lay out the 10-d latent: on StackOverflow's real
   all-MiniLM-L6-v2 embeddings one seed of three ended at 0.698 ACC against
   0.722 for k-means; from the input partition the same seed reached 0.753,
   and digits kept its gain (docs/benchmarks/deep_frozen.md). The clustering
   stage itself is the paper's: only its starting partition differs.
   The latent is then rescaled by one scalar so that the mean squared
   distance of a code to its centre is ``latent_spread * alpha``. This is what
   keeps the soft assignment informative: the Student's t kernel has width
   ``alpha``, and with codes whose clusters are a small fraction of that width
   apart (the seed's DEC: centres 0.2-1.0 apart in an L2-normalised latent) ``q``
   is almost uniform and the KL loss has nothing to sharpen. Past a few widths
   ``q`` tends to a scale-free power law of the distances, so a large spread
   (default 10) is safe.
3. **Clustering.** ``q_ij ∝ (1 + |z_i - mu_j|^2 / alpha) ^ -((alpha + 1) / 2)``;
   the target ``p_ij ∝ q_ij^2 / f_j`` (``f_j = sum_i q_ij``) is recomputed over
   the WHOLE dataset every ``update_interval`` iterations; the encoder and the
   centres (an ``nn.Parameter`` handed to the optimiser) minimise
   ``KL(P || Q) + gamma * MSE(decoder(z), x)`` (``gamma = 0`` is plain DEC).
   Training stops once fewer than ``tol`` of the labels change between two
   target updates, or after ``cluster_epochs`` passes over the data.

Space of the centres: ``cluster_centers_`` are points in the (rescaled)
latent space, shape ``(n_clusters_, latent_dim)``, the same space as
:meth:`DEC.transform`; ``max_centroid_shift`` of :meth:`update` is a
Euclidean distance there. ``predict_proba`` is ``q``; ``predict`` its argmax,
which is the nearest centre in the latent space.

Memory and cost: one pass over X per epoch in mini-batches (rows gathered by
sorted index, so memory-mapped X is read, never copied); the only full-size
arrays are the latent codes ``(N, latent_dim)`` and ``Q``/``P`` ``(N, k)``,
all float32.

Incremental update (:meth:`DEC.update`), both ideas of the seed, warm-started
from the fitted encoder and centres, ids kept:

* ``"move_centroids"``: encode X with the current encoder, k-means on the
  codes, match the new centres to the old ones (Hungarian on distances), move
  each old centre ``move_fraction`` of the way toward its match, then a few
  clustering epochs with the penalty ``shift_penalty * mean_j |mu_j -
  parent_j|^2``;
* ``"refit_target"``: a few clustering epochs from the current encoder and
  centres.

After every optimiser step each centre is projected back into the ball of
radius ``max_centroid_shift`` around its parent.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clustering_service.algorithms.base import BaseClusterer, check_array
from clustering_service.algorithms.exceptions import ClusteringInputError
from clustering_service.algorithms.nn import (
    INFERENCE_BATCH,
    load_numpy_state,
    make_mlp,
    seed_everything,
    state_to_numpy,
)
from clustering_service.algorithms.nn import step_threads as _step_threads

#: samples the automatic pre-training schedule shows the autoencoder (about
#: 4000 steps of 256 rows): ``ceil(PRETRAIN_SAMPLES / N)`` epochs, at least 1, at
#: most ``MAX_AUTO_EPOCHS``. A fixed number of steps rather than of epochs: with
#: 200 epochs at most, 898 digits got 800 steps and DEC's ACC ranged 0.73-0.82
#: over seeds; 4000 steps gave 0.82-0.83 (docs/benchmarks/dec.md).
PRETRAIN_SAMPLES = 1_000_000
#: the same for the clustering stage, which usually stops earlier on ``tol``
CLUSTER_SAMPLES = 500_000
#: rows an update sees when the caller gives no ``max_epochs``: ``update_epochs``
#: epochs up to 20k rows, a fraction of one epoch above 60k
UPDATE_SAMPLES = 60_000
#: the cap only bites below 500 rows (PRETRAIN_SAMPLES / MAX_AUTO_EPOCHS)
MAX_AUTO_EPOCHS = 2000
#: iterations between cancel checks inside an epoch (an epoch over 1M rows is long)
_CANCEL_EVERY = 200
UPDATE_STRATEGIES = ("move_centroids", "refit_target")
PRETRAIN_MODES = ("end_to_end", "layerwise")
NOISE_KINDS = ("mask", "gaussian")
INIT_SPACES = ("latent", "input")


class _AutoEncoder(nn.Module):
    """Standardiser + MLP encoder/decoder; the latent is multiplied by ``z_scale``.

    ``decode`` works in standardised input space (the reconstruction target).
    """

    def __init__(self, n_features: int, hidden_dims: list[int], latent_dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("z_scale", torch.ones(1))
        self.encoder = make_mlp([n_features, *hidden_dims, latent_dim])
        self.decoder = make_mlp([latent_dim, *reversed(hidden_dims), n_features])

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale

    def encode_standardized(self, xs: torch.Tensor) -> torch.Tensor:
        return self.encoder(xs) * self.z_scale

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_standardized(self.standardize(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z / self.z_scale)


def log_soft_assignment(z: torch.Tensor, centers: torch.Tensor, alpha: float) -> torch.Tensor:
    """``log q`` of the Student's t soft assignment, shape (n, k).

    ``q_ij ∝ (1 + |z_i - mu_j|^2 / alpha) ^ -((alpha + 1) / 2)``, normalised over
    j in log space (log-softmax), so the log is taken exactly once and ``q`` never
    underflows to an infinite log.
    """
    d2 = (
        (z * z).sum(dim=1, keepdim=True)
        - 2.0 * z @ centers.T
        + (centers * centers).sum(dim=1)[None, :]
    ).clamp_min(0.0)
    logits = -0.5 * (alpha + 1.0) * torch.log1p(d2 / alpha)
    return torch.log_softmax(logits, dim=1)


def target_distribution(q: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """DEC target ``p_ij = (q_ij^2 / f_j) / sum_j' (q_ij'^2 / f_j')``, ``f_j = sum_i q_ij``.

    ``q`` (n, k) rows sum to 1; computed in row chunks; ``out`` may be ``q``
    itself (in place), so the whole dataset needs one (n, k) array.
    """
    f = np.zeros(q.shape[1])
    for start in range(0, q.shape[0], INFERENCE_BATCH):
        f += q[start : start + INFERENCE_BATCH].sum(axis=0, dtype=np.float64)
    inv_f = (1.0 / np.maximum(f, 1e-12)).astype(np.float32)
    if out is None:
        out = np.empty_like(q)
    for start in range(0, q.shape[0], INFERENCE_BATCH):
        w = q[start : start + INFERENCE_BATCH] ** 2 * inv_f
        out[start : start + INFERENCE_BATCH] = w / w.sum(axis=1, keepdims=True)
    return out


def project_to_ball(centers: torch.Tensor, parents: torch.Tensor, radius: float) -> int:
    """Move each row of ``centers`` IN PLACE back into the ball of ``radius``
    around the same row of ``parents``; returns how many were clipped."""
    delta = centers - parents
    norm = delta.norm(dim=1, keepdim=True)
    over = norm > radius
    if not bool(over.any()):
        return 0
    factor = torch.where(over, radius / norm.clamp_min(1e-12), torch.ones_like(norm))
    centers.copy_(parents + delta * factor)
    return int(over.sum())


class DEC(BaseClusterer):
    """Deep Embedded Clustering (see the module docstring).

    Parameters
    ----------
    n_clusters : int, number of clusters (None: chosen automatically by ``fit``).
    hidden_dims : widths of the encoder's hidden layers (the decoder mirrors them).
    latent_dim : width of the latent (clustering) space.
    noise : ``"mask"`` (set standardised values to 0, the feature mean, with
        probability ``noise_level``) or ``"gaussian"`` (add noise of std
        ``noise_level``; standardised input has per-dimension RMS 1).
    noise_level : corruption strength for pre-training.
    pretrain : ``"end_to_end"`` (default): the whole autoencoder is trained on
        corrupted input; ``"layerwise"`` (the paper's): each encoder layer and
        its mirror in the decoder are first trained alone as a one-layer
        denoising autoencoder of the (frozen) layers below, with dropout of rate
        ``noise_level`` on their input and hidden units, for half of
        ``pretrain_epochs`` each; then the stacked autoencoder is fine-tuned for
        ``pretrain_epochs`` without corruption. On 10,000 real MNIST digits both
        schedules gave 0.60-0.73 ACC at the budgets tried here, against 0.53
        for k-means; on all 70,000, 150 end-to-end epochs without corruption
        gave 0.82 (the paper: 0.84; docs/benchmarks/dec.md).
    pretrain_epochs : autoencoder epochs; None: ``ceil(PRETRAIN_SAMPLES / N)``
        clipped to [1, MAX_AUTO_EPOCHS] (about 4000 steps; 1 epoch from 1M rows).
    batch_size : mini-batch size of both stages.
    lr : Adam learning rate of pre-training.
    cluster_lr : Adam learning rate of the clustering stage and of updates.
    kmeans_n_init : k-means restarts for the initial centres.
    init_space : ``"input"`` (default): k-means on X itself (best of
        ``kmeans_n_init`` restarts by inertia, the k-means baseline's
        partition), the initial centres being its clusters' mean codes;
        ``"latent"``: k-means on the latent codes (the paper).
    alpha : degrees of freedom of the Student's t kernel.
    latent_spread : the latent is rescaled so that the mean squared distance of a
        code to its initial centre is ``latent_spread * alpha``. 1 left q flat
        (mean max q 0.4-0.5 on digits) and cost 0.03 ACC; 10 and 100 did equally
        well (docs/benchmarks/dec.md).
    gamma : weight of the IDEC reconstruction loss during clustering (0: plain DEC).
    cluster_epochs : most passes over the data in the clustering stage; None:
        ``ceil(CLUSTER_SAMPLES / N)`` clipped to [1, MAX_AUTO_EPOCHS].
    update_interval : iterations between target recomputations over the whole
        data; None: one epoch.
    tol : stop once fewer than this fraction of labels change between targets.
    update_strategy : default ``strategy`` of :meth:`update`.
    update_epochs : default ``max_epochs`` of :meth:`update`; with that default the
        update also stops after ``UPDATE_SAMPLES`` rows, so at 1M rows it costs
        a fraction of a fit (whose schedule is then 1 + 1 epochs).
    move_fraction : ``"move_centroids"``: fraction of the way each centre moves
        toward its matched new k-means centre.
    shift_penalty : weight of ``mean_j |mu_j - parent_j|^2`` during updates.
    """

    name: ClassVar[str] = "dec"

    def __init__(
        self,
        n_clusters: int | None = 8,
        random_state: int = 0,
        device: str = "auto",
        progress_callback=None,
        cancel_check=None,
        hidden_dims: tuple[int, ...] | list[int] = (256, 256),
        latent_dim: int = 10,
        noise: str = "mask",
        noise_level: float = 0.2,
        pretrain: str = "end_to_end",
        pretrain_epochs: int | None = None,
        batch_size: int = 256,
        lr: float = 1e-3,
        cluster_lr: float = 1e-3,
        kmeans_n_init: int = 20,
        init_space: str = "input",
        alpha: float = 1.0,
        latent_spread: float = 10.0,
        gamma: float = 0.1,
        cluster_epochs: int | None = None,
        update_interval: int | None = None,
        tol: float = 0.001,
        update_strategy: str = "refit_target",
        update_epochs: int = 3,
        move_fraction: float = 0.5,
        shift_penalty: float = 1.0,
    ) -> None:
        self.n_clusters = n_clusters
        self.random_state = random_state
        self.device = device
        self.progress_callback = progress_callback
        self.cancel_check = cancel_check
        self.hidden_dims = hidden_dims
        self.latent_dim = latent_dim
        self.noise = noise
        self.noise_level = noise_level
        self.pretrain = pretrain
        self.pretrain_epochs = pretrain_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.cluster_lr = cluster_lr
        self.kmeans_n_init = kmeans_n_init
        self.init_space = init_space
        self.alpha = alpha
        self.latent_spread = latent_spread
        self.gamma = gamma
        self.cluster_epochs = cluster_epochs
        self.update_interval = update_interval
        self.tol = tol
        self.update_strategy = update_strategy
        self.update_epochs = update_epochs
        self.move_fraction = move_fraction
        self.shift_penalty = shift_penalty

    # -- parameters ------------------------------------------------------------
    def _validate_params(self) -> None:
        super()._validate_params()
        dims = self.hidden_dims
        if not isinstance(dims, list | tuple) or not all(
            isinstance(h, int | np.integer) and h >= 1 for h in dims
        ):
            raise ClusteringInputError(f"hidden_dims must be a list of integers >= 1, got {dims!r}")
        for key in ("latent_dim", "batch_size", "kmeans_n_init"):
            value = getattr(self, key)
            if not isinstance(value, int | np.integer) or value < 1:
                raise ClusteringInputError(f"{key} must be an integer >= 1, got {value!r}")
        for key in ("pretrain_epochs", "cluster_epochs", "update_interval"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int | np.integer) or value < 1):
                raise ClusteringInputError(f"{key} must be None or an integer >= 1, got {value!r}")
        if not isinstance(self.update_epochs, int | np.integer) or self.update_epochs < 0:
            raise ClusteringInputError(
                f"update_epochs must be an integer >= 0, got {self.update_epochs!r}"
            )
        if self.noise not in NOISE_KINDS:
            raise ClusteringInputError(f"noise must be one of {NOISE_KINDS}, got {self.noise!r}")
        if self.noise == "mask" and not 0.0 <= self.noise_level < 1.0:
            raise ClusteringInputError(
                f"noise_level must be in [0, 1) for masking noise, got {self.noise_level!r}"
            )
        if self.pretrain not in PRETRAIN_MODES:
            raise ClusteringInputError(
                f"pretrain must be one of {PRETRAIN_MODES}, got {self.pretrain!r}"
            )
        if self.pretrain == "layerwise" and not 0.0 <= self.noise_level < 1.0:
            raise ClusteringInputError(
                f"noise_level must be in [0, 1) for layer-wise dropout, got {self.noise_level!r}"
            )
        if self.init_space not in INIT_SPACES:
            raise ClusteringInputError(
                f"init_space must be one of {INIT_SPACES}, got {self.init_space!r}"
            )
        if self.update_strategy not in UPDATE_STRATEGIES:
            raise ClusteringInputError(
                f"update_strategy must be one of {UPDATE_STRATEGIES}, got {self.update_strategy!r}"
            )
        if not 0.0 <= self.move_fraction <= 1.0:
            raise ClusteringInputError(
                f"move_fraction must be in [0, 1], got {self.move_fraction!r}"
            )
        for key in ("lr", "cluster_lr", "alpha", "latent_spread"):
            if not getattr(self, key) > 0:
                raise ClusteringInputError(f"{key} must be > 0, got {getattr(self, key)!r}")
        for key in ("noise_level", "gamma", "tol", "shift_penalty"):
            if not getattr(self, key) >= 0:
                raise ClusteringInputError(f"{key} must be >= 0, got {getattr(self, key)!r}")

    def _auto_epochs(self, value: int | None, samples: int, n: int) -> int:
        if value is not None:
            return int(value)
        return int(min(MAX_AUTO_EPOCHS, max(1, math.ceil(samples / n))))

    # -- helpers ---------------------------------------------------------------
    def _to_tensor(self, rows: np.ndarray) -> torch.Tensor:
        arr = np.ascontiguousarray(rows, dtype=np.float32)
        if not arr.flags.writeable:  # a slice of a read-only memmap; torch wants its own buffer
            arr = arr.copy()
        return torch.from_numpy(arr).to(self.device_)

    def _batches(self, n: int, gen: torch.Generator) -> Iterator[np.ndarray]:
        """Endless stream of sorted index batches, a fresh permutation per epoch."""
        while True:
            perm = torch.randperm(n, generator=gen).numpy()
            for start in range(0, n, self.batch_size):
                yield np.sort(perm[start : start + self.batch_size])

    def _corrupt(self, xs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.noise_level == 0:
            return xs
        if self.noise == "mask":
            keep = torch.rand(xs.shape, generator=gen) >= self.noise_level
            return xs * keep.to(xs.device)
        return xs + self.noise_level * torch.randn(xs.shape, generator=gen).to(xs.device)

    def _fit_standardizer(self, X: np.ndarray) -> None:
        """Mean vector and one global scale (RMS over all dims), one chunked float64 pass."""
        n, d = X.shape
        total = np.zeros(d)
        total_sq = 0.0
        for start in range(0, n, INFERENCE_BATCH):
            chunk = np.asarray(X[start : start + INFERENCE_BATCH], dtype=np.float64)
            total += chunk.sum(axis=0)
            total_sq += float((chunk * chunk).sum())
        mean = total / n
        var = max(total_sq / n - float(mean @ mean), 0.0) / d
        self.ae_.mean.copy_(torch.from_numpy(mean).float())
        self.ae_.scale.fill_(math.sqrt(var) if var > 1e-12 else 1.0)

    def _inference_encoder(self) -> nn.Sequential:
        """Eval-mode copy of the encoder with the input standardisation folded
        into its first layer and ``z_scale`` into its last: the same function
        with two fewer passes over each chunk (predict at d=384, k=100 on one
        thread: 187k -> 205k rows/s).

        Built once per state of the weights: the copy cost 10 ms, which was all of
        a one-row prediction. The key is the weights' in-place version counters,
        so any training step or loaded state makes a fresh copy.
        """
        tensors = (*self.ae_.encoder.parameters(), self.ae_.mean, self.ae_.scale, self.ae_.z_scale)
        key = (id(self.ae_), *(t._version for t in tensors))
        cached = getattr(self, "_folded_encoder", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        enc = copy.deepcopy(self.ae_.encoder).eval().requires_grad_(False)
        linears = [m for m in enc if isinstance(m, nn.Linear)]
        first, last = linears[0], linears[-1]
        scale, z_scale = self.ae_.scale, self.ae_.z_scale
        first.bias.sub_(first.weight @ self.ae_.mean / scale)
        first.weight.div_(scale)
        last.weight.mul_(z_scale[:, None])
        last.bias.mul_(z_scale)
        self._folded_encoder = (key, enc)
        return enc

    def _map_codes(
        self, X: np.ndarray, fn: Callable[[torch.Tensor], torch.Tensor], out: np.ndarray
    ) -> np.ndarray:
        """``out[rows] = fn(latent codes of rows)`` over X in chunks (memory: one chunk)."""
        enc = self._inference_encoder()
        with torch.inference_mode():
            for start in range(0, X.shape[0], INFERENCE_BATCH):
                z = enc(self._to_tensor(X[start : start + INFERENCE_BATCH]))
                out[start : start + z.shape[0]] = fn(z).cpu().numpy()
        return out

    def _encode_all(self, X: np.ndarray) -> np.ndarray:
        """Latent codes of X, float32 (n, latent_dim)."""
        out = np.empty((X.shape[0], self.latent_dim), dtype=np.float32)
        return self._map_codes(X, lambda z: z, out)

    def _soft_all(self, X: np.ndarray, centers: torch.Tensor) -> np.ndarray:
        """q over X, float32 (n, k)."""
        out = np.empty((X.shape[0], centers.shape[0]), dtype=np.float32)
        centers = centers.detach()
        return self._map_codes(X, lambda z: log_soft_assignment(z, centers, self.alpha).exp(), out)

    def _kmeans_callback(self, restart: int, n_init: int, inertia: float) -> None:
        self._check_cancel()

    def _centers_tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.cluster_centers_).to(self.device_)

    # -- stage 1: autoencoder --------------------------------------------------
    def _pretrain(self, X: np.ndarray, gen: torch.Generator) -> float:
        """Stage 1; returns the last epoch's mean reconstruction loss."""
        epochs = self._auto_epochs(self.pretrain_epochs, PRETRAIN_SAMPLES, X.shape[0])
        if self.pretrain == "layerwise":
            self._pretrain_layers(X, gen, max(1, epochs // 2))
            return self._train_autoencoder(X, gen, epochs, corrupt=False, stage="finetune")
        return self._train_autoencoder(X, gen, epochs, corrupt=True, stage="pretrain")

    def _train_autoencoder(
        self, X: np.ndarray, gen: torch.Generator, epochs: int, *, corrupt: bool, stage: str
    ) -> float:
        """``epochs`` of MSE between the decoded (optionally corrupted) input and the input."""

        def loss(xs: torch.Tensor) -> torch.Tensor:
            noisy = self._corrupt(xs, gen) if corrupt else xs
            return F.mse_loss(self.ae_.decoder(self.ae_.encoder(noisy)), xs)

        return self._epochs(X, gen, epochs, self.ae_.parameters(), loss, stage)

    def _epochs(
        self,
        X: np.ndarray,
        gen: torch.Generator,
        epochs: int,
        params: Iterator[nn.Parameter],
        loss_fn: Callable[[torch.Tensor], torch.Tensor],
        stage: str,
        **extra: Any,
    ) -> float:
        """``epochs`` passes of Adam on ``loss_fn(standardised batch)`` over ``params``,
        one progress event per epoch; returns the last epoch's mean loss."""
        n = X.shape[0]
        steps = math.ceil(n / self.batch_size)
        opt = torch.optim.Adam(params, lr=self.lr)
        batches = self._batches(n, gen)
        self.ae_.train()
        loss_mean = float("nan")
        for epoch in range(1, epochs + 1):
            total = 0.0
            with _step_threads(self.device_):
                for step in range(steps):
                    loss = loss_fn(self.ae_.standardize(self._to_tensor(X[next(batches)])))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach())
                    if step % _CANCEL_EVERY == _CANCEL_EVERY - 1:
                        self._check_cancel()
            loss_mean = total / steps
            self._report(stage, epoch, epochs, loss_mean, **extra)
        return loss_mean

    def _dropout(self, h: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Dropout of rate ``noise_level`` (kept units scaled by 1 / (1 - rate))."""
        if self.noise_level == 0:
            return h
        keep = (torch.rand(h.shape, generator=gen) >= self.noise_level).to(h.device)
        return h * keep / (1.0 - self.noise_level)

    def _pretrain_layers(self, X: np.ndarray, gen: torch.Generator, epochs: int) -> None:
        """Greedy layer-wise pre-training (Xie et al. 2016, section 3.2): encoder
        layer i and decoder layer L-1-i form a one-hidden-layer denoising
        autoencoder of the output of encoder layers 0..i-1 (frozen), with dropout
        on its input and its hidden units. The activations are those of the
        stacked network: ReLU everywhere except the latent layer and the
        reconstruction of the data."""
        enc = self.ae_.encoder  # [Linear, ReLU] * (L - 1) + [Linear]
        dec = self.ae_.decoder
        n_layers = len(self.hidden_dims) + 1
        for i in range(n_layers):
            e_lin, d_lin = enc[2 * i], dec[2 * (n_layers - 1 - i)]
            below = enc[: 2 * i]

            def loss(xs: torch.Tensor, i=i, e_lin=e_lin, d_lin=d_lin, below=below) -> torch.Tensor:
                with torch.no_grad():
                    h = below(xs)
                z = e_lin(self._dropout(h, gen))
                if i < n_layers - 1:
                    z = F.relu(z)
                rec = d_lin(self._dropout(z, gen))
                if i > 0:
                    rec = F.relu(rec)
                return F.mse_loss(rec, h)

            params = [*e_lin.parameters(), *d_lin.parameters()]
            self._epochs(
                X, gen, epochs, params, loss, "pretrain_layer", layer=i + 1, layers=n_layers
            )

    # -- stage 3: clustering (fit and update) ----------------------------------
    def _cluster(
        self,
        X: np.ndarray,
        start_centers: np.ndarray,
        prev_labels: np.ndarray,
        gen: torch.Generator,
        *,
        max_epochs: int,
        max_samples: int | None = None,
        stage: str,
        parents: np.ndarray | None = None,
        penalty: float = 0.0,
        max_shift: float | None = None,
        tol: float | None = None,
    ) -> dict[str, Any]:
        """Train encoder + centres on KL(P || Q) (+ gamma * reconstruction).

        The target P is recomputed over all of X every ``update_interval``
        iterations; stops when fewer than ``tol`` labels change between two
        targets (the first compared with ``prev_labels``) or after
        ``max_epochs`` passes (or ``max_samples`` rows, when given). Sets
        ``cluster_centers_`` and ``labels_``.
        """
        n = X.shape[0]
        tol = self.tol if tol is None else tol
        steps_per_epoch = math.ceil(n / self.batch_size)
        interval = self.update_interval or steps_per_epoch
        max_iters = max_epochs * steps_per_epoch
        if max_samples is not None:
            max_iters = min(max_iters, math.ceil(max_samples / self.batch_size))
        rounds = math.ceil(max_iters / interval)
        centers = nn.Parameter(
            torch.from_numpy(np.array(start_centers, np.float32)).to(self.device_)
        )
        # the parameter object the optimiser holds is the one trained and read
        # back at the end (replacing it after this line would freeze the centres)
        params = [*self.ae_.encoder.parameters(), centers]
        if self.gamma > 0:
            params += list(self.ae_.decoder.parameters())
        opt = torch.optim.Adam(params, lr=self.cluster_lr)
        parents_t = None if parents is None else torch.from_numpy(parents).to(self.device_)
        batches = self._batches(n, gen)
        labels = prev_labels
        it = 0
        loss_mean = None
        n_rounds = 0
        converged = False
        self.ae_.train()
        while True:
            q = self._soft_all(X, centers.detach())
            new_labels = q.argmax(axis=1)
            change = float(np.mean(new_labels != labels))
            labels = new_labels
            sizes = np.bincount(labels, minlength=centers.shape[0])
            self._report(
                stage,
                n_rounds,
                rounds,
                loss_mean,
                change,
                sizes=sizes.tolist(),
                size_min=int(sizes.min()),
                size_max=int(sizes.max()),
                mean_max_q=float(np.mean(q.max(axis=1))),
            )
            # round 0 compares q's argmax with the labels it started from, which
            # agree by construction in fit; only trained rounds may stop
            if n_rounds > 0 and change < tol:
                converged = True
                break
            if it >= max_iters:
                break
            p = target_distribution(q, out=q)
            total = 0.0
            count = 0
            with _step_threads(self.device_):
                for _ in range(min(interval, max_iters - it)):
                    idx = next(batches)
                    x = self._to_tensor(X[idx])
                    xs = self.ae_.standardize(x)
                    z = self.ae_.encode_standardized(xs)
                    log_q = log_soft_assignment(z, centers, self.alpha)
                    loss = F.kl_div(
                        log_q, torch.from_numpy(p[idx]).to(self.device_), reduction="batchmean"
                    )
                    if self.gamma > 0:
                        loss = loss + self.gamma * F.mse_loss(self.ae_.decode(z), xs)
                    if penalty > 0 and parents_t is not None:
                        loss = loss + penalty * ((centers - parents_t) ** 2).sum(dim=1).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if max_shift is not None and parents_t is not None:
                        with torch.no_grad():
                            project_to_ball(centers.data, parents_t, max_shift)
                    total += float(loss.detach())
                    count += 1
                    it += 1
                    if it % _CANCEL_EVERY == 0:
                        self._check_cancel()
            loss_mean = total / max(count, 1)
            n_rounds += 1
            # free the (N, k) target before the next soft assignment allocates its own
            q = p = None
        self.cluster_centers_ = centers.detach().cpu().numpy().astype(np.float32)
        self.labels_ = labels.astype(np.int64)
        # q is predict_proba(X) with the final parameters (the loop leaves right after
        # computing it): its max spares the caller another pass over X
        self.labels_proba_ = q.max(axis=1)
        return {
            "epochs": it / steps_per_epoch,
            "iterations": it,
            "target_updates": n_rounds,
            "converged": converged,
            "loss": loss_mean,
            "last_label_change": change,
        }

    # -- fit -------------------------------------------------------------------
    def _fit(self, X: np.ndarray) -> None:
        from clustering_service.algorithms.kmeans import run_kmeans

        n = X.shape[0]
        gen = seed_everything(self.random_state)
        self.ae_ = _AutoEncoder(self.n_features_in_, list(self.hidden_dims), self.latent_dim)
        self.ae_.to(self.device_)
        self._fit_standardizer(X)
        self.pretrain_loss_ = self._pretrain(X, gen)

        self._report("kmeans_init", 0, 1)
        codes = self._encode_all(X)
        if self.init_space == "latent":
            centers, labels, inertia = run_kmeans(
                codes,
                self.n_clusters_,
                n_init=self.kmeans_n_init,
                random_state=self.random_state,
                callback=self._kmeans_callback,
            )
        else:
            # k-means on X itself, the partition of the k-means baseline; its
            # clusters' mean codes are the initial centres in the latent space
            _, labels, _ = run_kmeans(
                X,
                self.n_clusters_,
                n_init=self.kmeans_n_init,
                random_state=self.random_state,
                callback=self._kmeans_callback,
            )
            centers, inertia = _latent_means(codes, labels, self.n_clusters_)
        del codes
        within = inertia / n
        z_scale = math.sqrt(self.latent_spread * self.alpha / within) if within > 1e-20 else 1.0
        self.ae_.z_scale.fill_(z_scale)
        centers = centers * np.float32(z_scale)
        self._report("kmeans_init", 1, 1, inertia=float(inertia), z_scale=z_scale)

        epochs = self._auto_epochs(self.cluster_epochs, CLUSTER_SAMPLES, n)
        self.fit_info_ = self._cluster(X, centers, labels, gen, max_epochs=epochs, stage="cluster")
        moved = np.linalg.norm(self.cluster_centers_ - centers, axis=1)
        self.fit_info_.update(
            pretrain_loss=self.pretrain_loss_,
            z_scale=z_scale,
            # how far the clustering stage took the centres from k-means (latent units)
            centroid_shift_mean=float(moved.mean()),
            centroid_shift_max=float(moved.max()),
        )

    # -- inference -------------------------------------------------------------
    def transform(self, X: Any) -> np.ndarray:
        """Latent codes of X, ndarray of shape (n_samples, latent_dim).

        This is the space of ``cluster_centers_``.
        """
        self._check_fitted()
        X = check_array(X, n_features=self.n_features_in_)
        return self._encode_all(X)

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self._soft_all(X, self._centers_tensor())

    def _predict(self, X: np.ndarray) -> np.ndarray:
        centers = self._centers_tensor()
        c2 = (centers * centers).sum(dim=1)
        out = np.empty(X.shape[0], dtype=np.int64)
        # the Student's t kernel decreases with distance: argmax q = nearest centre
        return self._map_codes(
            X, lambda z: torch.addmm(c2, z, centers.T, alpha=-2.0).argmin(dim=1), out
        )

    # -- incremental update ------------------------------------------------------
    def _update(
        self,
        X: np.ndarray,
        *,
        max_epochs: int | None,
        max_centroid_shift: float | None,
        strategy: str | None = None,
        move_fraction: float | None = None,
        shift_penalty: float | None = None,
        tol: float | None = None,
    ) -> None:
        """Warm-started update on X (retained + new items); see the module docstring.

        ``strategy``, ``move_fraction``, ``shift_penalty`` and ``tol`` default to
        the estimator's parameters; ``max_epochs`` to ``update_epochs`` (and then
        at most ``UPDATE_SAMPLES`` rows are trained on). ``update_info_`` holds
        the strategy, epochs (fractional), iterations, target updates, whether
        ``tol`` was reached, the centroid shift (mean, max; latent units), the
        fraction of X whose label differs from the model's before the update,
        and the seconds taken.
        """
        from clustering_service.algorithms.kmeans import run_kmeans
        from clustering_service.algorithms.matching import match_clusters

        strategy = strategy or self.update_strategy
        if strategy not in UPDATE_STRATEGIES:
            raise ClusteringInputError(
                f"strategy must be one of {UPDATE_STRATEGIES}, got {strategy!r}"
            )
        move_fraction = self.move_fraction if move_fraction is None else move_fraction
        if not 0.0 <= move_fraction <= 1.0:
            raise ClusteringInputError(f"move_fraction must be in [0, 1], got {move_fraction!r}")
        shift_penalty = self.shift_penalty if shift_penalty is None else shift_penalty
        if not shift_penalty >= 0:
            raise ClusteringInputError(f"shift_penalty must be >= 0, got {shift_penalty!r}")
        epochs = self.update_epochs if max_epochs is None else max_epochs
        max_samples = UPDATE_SAMPLES if max_epochs is None else None
        started = time.perf_counter()
        gen = seed_everything(self.random_state)
        self.ae_.to(self.device_)
        parents = self.cluster_centers_.copy()
        old_labels = self._predict(X)
        start = parents
        penalty = 0.0
        if strategy == "move_centroids":
            self._report("recluster", 0, 1)
            codes = self._encode_all(X)
            new_centers, _, _ = run_kmeans(
                codes,
                self.n_clusters_,
                n_init=self.kmeans_n_init,
                random_state=self.random_state,
                callback=self._kmeans_callback,
            )
            del codes
            matched = new_centers[match_clusters(parents, new_centers)]
            start = parents + np.float32(move_fraction) * (matched - parents)
            if max_centroid_shift is not None:
                start_t = torch.from_numpy(start)
                project_to_ball(start_t, torch.from_numpy(parents), max_centroid_shift)
                start = start_t.numpy()
            penalty = shift_penalty
            self._report("recluster", 1, 1)
        if epochs > 0:
            info = self._cluster(
                X,
                start,
                old_labels,
                gen,
                max_epochs=epochs,
                max_samples=max_samples,
                stage="update",
                parents=parents,
                penalty=penalty,
                max_shift=max_centroid_shift,
                tol=tol,
            )
        else:
            self.cluster_centers_ = np.asarray(start, np.float32)
            self.labels_ = self._predict(X)
            info = {"epochs": 0, "iterations": 0, "target_updates": 0, "converged": False}
        shift = np.linalg.norm(self.cluster_centers_ - parents, axis=1)
        self.update_info_ = {
            "strategy": strategy,
            **info,
            "centroid_shift_mean": float(shift.mean()),
            "centroid_shift_max": float(shift.max()),
            "label_change": float(np.mean(self.labels_ != old_labels)),
            "seconds": time.perf_counter() - started,
        }

    # -- persistence -------------------------------------------------------------
    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        tensors = state_to_numpy(self.ae_, "ae.")
        tensors["cluster_centers"] = self.cluster_centers_
        return tensors, {}

    def _set_state(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.ae_ = _AutoEncoder(self.n_features_in_, list(self.hidden_dims), self.latent_dim)
        load_numpy_state(self.ae_, tensors, "ae.")
        self.ae_.to(self.device_)
        centers = np.asarray(tensors["cluster_centers"], dtype=np.float32)
        if centers.shape != (self.n_clusters_, self.latent_dim):
            raise ValueError(
                f"cluster_centers has shape {centers.shape}, "
                f"expected {(self.n_clusters_, self.latent_dim)}"
            )
        self.cluster_centers_ = centers


def _latent_means(codes: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Mean code per cluster (k, latent_dim) float32 and the sum of squared
    distances of the codes to their cluster's mean (the inertia of that partition)."""
    counts = np.bincount(labels, minlength=k)
    sums = np.zeros((k, codes.shape[1]))
    np.add.at(sums, labels, codes.astype(np.float64))
    centers = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
    inertia = float(((codes - centers[labels]) ** 2).sum(dtype=np.float64))
    return centers, inertia
