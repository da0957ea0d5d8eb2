"""DeepCluster (Caron et al. 2018) adapted to frozen embeddings.

The vision backbone is frozen, so the trainable part is a small trunk on top of
the input vector -- a linear projection plus a residual MLP -- and a linear
head. Each epoch:

1. features: the trunk's output over the whole dataset (in chunks), PCA-whitened
   (fitted on a seeded sample, eigenvalue power ``whiten_power``) and
   L2-normalised. This is the *clustering space*;
2. k-means (restarts, k-means++) on those features smoothed over each item's
   ``n_neighbors`` nearest neighbours (``smooth_steps`` rounds of ``f <-
   normalise((f + mean of its neighbours' f) / 2)``) gives pseudo-labels; an
   empty id takes half of the largest cluster; the ids are matched to the
   previous epoch's by member overlap (Hungarian), so the final ids are not an
   arbitrary permutation and the per-epoch label change is meaningful. The
   smoothing makes each pseudo-label the consensus of a neighbourhood instead
   of the verdict on one noisy vector (as ``neighbors`` does for its initial
   partitions);
3. a freshly initialised head and the trunk are trained with cross-entropy on
   the pseudo-labels, items sampled uniformly over clusters. Image augmentation
   does not exist for frozen vectors; instead the input is replaced by one of
   its ``n_neighbors`` nearest neighbours (found once, in the epoch-0 space)
   and jittered with a little Gaussian noise: the trunk learns that neighbours
   share a cluster, which smooths the partition along the data manifold.

Epoch 0 clusters the untrained trunk, which starts as the PCA projection of the
standardised input (residual branch zero), i.e. k-means on the (smoothed)
half-whitened input: the starting point is the k-means baseline and training
only has to improve on it.

Final model: ``cluster_centers_`` are the mean feature vectors of the last
clustering's clusters in the clustering space (whitened, L2-normalised trunk
output, unsmoothed, dimension ``min(pca_dim, trunk width)``). ``predict``
assigns to the nearest centre in that space, and ``labels_`` are exactly that
assignment of the training items: an item's stored label is what ``predict``
answers for its vector (smoothing is a training device; a new item has no
neighbours). ``final_moved_`` is the fraction of items this moved from the last
smoothed clustering's label. ``predict_proba`` is ``softmax(-|f - c_j|^2 / T)``
with ``T = m / ln k``, ``m`` the median over training points of the margin
(squared distance to the nearest other centre minus to the own one): a point
with the typical margin gets odds k : 1 over the runner-up, hence a probability
of at least 1/2 for its cluster. (The k-means estimator's ``T`` = within-cluster
variance gives almost uniform rows here: in the whitened space every point is
nearly as far from its own centre as from the others; only the margin differs.)
The head is a training device only and is not stored.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score
from torch import nn

from clustering_service.algorithms import nn as cnn
from clustering_service.algorithms.base import BaseClusterer, CancelCheck, ProgressCallback
from clustering_service.algorithms.exceptions import ClusteringInputError
from clustering_service.algorithms.kmeans import (
    assign_nearest,
    clip_shift,
    fill_empty_clusters,
    run_kmeans,
)
from clustering_service.algorithms.knn import (
    EIGEN_FLOOR,
    capped_neighbors,
    check_whiten_power,
    smooth,
)
from clustering_service.algorithms.matching import match_clusters, match_labels

#: faiss warns below this many training points per centroid
MIN_POINTS_PER_CENTROID = 39
#: rows per chunk when featurising / predicting
_CHUNK = cnn.INFERENCE_BATCH


class _Trunk(nn.Module):
    """Input standardisation (buffers) -> linear projection -> + residual MLP."""

    def __init__(self, d_in: int, d_out: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(d_in))
        self.register_buffer("scale", torch.ones(1))
        self.proj = nn.Linear(d_in, d_out)
        self.res = cnn.make_mlp([d_out, hidden, d_out])

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale

    def embed(self, xs: torch.Tensor) -> torch.Tensor:
        z = self.proj(xs)
        return z + self.res(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.standardize(x))


class _Featurizer(nn.Module):
    """Trunk -> PCA-whitening -> L2 normalisation: the space k-means runs in."""

    def __init__(self, trunk: _Trunk, center: torch.Tensor, transform: torch.Tensor) -> None:
        super().__init__()
        self.trunk = trunk
        self.register_buffer("center", center)
        self.register_buffer("transform", transform)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the standardisation and the PCA centring are folded into the adjacent
        # matmuls: inference is four GEMMs and a normalisation, no elementwise
        # pass over the (wide) input
        trunk = self.trunk
        weight = trunk.proj.weight / trunk.scale
        bias = trunk.proj.bias - weight @ trunk.mean
        z = torch.addmm(bias, x, weight.T)
        z = z + trunk.res(z)
        f = torch.addmm(-(self.center @ self.transform), z, self.transform)
        return F.normalize(f, dim=1)


class DeepCluster(BaseClusterer):
    """DeepCluster on frozen embeddings (see the module docstring).

    Parameters
    ----------
    n_clusters, random_state, device, progress_callback, cancel_check : as in
        :class:`BaseClusterer`.
    epochs : training epochs; k-means runs ``epochs + 1`` times (epoch 0 on the
        untrained trunk = the half-whitened input).
    trunk_dim : trunk output width (capped at the input dimension).
    hidden_dim : hidden width of the trunk's residual MLP.
    pca_dim : PCA dimension of the clustering space (capped at the trunk width,
        so a small input is rotated and whitened but not reduced); None: no PCA,
        the trunk output is only centred.
    whiten_power : eigenvalue power of the PCA: -0.5 full whitening (the paper),
        -0.25 half whitening (default: better than both -0.5 and 0 here), 0 plain PCA.
    n_neighbors : nearest neighbours (found once, in the epoch-0 clustering space;
        at most half the average cluster size) used as positives in training
        and to smooth the features before each k-means (0: train on the item
        itself, no smoothing).
    smooth_steps : neighbour-averaging rounds of the features before each
        epoch's k-means (0: k-means on the features themselves). 2 (default),
        mean ACC over 6 seeds: stackoverflow 0.713 -> 0.724, searchsnippets
        0.792 -> 0.798 (std 0.011 -> 0.001), digits 0.852 -> 0.852 (std 0.025 ->
        0.005); NMI +0.002 / +0.030 / +0.011; on 10,000 MNIST digits, pixels no
        default was tuned on, 0.542 -> 0.642 over 3 seeds
        (docs/benchmarks/deep_frozen.md, fourth round).
    neighbor_prob : probability that a training item is replaced by a neighbour.
    input_noise : Gaussian noise added to the standardised input, as a fraction
        of the typical row norm.
    input_dropout : dropout rate on the standardised input.
    batch_size, lr, momentum, weight_decay : SGD on the trunk and the head.
    min_samples_per_epoch : items drawn per epoch are ``max(n, this)`` (small
        data sets still get enough optimisation steps per epoch).
    kmeans_n_init, kmeans_max_iter : k-means restarts / iterations per epoch.
    tol : stop early when fewer than this fraction of labels change between
        consecutive epochs (after id matching).
    pca_sample_size : rows used to fit the input standardisation and each
        epoch's PCA (seeded sample when n is larger).
    update_epochs : training epochs of :meth:`update` when ``max_epochs`` is None.
    update_kmeans_iter : k-means iterations per re-clustering in :meth:`update`.
    update_step : in :meth:`update`, each centre moves this fraction of the way
        from where it was to its re-fitted position (1: plain warm-started
        k-means). 0.3 keeps >= 95% of retained items' labels on the online
        protocol at no loss of accuracy (docs/benchmarks/deepcluster.md).

    Attributes
    ----------
    labels_ : (n,) int64, cluster of each training item, = ``predict`` of its
        vector (no id is empty).
    final_moved_ : float, fraction of training items whose nearest centre is not
        their last smoothed pseudo-label (0.0 without smoothing).
    cluster_centers_ : (k, q) float32 centres in the clustering space.
    temperature_ : float, soft-assignment temperature.
    history_ : list of per-epoch dicts (loss, label_change, nmi_to_previous,
        size_min, size_max).
    update_info_ : dict after :meth:`update`.
    """

    name = "deepcluster"

    def __init__(
        self,
        n_clusters: int | None = 8,
        random_state: int = 0,
        device: str = "auto",
        progress_callback: ProgressCallback | None = None,
        cancel_check: CancelCheck | None = None,
        epochs: int = 10,
        trunk_dim: int = 128,
        hidden_dim: int = 128,
        pca_dim: int | None = 128,
        whiten_power: float = -0.25,
        n_neighbors: int = 10,
        smooth_steps: int = 2,
        neighbor_prob: float = 1.0,
        input_noise: float = 0.5,
        input_dropout: float = 0.0,
        batch_size: int = 256,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 1e-5,
        min_samples_per_epoch: int = 20000,
        kmeans_n_init: int = 5,
        kmeans_max_iter: int = 50,
        tol: float = 0.0,
        pca_sample_size: int = 100_000,
        update_epochs: int = 1,
        update_kmeans_iter: int = 10,
        update_step: float = 0.3,
    ) -> None:
        self.n_clusters = n_clusters
        self.random_state = random_state
        self.device = device
        self.progress_callback = progress_callback
        self.cancel_check = cancel_check
        self.epochs = epochs
        self.trunk_dim = trunk_dim
        self.hidden_dim = hidden_dim
        self.pca_dim = pca_dim
        self.whiten_power = whiten_power
        self.n_neighbors = n_neighbors
        self.smooth_steps = smooth_steps
        self.neighbor_prob = neighbor_prob
        self.input_noise = input_noise
        self.input_dropout = input_dropout
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.min_samples_per_epoch = min_samples_per_epoch
        self.kmeans_n_init = kmeans_n_init
        self.kmeans_max_iter = kmeans_max_iter
        self.tol = tol
        self.pca_sample_size = pca_sample_size
        self.update_epochs = update_epochs
        self.update_kmeans_iter = update_kmeans_iter
        self.update_step = update_step

    # -- validation ---------------------------------------------------------
    def _validate_params(self) -> None:
        super()._validate_params()

        def is_int(v: Any, low: int) -> bool:
            return isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= low

        for key, low in (
            ("epochs", 0),
            ("n_neighbors", 0),
            ("smooth_steps", 0),
            ("update_epochs", 0),
            ("trunk_dim", 1),
            ("hidden_dim", 1),
            ("batch_size", 2),
            ("min_samples_per_epoch", 1),
            ("kmeans_n_init", 1),
            ("kmeans_max_iter", 1),
            ("pca_sample_size", 2),
            ("update_kmeans_iter", 1),
        ):
            if not is_int(getattr(self, key), low):
                raise ClusteringInputError(
                    f"{key} must be an integer >= {low}, got {getattr(self, key)!r}"
                )
        if self.pca_dim is not None and not is_int(self.pca_dim, 1):
            raise ClusteringInputError(
                f"pca_dim must be None or an integer >= 1, got {self.pca_dim!r}"
            )
        for key, low, high in (
            ("neighbor_prob", 0.0, 1.0),
            ("input_dropout", 0.0, 0.99),
            ("tol", 0.0, 1.0),
            ("momentum", 0.0, 0.999),
            ("update_step", 0.0, 1.0),
        ):
            value = getattr(self, key)
            if not (isinstance(value, int | float) and low <= value <= high):
                raise ClusteringInputError(f"{key} must be in [{low}, {high}], got {value!r}")
        check_whiten_power(self.whiten_power)
        for key in ("lr", "input_noise", "weight_decay"):
            value = getattr(self, key)
            strict = key == "lr"
            if not isinstance(value, int | float) or not (value > 0 if strict else value >= 0):
                raise ClusteringInputError(
                    f"{key} must be {'>' if strict else '>='} 0, got {value!r}"
                )

    @staticmethod
    def _check_n(n: int, k: int) -> None:
        if n < k:
            raise ClusteringInputError(
                f"DeepCluster needs at least n_clusters={k} samples, got {n}: "
                "k-means cannot place more centroids than points"
            )
        if n < MIN_POINTS_PER_CENTROID * k:
            warnings.warn(
                f"only {n / k:.1f} samples per cluster (n={n}, k={k}); k-means pseudo-labels "
                f"are unreliable below ~{MIN_POINTS_PER_CENTROID} points per centroid "
                "(faiss's warning threshold): use fewer clusters or more data",
                RuntimeWarning,
                stacklevel=4,
            )

    # -- building blocks ---------------------------------------------------
    def _sample_rows(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Sorted row indices of a seeded sample of at most ``pca_sample_size`` rows."""
        if n <= self.pca_sample_size:
            return np.arange(n)
        return np.sort(rng.choice(n, size=self.pca_sample_size, replace=False))

    def _init_trunk(self, X: np.ndarray, rng: np.random.Generator) -> _Trunk:
        """A trunk that starts as the PCA projection of the standardised input.

        Standardisation is a centring and ONE global scale (rows get unit mean
        squared norm), so Euclidean geometry is kept up to a factor: k-means on
        it equals k-means on the raw input. The projection is scaled so the
        output coordinates have unit mean variance; the residual branch's last
        layer is zero, so the trunk is exactly that projection at epoch 0.
        """
        d = X.shape[1]
        p = min(self.trunk_dim, d)
        trunk = _Trunk(d, p, self.hidden_dim)
        S = np.asarray(X[self._sample_rows(X.shape[0], rng)], dtype=np.float64)
        mean = S.mean(axis=0)
        S -= mean
        scale = math.sqrt(max(float((S**2).sum(axis=1).mean()), 1e-24))
        S /= scale
        evals, evecs = np.linalg.eigh(S.T @ S / max(len(S) - 1, 1))
        evecs = _fix_signs(evecs[:, np.argsort(evals)[::-1][:p]])
        with torch.no_grad():
            trunk.mean.copy_(torch.from_numpy(mean.astype(np.float32)))
            trunk.scale.fill_(scale)
            trunk.proj.weight.copy_(torch.from_numpy((evecs.T * math.sqrt(p)).astype(np.float32)))
            trunk.proj.bias.zero_()
            trunk.res[-1].weight.zero_()
            trunk.res[-1].bias.zero_()
        return trunk

    def _make_featurizer(self, X: np.ndarray, rng: np.random.Generator) -> _Featurizer:
        """Fit this epoch's PCA-whitening on the trunk outputs of a seeded sample."""
        Z = cnn.batched_apply(self.trunk_, X[self._sample_rows(X.shape[0], rng)], self.device_)
        Z = Z.astype(np.float64)
        center = Z.mean(axis=0)
        p = Z.shape[1]
        if self.pca_dim is None:
            transform = np.eye(p)
        else:
            Zc = Z - center
            evals, evecs = np.linalg.eigh(Zc.T @ Zc / max(len(Z) - 1, 1))
            order = np.argsort(evals)[::-1][: min(self.pca_dim, p)]
            lam = np.maximum(evals[order], EIGEN_FLOOR * max(float(evals.max()), 1e-24))
            transform = _fix_signs(evecs[:, order]) * lam ** float(self.whiten_power)
        return _Featurizer(
            self.trunk_,
            torch.from_numpy(center.astype(np.float32)).to(self.device_),
            torch.from_numpy(np.ascontiguousarray(transform, dtype=np.float32)).to(self.device_),
        )

    @torch.inference_mode()
    def _features(self, X: np.ndarray, featurizer: _Featurizer | None = None) -> np.ndarray:
        """Clustering-space features of every row, float32 (n, q), computed in chunks
        straight into one preallocated array (no list of chunks to concatenate)."""
        featurizer = featurizer or self.featurizer_
        out = np.empty((X.shape[0], featurizer.transform.shape[1]), dtype=np.float32)
        for start in range(0, X.shape[0], _CHUNK):
            chunk = _rows_tensor(X[start : start + _CHUNK])
            out[start : start + len(chunk)] = featurizer(chunk.to(self.device_)).cpu().numpy()
        return out

    def _cluster(
        self, feats: np.ndarray, k: int, seed: int, previous: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """k-means on ``feats`` -> (centres, labels), ids matched to ``previous`` labels.

        Candidates: ``kmeans_n_init`` k-means++ restarts and, after epoch 0, one
        Lloyd run warm-started from the means of the ``previous`` clusters in
        the new space; the lowest inertia wins. A new epoch thus only jumps to
        another partition when that partition is better by k-means' own
        objective, instead of whenever this epoch's random restarts happen to
        land elsewhere (the main source of DeepCluster's seed spread).
        """
        _, labels, inertia = run_kmeans(
            feats, k, n_init=self.kmeans_n_init, max_iter=self.kmeans_max_iter, random_state=seed
        )
        if previous is not None:
            warm = _cluster_means(feats, previous, k)
            _, warm_labels, warm_inertia = run_kmeans(
                feats, k, init=warm, max_iter=self.kmeans_max_iter, random_state=seed
            )
            if warm_inertia <= inertia:
                labels = warm_labels
        if previous is not None:
            mapping = match_labels(previous, labels, k, k)
            free = iter(sorted(set(range(k)) - {v for v in mapping.values() if v is not None}))
            perm = np.array([next(free) if mapping[j] is None else mapping[j] for j in range(k)])
            labels = perm[labels]
        centers = _cluster_means(feats, labels, k)
        # run_kmeans never returns an empty id; kept as a guard for the matched labels
        return fill_empty_clusters(feats, centers, labels)

    def _train_epoch(
        self,
        X: np.ndarray,
        labels: np.ndarray,
        neighbors: np.ndarray | None,
        gen: torch.Generator,
    ) -> float:
        """One epoch of cross-entropy on the pseudo-labels with a fresh head; mean loss."""
        k = self.n_clusters_
        dev = self.device_
        trunk = self.trunk_
        head = nn.Linear(trunk.proj.out_features, k)
        with torch.no_grad():
            head.weight.normal_(0.0, 0.01, generator=gen)
            head.bias.zero_()
        head.to(dev)
        opt = torch.optim.SGD(
            [*trunk.parameters(), *head.parameters()],
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )
        # uniform over clusters: the same number of draws (with replacement) per cluster
        counts = np.bincount(labels, minlength=k)
        by_cluster = np.argsort(labels, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        live = np.flatnonzero(counts)
        per = math.ceil(max(X.shape[0], self.min_samples_per_epoch) / len(live))
        draws = torch.randint(1 << 62, (len(live), per), generator=gen).numpy()
        items = by_cluster[(starts[live, None] + draws % counts[live, None]).ravel()]
        items = items[torch.randperm(len(items), generator=gen).numpy()]
        noise_std = self.input_noise / math.sqrt(X.shape[1])
        trunk.train()
        total, steps = 0.0, 0
        # one torch thread per step: on a busy CPU intra-op threads spin (nn.step_threads)
        with cnn.step_threads(self.device_):
            for start in range(0, len(items) - 1, self.batch_size):
                target = items[start : start + self.batch_size]
                src = target
                if neighbors is not None and neighbors.shape[1] > 0:
                    pick = torch.randint(neighbors.shape[1], (len(target),), generator=gen).numpy()
                    use = torch.rand(len(target), generator=gen).numpy() < self.neighbor_prob
                    src = np.where(use, neighbors[target, pick], target)
                # sorted reads are much faster on a memory-mapped X
                order = np.argsort(src, kind="stable")
                src, target = src[order], target[order]
                xb = torch.from_numpy(np.ascontiguousarray(np.take(X, src, axis=0)))
                yb = torch.from_numpy(labels[target])
                mask = None
                if self.input_dropout > 0:
                    mask = (torch.rand(xb.shape, generator=gen) >= self.input_dropout).float()
                    mask /= 1.0 - self.input_dropout
                noise = torch.randn(xb.shape, generator=gen) * noise_std if noise_std > 0 else None
                xs = trunk.standardize(xb.to(dev))
                if mask is not None:
                    xs = xs * mask.to(dev)
                if noise is not None:
                    xs = xs + noise.to(dev)
                loss = F.cross_entropy(head(trunk.embed(xs)), yb.to(dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                steps += 1
        trunk.eval()
        return total / max(steps, 1)

    def _set_final(
        self, featurizer: _Featurizer, feats: np.ndarray, centers: np.ndarray, labels: np.ndarray
    ) -> None:
        self.featurizer_ = featurizer
        self.cluster_centers_ = np.ascontiguousarray(centers, dtype=np.float32)
        self.labels_ = labels
        k = self.cluster_centers_.shape[0]
        self.temperature_ = _median_margin(feats, self.cluster_centers_, labels) / math.log(k)

    # -- fit -----------------------------------------------------------------
    def _fit(self, X: np.ndarray) -> None:
        k = self.n_clusters_
        self._check_n(X.shape[0], k)
        gen = cnn.seed_everything(self.random_state)
        rng = np.random.default_rng(self.random_state)
        self.trunk_ = self._init_trunk(X, rng).to(self.device_)
        self.trunk_.eval()
        featurizer = self._make_featurizer(X, rng)
        feats = self._features(X, featurizer)
        # neighbours are found once, in the epoch-0 space (the half-whitened input)
        neighbors = None
        if self.n_neighbors > 0 and (self.epochs > 0 or self.smooth_steps > 0):
            neighbors = capped_neighbors(feats, self.n_neighbors, k, self.random_state)
        centers, labels = self._cluster(
            self._smoothed(feats, neighbors), k, self.random_state, None
        )
        self.history_: list[dict[str, Any]] = [_epoch_stats(0, labels, None, k, None)]
        self._report("cluster", 0, self.epochs, **_extra(self.history_[-1]))
        for epoch in range(1, self.epochs + 1):
            loss = self._train_epoch(X, labels, neighbors, gen)
            featurizer = self._make_featurizer(X, rng)
            del feats
            feats = self._features(X, featurizer)
            centers, new_labels = self._cluster(
                self._smoothed(feats, neighbors), k, self.random_state + epoch, labels
            )
            stats = _epoch_stats(epoch, new_labels, labels, k, loss)
            labels = new_labels
            self.history_.append(stats)
            self._report("train", epoch, self.epochs, loss, stats["label_change"], **_extra(stats))
            if stats["label_change"] < self.tol:
                break
        self.final_moved_ = 0.0
        if self.smooth_steps > 0 and neighbors is not None:
            # centres of the smoothed partition in the unsmoothed space; every item
            # goes to its nearest, as predict sends it
            centers = _cluster_means(feats, labels, k)
            nearest = assign_nearest(feats, centers)[0]
            self.final_moved_ = float(np.mean(nearest != labels))
            centers, labels = fill_empty_clusters(feats, centers, nearest)
        self._set_final(featurizer, feats, centers, labels)
        self.n_epochs_ = len(self.history_) - 1

    def _smoothed(self, feats: np.ndarray, neighbors: np.ndarray | None) -> np.ndarray:
        """``feats`` (n, q) averaged ``smooth_steps`` times over ``neighbors`` (n, m):
        the space each epoch's k-means runs in (``feats`` itself without them)."""
        if neighbors is None or self.smooth_steps == 0:
            return feats
        return smooth(feats, neighbors, self.smooth_steps)

    # -- predict -------------------------------------------------------------
    @torch.inference_mode()
    def _neg_dist2(self, X: np.ndarray) -> torch.Tensor:
        """``-|f - c|^2 + 1`` for every row and centre (|f| = 1), on the CPU."""
        f = self.featurizer_(_rows_tensor(X).to(self.device_))
        c = torch.from_numpy(self.cluster_centers_).to(self.device_)
        return torch.addmm(-(c * c).sum(dim=1), f, c.T, alpha=2.0).float().cpu()

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        out = np.empty((X.shape[0], self.n_clusters_), dtype=np.float32)
        for start in range(0, X.shape[0], _CHUNK):
            scores = self._neg_dist2(X[start : start + _CHUNK])
            out[start : start + len(scores)] = torch.softmax(scores / self.temperature_, 1).numpy()
        return out

    def _predict(self, X: np.ndarray) -> np.ndarray:
        out = np.empty(X.shape[0], dtype=np.int64)
        for start in range(0, X.shape[0], _CHUNK):
            scores = self._neg_dist2(X[start : start + _CHUNK])
            out[start : start + len(scores)] = scores.argmax(1).numpy()
        return out

    # -- update --------------------------------------------------------------
    def _refit_centers(
        self, feats: np.ndarray, start: np.ndarray, parent: np.ndarray, max_shift: float | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """k-means from ``start``, ids matched to ``parent``, each centre kept within
        ``max_shift`` of its parent; returns (centres, nearest-centre labels)."""
        k = self.n_clusters_
        centers, _, _ = run_kmeans(
            feats, k, init=start, max_iter=self.update_kmeans_iter, random_state=self.random_state
        )
        # k-means from init keeps ids, but an empty-cluster split may move one
        centers = centers[match_clusters(parent, centers)]
        centers = start + float(self.update_step) * (centers - start)
        centers = clip_shift(centers.astype(np.float32), parent, max_shift)
        return centers, assign_nearest(feats, centers)[0]

    def _update(
        self,
        X: np.ndarray,
        *,
        max_epochs: int | None,
        max_centroid_shift: float | None,
        **params: Any,
    ) -> None:
        """Warm start: same trunk and whitening (so centres stay comparable), k-means
        initialised with the current centres, ids matched to the parent
        (Hungarian on centre distance), each centre moved ``update_step`` of the
        way to its re-fitted position and clipped to ``max_centroid_shift`` around
        its parent; then ``max_epochs`` (default ``update_epochs``) training
        epochs on the new pseudo-labels, each followed by the same re-clustering.
        Ids may go empty here (a clipped centre can lose all its items); the
        count is reported, ids are never reassigned."""
        if params:
            raise ClusteringInputError(
                f"unknown update parameter(s) {sorted(params)} for deepcluster; "
                "valid: max_epochs, max_centroid_shift"
            )
        self._check_n(X.shape[0], self.n_clusters_)
        epochs = self.update_epochs if max_epochs is None else max_epochs
        gen = cnn.seed_everything(self.random_state + 1)
        self.trunk_.to(self.device_)
        self.featurizer_.to(self.device_)
        parent = self.cluster_centers_.copy()
        feats = self._features(X)
        parent_labels = assign_nearest(feats, parent)[0]
        centers, labels = self._refit_centers(feats, parent, parent, max_centroid_shift)
        neighbors = None
        if epochs > 0 and self.n_neighbors > 0:
            neighbors = capped_neighbors(
                feats, self.n_neighbors, self.n_clusters_, self.random_state
            )
        self._report("update", 0, epochs, None, float(np.mean(labels != parent_labels)))
        for epoch in range(1, epochs + 1):
            loss = self._train_epoch(X, labels, neighbors, gen)
            feats = self._features(X)
            centers, new_labels = self._refit_centers(feats, centers, parent, max_centroid_shift)
            change = float(np.mean(new_labels != labels))
            labels = new_labels
            self._report("update", epoch, epochs, loss, change)
        self._set_final(self.featurizer_, feats, centers, labels)
        shift = np.linalg.norm(centers - parent, axis=1)
        sizes = np.bincount(labels, minlength=self.n_clusters_)
        self.update_info_ = {
            "epochs": epochs,
            "centroid_shift_mean": float(shift.mean()),
            "centroid_shift_max": float(shift.max()),
            "centroid_shift": shift.tolist(),
            "nmi_to_parent": float(normalized_mutual_info_score(parent_labels, labels)),
            "label_change": float(np.mean(labels != parent_labels)),
            "cluster_sizes": sizes.tolist(),
            "n_empty": int((sizes == 0).sum()),
        }

    # -- persistence -----------------------------------------------------------
    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        tensors = cnn.state_to_numpy(self.trunk_, "trunk.")
        tensors["pca.center"] = self.featurizer_.center.detach().cpu().numpy()
        tensors["pca.transform"] = self.featurizer_.transform.detach().cpu().numpy()
        tensors["centroids"] = self.cluster_centers_
        meta = {
            "trunk_dim": int(self.trunk_.proj.out_features),
            "hidden_dim": int(self.trunk_.res[0].out_features),
            "temperature": self.temperature_,
        }
        return tensors, meta

    def _set_state(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        trunk = _Trunk(self.n_features_in_, int(meta["trunk_dim"]), int(meta["hidden_dim"]))
        cnn.load_numpy_state(trunk, tensors, "trunk.")
        center = np.asarray(tensors["pca.center"], dtype=np.float32)
        transform = np.asarray(tensors["pca.transform"], dtype=np.float32)
        centroids = np.asarray(tensors["centroids"], dtype=np.float32)
        if center.shape != (trunk.proj.out_features,) or transform.shape[0] != center.shape[0]:
            raise ValueError(f"PCA shapes {center.shape}, {transform.shape} do not fit the trunk")
        if centroids.shape != (self.n_clusters_, transform.shape[1]):
            raise ValueError(
                f"centroids have shape {centroids.shape}, expected "
                f"{(self.n_clusters_, transform.shape[1])}"
            )
        temperature = float(meta["temperature"])
        if not np.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        trunk.to(self.device_).eval()
        self.trunk_ = trunk
        self.featurizer_ = _Featurizer(
            trunk,
            torch.from_numpy(center).to(self.device_),
            torch.from_numpy(transform).to(self.device_),
        )
        self.cluster_centers_ = centroids
        self.temperature_ = temperature


def _rows_tensor(rows: np.ndarray) -> torch.Tensor:
    """A chunk of input rows as a CPU tensor; read-only chunks (of a read-only
    memmap) are copied, as torch cannot wrap them safely."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    return torch.from_numpy(rows if rows.flags.writeable else rows.copy())


def _fix_signs(vectors: np.ndarray) -> np.ndarray:
    """Flip each column so its largest-magnitude entry is positive (reproducible PCA)."""
    idx = np.abs(vectors).argmax(axis=0)
    signs = np.sign(vectors[idx, np.arange(vectors.shape[1])])
    return vectors * np.where(signs == 0, 1.0, signs)


def _epoch_stats(
    epoch: int, labels: np.ndarray, previous: np.ndarray | None, k: int, loss: float | None
) -> dict[str, Any]:
    """One ``history_`` entry: sizes, and the change / NMI w.r.t. the previous epoch."""
    sizes = np.bincount(labels, minlength=k)
    stats: dict[str, Any] = {
        "epoch": epoch,
        "loss": loss,
        "size_min": int(sizes.min()),
        "size_max": int(sizes.max()),
    }
    if previous is not None:
        stats["label_change"] = float(np.mean(labels != previous))
        stats["nmi_to_previous"] = float(normalized_mutual_info_score(previous, labels))
    return stats


def _extra(stats: dict[str, Any]) -> dict[str, Any]:
    """Progress extras of a ``history_`` entry."""
    return {key: stats[key] for key in ("size_min", "size_max", "nmi_to_previous") if key in stats}


def _median_margin(feats: np.ndarray, centers: np.ndarray, labels: np.ndarray) -> float:
    """Median over rows of (squared distance to the nearest OTHER centre - squared
    distance to the own centre): the soft-assignment temperature (floored > 0)."""
    c = torch.from_numpy(centers)
    c_sq = (c * c).sum(dim=1)
    margins = []
    for start in range(0, feats.shape[0], _CHUNK):
        d2 = c_sq - 2.0 * torch.from_numpy(feats[start : start + _CHUNK]) @ c.T
        own = torch.from_numpy(labels[start : start + _CHUNK])
        rows = torch.arange(len(own))
        d_own = d2[rows, own].clone()
        d2[rows, own] = torch.inf
        margins.append((d2.min(dim=1).values - d_own).numpy())
    return max(float(np.median(np.concatenate(margins))), 1e-6)


def _cluster_means(feats: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Mean row per cluster (zeros for an empty one), float32 (k, d)."""
    sums = torch.zeros((k, feats.shape[1]), dtype=torch.float64)
    for start in range(0, feats.shape[0], 65536):
        chunk = torch.from_numpy(feats[start : start + 65536]).double()
        sums.index_add_(0, torch.from_numpy(labels[start : start + 65536]), chunk)
    counts = np.bincount(labels, minlength=k)[:, None]
    return (sums.numpy() / np.maximum(counts, 1)).astype(np.float32)
