"""Online Deep Clustering (Zhan et al., CVPR 2020, arXiv 2006.10645) on frozen vectors.

Clustering and training happen together instead of alternating (as in
DeepCluster), so pseudo-labels evolve smoothly.

Network: the input is standardised with a stored mean vector and ONE global
scale (per-dimension RMS 1 on average, so the geometry of X is kept and the
same defaults fit pixels in [0, 1] and L2-normalised embeddings); the neck
``fc -> BatchNorm -> ReLU -> Dropout(0.5) -> fc -> ReLU`` maps it to
``feature_dim``, its output is L2-normalised; a linear head classifies that.

Memories: the sample memory holds one unit neck feature and one label per
training item (float32 ``(N, feature_dim)`` and int64 ``(N,)``: O(N x
feature_dim) memory, 512 MB for 1M items at the default 128); the centroid
memory one unit vector per cluster, the normalised mean of its members' memory
features. Both come from one global k-means (``kmeans.run_kmeans``):

* ``init_space="input"`` (default): k-means on the input rows, centred,
  L2-normalised, on their top 128 principal components, half-whitened
  (``whiten_power``) and renormalised, and smoothed ``smooth_steps`` times over
  their ``n_neighbors`` nearest neighbours in that space (``f <-
  normalise((f + mean of its neighbours' f) / 2)``, as ``neighbors`` and
  DeepCluster do), so each starting label is the consensus of a neighbourhood;
  with ``smooth_steps=0``, k-means on X itself (standardising does not change a
  k-means partition). Then a short warm-up trains the network on those labels
  with relabelling off, so the neck learns the partition before the memory
  starts moving labels;
* ``init_space="neck"``: spherical k-means on the neck features of the freshly
  initialised network, as in the paper. On frozen vectors a random neck is a
  lossy projection: on digits its k-means starts ~0.05 ACC/NMI below k-means on
  the input, and ODC does not recover all of it (docs/benchmarks/odc.md).

Per mini-batch: cross-entropy of ``head(neck(x + noise))`` against the memory
labels, re-weighted by ``w_c ∝ n_c ** -reweight_power`` (:func:`loss_weights`;
0.5 is the paper's inverse square root); then the memory features of the batch
move ``f <- normalise((1 - m) f + m f_new)`` and those items are relabelled to
their nearest centroid. Every ``centroid_update_interval`` iterations the
centroids are recomputed from per-cluster running sums, kept exact under every
feature and label change (float64) and re-summed from the memory once per
epoch, so an epoch costs O(N) however often centroids are refreshed. Then
clusters smaller than ``min_cluster`` are disbanded and their ids refilled by
2-means splits of the largest clusters (:func:`fix_small_clusters`). Gaussian
noise and dropout on the standardised input replace the paper's image
augmentation. Early stop once an epoch changes fewer than ``tol`` of the labels.

Clustering space: the normalised neck space. ``cluster_centers_`` are unit
vectors there, shape ``(n_clusters_, feature_dim)`` (not ``n_features_in_``);
``predict`` is the centroid of highest cosine similarity to an item's
eval-mode neck feature and ``predict_proba`` is ``softmax(cos / temperature)``.
The head's softmax is not used for prediction: the centroid rule is the one
that labels the memory, and after training the memory is refreshed with
eval-mode features and relabelled (one last centroid step), so ``labels_`` is
exactly ``predict(X)`` for the training items.

Incremental update (:meth:`ODC.update`): X is the whole current dataset and
items carry no ids, so the memory is rebuilt for it: every item (retained or
new) gets the current network's feature and its nearest parent centroid, which
for a retained item is the label the model gave it. Training then continues
online for ``max_epochs`` (default ``update_epochs``) from the parent network
and centroids, ids kept. With ``max_centroid_shift`` every centroid refresh is
pulled back along the great circle to within that (chord) distance of its
parent centroid. Small clusters are not disbanded during an update, because
refilling an id with half of another cluster would change what the id means;
an emptied cluster keeps its centroid. The neck keeps training, so the space
itself drifts a little; ``max_epochs`` bounds that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clustering_service.algorithms.base import BaseClusterer
from clustering_service.algorithms.exceptions import ClusteringInputError
from clustering_service.algorithms.kmeans import run_kmeans
from clustering_service.algorithms.knn import check_whiten_power, smoothed_input
from clustering_service.algorithms.nn import (
    INFERENCE_BATCH,
    load_numpy_state,
    seed_everything,
    state_to_numpy,
    step_threads,
)

#: the paper's small-cluster threshold; ``min_cluster=None`` lowers it for small N / k
PAPER_MIN_CLUSTER = 20
#: iterations between cancel checks inside an epoch (one epoch over 1M items is long)
_CANCEL_EVERY = 200
#: rows per matrix product when relabelling a whole memory: the chunks of ``predict``,
#: so that relabelling the memory and predicting the same items agree exactly
_LABEL_CHUNK = INFERENCE_BATCH


def loss_weights(counts: torch.Tensor, power: float = 0.5) -> torch.Tensor:
    """Cross-entropy class weights ``w_c ∝ n_c ** -power`` (ODC's loss re-weighting).

    counts : (k,) cluster sizes. Returns float32 (k,), mean 1 over the non-empty
    clusters; an empty cluster gets 0 (no item carries its label). ``power=0``
    gives uniform weights.
    """
    counts = counts.double()
    w = torch.where(counts > 0, counts.clamp_min(1.0).pow(-power), torch.zeros_like(counts))
    nonempty = w > 0
    if nonempty.any():
        w = w / w[nonempty].mean()
    return w.float()


def nearest_centroid(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(n,) index of the unit centroid most similar to each unit row, in row chunks."""
    return torch.cat(
        [
            (features[start : start + _LABEL_CHUNK] @ centroids.T).argmax(dim=1)
            for start in range(0, features.shape[0], _LABEL_CHUNK)
        ]
    )


@dataclass
class SmallClusterFix:
    """What :func:`fix_small_clusters` did.

    ``disbanded[i]`` is an id whose cluster was too small: its members moved to
    their nearest centroid among the clusters that were not small, then the id
    took one half of cluster ``split_from[i]`` (the largest at that moment).
    ``moved`` are the items whose label changed, ``old_labels`` their labels
    before the call.
    """

    disbanded: list[int] = field(default_factory=list)
    split_from: list[int] = field(default_factory=list)
    moved: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    old_labels: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))


def fix_small_clusters(
    features: torch.Tensor,
    labels: torch.Tensor,
    centroids: torch.Tensor,
    min_cluster: int,
    *,
    random_state: int = 0,
) -> SmallClusterFix:
    """Disband clusters of fewer than ``min_cluster`` items and refill their ids.

    features : (n, d) unit rows; labels : (n,) int64; centroids : (k, d) unit rows.
    ``labels`` and ``centroids`` are modified IN PLACE. Members of the small
    clusters go to their most similar centroid among the other clusters; then
    each freed id in turn takes one half of the currently largest cluster
    (spherical 2-means on its members; the half whose centre is farther from
    the old centroid gets the freed id, so the old id moves least) and both
    centroids become the normalised means of their new members. Nothing happens
    when no cluster is small, or all are. Cost O(n d) when there is work to do.
    """
    k = centroids.shape[0]
    counts = torch.bincount(labels, minlength=k)
    small = torch.nonzero(counts < min_cluster).flatten()
    fix = SmallClusterFix()
    if small.numel() in (0, k):
        return fix
    original = labels.clone()
    in_small = torch.isin(labels, small)
    if in_small.any():
        sims = features[in_small] @ centroids.T
        sims[:, small] = -math.inf
        labels[in_small] = sims.argmax(dim=1)
    counts = torch.bincount(labels, minlength=k)
    for i, freed in enumerate(small.tolist()):
        largest = int(counts.argmax())
        members = torch.nonzero(labels == largest).flatten()
        if members.numel() < 2:
            break
        centers, halves, _ = run_kmeans(
            features[members].cpu().numpy(),
            2,
            n_init=3,
            max_iter=20,
            random_state=random_state + i,
            spherical=True,
        )
        far = int((torch.from_numpy(centers).to(centroids) @ centroids[largest]).argmin())
        to_freed = torch.from_numpy(halves == far).to(labels.device)
        moving, staying = members[to_freed], members[~to_freed]
        if moving.numel() == 0 or staying.numel() == 0:
            break
        labels[moving] = freed
        centroids[freed] = F.normalize(features[moving].mean(dim=0), dim=0)
        centroids[largest] = F.normalize(features[staying].mean(dim=0), dim=0)
        counts[freed], counts[largest] = moving.numel(), staying.numel()
        fix.disbanded.append(freed)
        fix.split_from.append(largest)
    fix.moved = torch.nonzero(labels != original).flatten()
    fix.old_labels = original[fix.moved]
    return fix


def clip_centroids(
    centroids: torch.Tensor, parents: torch.Tensor, max_shift: float
) -> tuple[torch.Tensor, int]:
    """Pull unit centroids back along the great circle toward their unit parents
    until each is within chord distance ``max_shift``; returns (centroids, number clipped)."""
    over = (centroids - parents).norm(dim=1) > max_shift
    if not over.any():
        return centroids, 0
    phi = torch.acos((centroids * parents).sum(dim=1).clamp(-1.0, 1.0))
    theta = 2.0 * math.asin(min(max_shift / 2.0, 1.0))
    # slerp from parent p to c stopped at angle theta:
    # [sin(phi - theta) p + sin(theta) c] / sin(phi)
    sin_phi = torch.sin(phi).clamp_min(1e-12)
    w_parent = torch.sin(phi - theta) / sin_phi
    w_centroid = math.sin(theta) / sin_phi
    pulled = w_parent[:, None] * parents + w_centroid[:, None] * centroids
    return torch.where(over[:, None], F.normalize(pulled, dim=1), centroids), int(over.sum())


class _Memory:
    """Sample memory (unit features, labels) and centroid memory.

    Per-cluster feature sums and counts follow every change, so refreshing the
    centroids costs O(k d) instead of a pass over the memory.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, k: int) -> None:
        self.features = features
        self.labels = labels
        self.k = k
        self.centroids = torch.zeros((k, features.shape[1]), device=features.device)
        self.resum()
        self.recompute_centroids()

    def resum(self) -> None:
        """Exact float64 sums from the memory (chunked); clears accumulated rounding."""
        self.sums = torch.zeros(
            (self.k, self.features.shape[1]), dtype=torch.float64, device=self.features.device
        )
        for start in range(0, self.features.shape[0], _LABEL_CHUNK):
            stop = start + _LABEL_CHUNK
            self.sums.index_add_(0, self.labels[start:stop], self.features[start:stop].double())
        self.counts = torch.bincount(self.labels, minlength=self.k)

    def recompute_centroids(self) -> None:
        """Normalised member means; an empty cluster keeps its centroid."""
        means = F.normalize(self.sums.float(), dim=1)
        self.centroids = torch.where((self.counts > 0)[:, None], means, self.centroids)

    def _account(
        self, f_old: torch.Tensor, l_old: torch.Tensor, f_new: torch.Tensor, l_new: torch.Tensor
    ) -> None:
        self.sums.index_add_(0, l_old, -f_old.double())
        self.sums.index_add_(0, l_new, f_new.double())
        self.counts += torch.bincount(l_new, minlength=self.k) - torch.bincount(
            l_old, minlength=self.k
        )

    def move(self, idx: torch.Tensor, new_features: torch.Tensor, relabel: bool) -> None:
        """Store new features for items ``idx`` and (if ``relabel``) their nearest centroids."""
        old_f, old_l = self.features[idx], self.labels[idx]
        new_l = (new_features @ self.centroids.T).argmax(dim=1) if relabel else old_l
        self._account(old_f, old_l, new_features, new_l)
        self.features[idx] = new_features
        self.labels[idx] = new_l

    def relabelled(self, idx: torch.Tensor, old_labels: torch.Tensor) -> None:
        """Account for items ``idx`` whose labels were changed in place."""
        f = self.features[idx]
        self._account(f, old_labels, f, self.labels[idx])

    def relabel_all(self) -> None:
        self.labels = nearest_centroid(self.features, self.centroids)
        self.resum()


class ODC(BaseClusterer):
    """Online Deep Clustering on frozen vectors (details in the module docstring).

    Parameters
    ----------
    n_clusters : int or None
        Number of clusters (None: chosen automatically by ``fit``).
    hidden_dim, feature_dim : int
        Widths of the neck; ``feature_dim`` is the memory and clustering space
        (the memory takes ``4 * N * feature_dim`` bytes).
    n_epochs : int or None
        Passes over the data after the warm-up; None: enough for about 1000
        iterations, at least 5 and at most 60 epochs.
    warmup_epochs : int or None
        Epochs of training on the initial labels without relabelling
        (``init_space="input"`` only); None: enough for about 100 iterations.
    batch_size, lr, weight_decay : SGD (momentum 0.9) settings.
    memory_momentum : float
        m in ``f <- (1 - m) f + m f_new`` (paper: 0.5; 0.2 flips fewer labels per
        epoch on frozen vectors and scored higher, docs/benchmarks/odc.md).
    centroid_update_interval : int
        Iterations between centroid refreshes (paper: 10).
    min_cluster : int or None
        Clusters below this size are disbanded; None: the paper's 20, lowered to
        ``max(1, N // (5 k))`` for small data.
    reweight_power : float
        Loss weights ``w_c ∝ n_c ** -reweight_power`` (0: no re-weighting).
    input_noise, input_dropout : float
        Std of Gaussian noise added to, and dropout rate on, the standardised input.
    temperature : float
        Softmax temperature of ``predict_proba`` over cosine similarities.
    tol : float
        Stop once an epoch changes fewer than this fraction of labels.
    kmeans_n_init : int
        Restarts of the initial global k-means.
    init_space : {"input", "neck"}
        Where the initial k-means runs (module docstring).
    n_neighbors, smooth_steps : int
        With ``init_space="input"``: the initial k-means runs on the input
        smoothed ``smooth_steps`` times over its ``n_neighbors`` nearest
        neighbours (at most half the average cluster size); 0 for either: on X
        itself. 2 rounds of 10 (default), ACC over seeds 0-2: searchsnippets
        0.749 -> 0.774, stackoverflow 0.740 -> 0.753, 10,000 MNIST digits 0.555
        -> 0.585, digits_hard 0.588 -> 0.587, digits 0.824 -> 0.811
        (docs/benchmarks/deep_frozen.md, fourth round).
    whiten_power : float in [-1, 0]
        With ``init_space="input"`` and smoothing: each principal axis of that
        space is scaled by its variance to this power before the rows are
        renormalised (0: none, -0.5: full whitening), so that a few dominant axes
        do not decide the initial partition alone (DeepCluster's
        ``whiten_power``; PCA-whitening is the standard post-processing of image
        descriptors for retrieval). -0.25 (default) against 0, ACC over seeds 0-2:
        searchsnippets 0.773 -> 0.783, stackoverflow 0.754 -> 0.751, digits 0.813
        -> 0.816 (std 0.020 -> 0.002), the same texts embedded by the Universal
        Sentence Encoder 0.754 -> 0.803 and 0.469 -> 0.601, 10,000 MNIST digits
        0.586 -> 0.598, digits_hard 0.587 -> 0.600; on the bag-of-words (LSA)
        vectors of those texts, which have no dominant axes, it loses (0.451 ->
        0.404, 0.754 -> 0.699) (docs/benchmarks/deep_frozen.md, fifth round).
    update_epochs : int or None
        Default ``max_epochs`` of :meth:`update`; None: a tenth of what
        ``n_epochs=None`` gives for the update's N (at least 1).
    """

    name: ClassVar[str] = "odc"
    _TARGET_ITERATIONS: ClassVar[int] = 1000
    _MIN_EPOCHS: ClassVar[int] = 5
    _MAX_EPOCHS: ClassVar[int] = 60
    _WARMUP_ITERATIONS: ClassVar[int] = 100

    def __init__(
        self,
        n_clusters: int | None = 8,
        random_state: int = 0,
        device: str = "auto",
        progress_callback=None,
        cancel_check=None,
        hidden_dim: int = 512,
        feature_dim: int = 128,
        n_epochs: int | None = None,
        warmup_epochs: int | None = None,
        batch_size: int = 256,
        lr: float = 0.1,
        weight_decay: float = 1e-5,
        memory_momentum: float = 0.2,
        centroid_update_interval: int = 10,
        min_cluster: int | None = None,
        reweight_power: float = 0.5,
        input_noise: float = 0.5,
        input_dropout: float = 0.2,
        temperature: float = 0.1,
        tol: float = 0.001,
        kmeans_n_init: int = 10,
        init_space: str = "input",
        n_neighbors: int = 10,
        smooth_steps: int = 2,
        whiten_power: float = -0.25,
        update_epochs: int | None = None,
    ) -> None:
        self.n_clusters = n_clusters
        self.random_state = random_state
        self.device = device
        self.progress_callback = progress_callback
        self.cancel_check = cancel_check
        self.hidden_dim = hidden_dim
        self.feature_dim = feature_dim
        self.n_epochs = n_epochs
        self.warmup_epochs = warmup_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.memory_momentum = memory_momentum
        self.centroid_update_interval = centroid_update_interval
        self.min_cluster = min_cluster
        self.reweight_power = reweight_power
        self.input_noise = input_noise
        self.input_dropout = input_dropout
        self.temperature = temperature
        self.tol = tol
        self.kmeans_n_init = kmeans_n_init
        self.init_space = init_space
        self.n_neighbors = n_neighbors
        self.smooth_steps = smooth_steps
        self.whiten_power = whiten_power
        self.update_epochs = update_epochs

    # -- parameters ------------------------------------------------------------
    def _validate_params(self) -> None:
        super()._validate_params()

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ClusteringInputError(message)

        def is_int(value: Any, low: int) -> bool:
            return isinstance(value, int | np.integer) and value >= low

        for key in ("hidden_dim", "feature_dim", "centroid_update_interval", "kmeans_n_init"):
            need(is_int(getattr(self, key), 1), f"{key} must be an integer >= 1")
        need(is_int(self.batch_size, 2), "batch_size must be an integer >= 2 (BatchNorm)")
        for key in ("n_neighbors", "smooth_steps"):
            need(is_int(getattr(self, key), 0), f"{key} must be an integer >= 0")
        for key, low in (
            ("n_epochs", 1),
            ("min_cluster", 1),
            ("warmup_epochs", 0),
            ("update_epochs", 0),
        ):
            value = getattr(self, key)
            need(value is None or is_int(value, low), f"{key} must be None or an integer >= {low}")
        need(0.0 < self.memory_momentum <= 1.0, "memory_momentum must be in (0, 1]")
        need(0.0 <= self.input_dropout < 1.0, "input_dropout must be in [0, 1)")
        need(self.lr > 0 and self.temperature > 0, "lr and temperature must be > 0")
        for key in ("weight_decay", "reweight_power", "input_noise", "tol"):
            need(getattr(self, key) >= 0, f"{key} must be >= 0")
        need(self.init_space in ("input", "neck"), "init_space must be 'input' or 'neck'")
        check_whiten_power(self.whiten_power)

    def _iterations_per_epoch(self, n: int) -> int:
        return max(1, n // self.batch_size)

    def _epochs(self, n: int) -> int:
        if self.n_epochs is not None:
            return int(self.n_epochs)
        wanted = math.ceil(self._TARGET_ITERATIONS / self._iterations_per_epoch(n))
        return int(min(self._MAX_EPOCHS, max(self._MIN_EPOCHS, wanted)))

    def _warmup(self, n: int) -> int:
        if self.init_space != "input":
            return 0
        if self.warmup_epochs is not None:
            return int(self.warmup_epochs)
        return math.ceil(self._WARMUP_ITERATIONS / self._iterations_per_epoch(n))

    def _min_cluster(self, n: int) -> int:
        if self.min_cluster is not None:
            return int(self.min_cluster)
        return min(PAPER_MIN_CLUSTER, max(1, n // (5 * self.n_clusters_)))

    # -- network ---------------------------------------------------------------
    def _build(self) -> None:
        d, hidden, out = self.n_features_in_, self.hidden_dim, self.feature_dim
        self.input_mean_ = torch.zeros(d, device=self.device_)
        self.input_scale_ = 1.0
        self.neck_ = nn.Sequential(
            nn.Linear(d, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(hidden, out),
            nn.ReLU(),
        ).to(self.device_)
        self.head_ = nn.Linear(out, self.n_clusters_).to(self.device_)

    def _fit_standardizer(self, X: np.ndarray) -> None:
        """Mean vector and one global scale (RMS over all dimensions), one chunked float64 pass."""
        n, d = X.shape
        total, total_sq = np.zeros(d), 0.0
        for start in range(0, n, INFERENCE_BATCH):
            chunk = np.asarray(X[start : start + INFERENCE_BATCH], dtype=np.float64)
            total += chunk.sum(axis=0)
            total_sq += float((chunk * chunk).sum())
        mean = total / n
        var = max(total_sq / n - float(mean @ mean), 0.0) / d
        self.input_mean_ = torch.from_numpy(mean).float().to(self.device_)
        self.input_scale_ = math.sqrt(var) if var > 1e-12 else 1.0

    def _standardized(self, rows: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(rows, dtype=np.float32)).to(self.device_)
        return (x - self.input_mean_) / self.input_scale_

    @torch.no_grad()
    def _eval_layers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The eval-mode neck as two affine maps ``(W1, b1, W2, b2)`` (weights transposed):
        the standardisation and BatchNorm's running statistics folded into the first
        layer, which makes inference about a third faster than running the modules."""
        fc1, bn, fc2 = self.neck_[0], self.neck_[1], self.neck_[4]
        gain = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        w = fc1.weight / self.input_scale_
        b = fc1.bias - w @ self.input_mean_
        w1 = (w * gain[:, None]).T.contiguous()
        b1 = (b - bn.running_mean) * gain + bn.bias
        return w1, b1, fc2.weight.T.contiguous(), fc2.bias.clone()

    @torch.no_grad()
    def _eval_features(self, X: np.ndarray):
        """Yield ``(start, unit eval-mode neck features)`` for chunks of X.

        Training memory, ``labels_`` and ``predict`` all come from here with the
        same chunks, so ``predict(X)`` reproduces ``labels_`` bit for bit.
        """
        w1, b1, w2, b2 = self._eval_layers()
        for start in range(0, X.shape[0], INFERENCE_BATCH):
            # a copy of the chunk: rows of a read-only memmap cannot back a tensor
            x = torch.tensor(
                np.asarray(X[start : start + INFERENCE_BATCH], dtype=np.float32),
                device=self.device_,
            )
            hidden = torch.addmm(b1, x, w1).relu_()
            yield start, F.normalize(torch.addmm(b2, hidden, w2).relu_(), dim=1)

    def _features(self, X: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """Unit eval-mode neck features of X (n, feature_dim), written into ``out``.

        One preallocated tensor (not nn.batched_apply, which concatenates) so
        the memory-sized array exists once, not twice.
        """
        if out is None:
            out = torch.empty((X.shape[0], self.feature_dim), device=self.device_)
        for start, f in self._eval_features(X):
            out[start : start + f.shape[0]] = f
        return out

    def _make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            [*self.neck_.parameters(), *self.head_.parameters()],
            lr=self.lr,
            momentum=0.9,
            weight_decay=self.weight_decay,
        )

    # -- fit -------------------------------------------------------------------
    def _fit(self, X: np.ndarray) -> None:
        n = X.shape[0]
        gen = seed_everything(self.random_state)
        self._build()
        self._fit_standardizer(X)
        if self.init_space == "input":
            # before the memory exists, so the peaks of k-means and of the memory do
            # not add up
            _, labels, _ = run_kmeans(
                self._initial_space(X),
                self.n_clusters_,
                n_init=self.kmeans_n_init,
                random_state=self.random_state,
            )
            memory = self._features(X)
        else:
            memory = self._features(X)
            _, labels, _ = run_kmeans(
                memory.cpu().numpy(),
                self.n_clusters_,
                n_init=self.kmeans_n_init,
                random_state=self.random_state,
                spherical=True,
            )
        mem = _Memory(memory, torch.from_numpy(labels).to(self.device_), self.n_clusters_)
        self._report("init", 1, 1)
        optimizer = self._make_optimizer()
        history = self._train(
            X, mem, optimizer, gen, epochs=self._warmup(n), stage="warmup", relabel=False
        )
        history += self._train(
            X,
            mem,
            optimizer,
            gen,
            epochs=self._epochs(n),
            stage="train",
            min_cluster=self._min_cluster(n),
        )
        self._settle(X, mem, parents=None, max_shift=None)
        self.cluster_centers_ = mem.centroids.cpu().numpy()
        self.labels_ = mem.labels.cpu().numpy()
        self.history_ = history

    def _initial_space(self, X: np.ndarray) -> np.ndarray:
        """Rows the initial k-means partitions (``init_space="input"``): the smoothed
        centred unit input (:func:`~clustering_service.algorithms.knn.smoothed_input`);
        X itself when ``smooth_steps`` or ``n_neighbors`` is 0 (the standardisation,
        a shift and one scale, leaves the partition unchanged, and a memmapped X is
        not copied)."""
        if self.smooth_steps == 0 or self.n_neighbors == 0:
            return X
        return smoothed_input(
            X,
            self.input_mean_.cpu().numpy(),
            self.n_neighbors,
            self.n_clusters_,
            self.smooth_steps,
            self.random_state,
            power=float(self.whiten_power),
        )

    def _settle(
        self, X: np.ndarray, mem: _Memory, parents: torch.Tensor | None, max_shift: float | None
    ) -> None:
        """Refresh the memory with eval-mode features (no noise, no dropout), relabel,
        take one centroid step and relabel, so ``labels_`` equals ``predict(X)``."""
        self._features(X, out=mem.features)
        mem.relabel_all()
        mem.recompute_centroids()
        if parents is not None and max_shift is not None:
            mem.centroids, _ = clip_centroids(mem.centroids, parents, max_shift)
        mem.relabel_all()

    def _batches(self, n: int, gen: torch.Generator) -> list[np.ndarray]:
        """Shuffled index batches, each sorted (cheap row gathers from a memmap); a
        last batch of one row, which BatchNorm cannot train on, joins the previous one."""
        perm = torch.randperm(n, generator=gen).numpy()
        starts = list(range(0, n, self.batch_size))
        if len(starts) > 1 and n - starts[-1] < 2:
            starts.pop()
        return [np.sort(perm[a:b]) for a, b in zip(starts, [*starts[1:], n], strict=True)]

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # draws come from the CPU generator, so a seed gives the same noise on any device
        if self.input_noise > 0:
            x = x + self.input_noise * torch.randn(x.shape, generator=gen).to(x.device)
        if self.input_dropout > 0:
            keep = torch.rand(x.shape, generator=gen).to(x.device) >= self.input_dropout
            x = x * keep / (1.0 - self.input_dropout)
        return x

    def _train(
        self,
        X: np.ndarray,
        mem: _Memory,
        optimizer: torch.optim.Optimizer,
        gen: torch.Generator,
        *,
        epochs: int,
        stage: str,
        relabel: bool = True,
        min_cluster: int | None = None,
        parents: torch.Tensor | None = None,
        max_shift: float | None = None,
    ) -> list[dict[str, Any]]:
        """Up to ``epochs`` ODC epochs over X, updating ``mem`` in place; per-epoch log.

        ``min_cluster`` None: no small-cluster handling; ``parents`` and
        ``max_shift``: every centroid refresh is clipped to that distance.
        """
        n, m = X.shape[0], float(self.memory_momentum)
        clip = parents is not None and max_shift is not None
        weights = loss_weights(mem.counts, self.reweight_power)
        history: list[dict[str, Any]] = []
        self.neck_.train()
        self.head_.train()
        iteration = 0

        def refresh_centroids() -> int:
            mem.recompute_centroids()
            if not clip:
                return 0
            mem.centroids, n_clipped = clip_centroids(mem.centroids, parents, max_shift)
            return n_clipped

        for epoch in range(1, epochs + 1):
            start_labels = mem.labels.clone()
            loss_sum, n_fixed, n_clipped = 0.0, 0, 0
            # one torch thread per step: on a busy CPU intra-op threads spin (nn.step_threads)
            with step_threads(self.device_):
                for batch_no, rows in enumerate(self._batches(n, gen)):
                    idx = torch.from_numpy(rows).to(self.device_)
                    x = self._augment(self._standardized(np.take(X, rows, axis=0)), gen)
                    feats = self.neck_(x)
                    loss = F.cross_entropy(self.head_(feats), mem.labels[idx], weight=weights)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    loss_sum += float(loss.detach()) * rows.size
                    with torch.no_grad():
                        f_new = F.normalize(feats.detach(), dim=1)
                        f = F.normalize((1.0 - m) * mem.features[idx] + m * f_new, dim=1)
                        mem.move(idx, f, relabel)
                    iteration += 1
                    if relabel and iteration % self.centroid_update_interval == 0:
                        n_clipped += refresh_centroids()
                        # the running counts make the common no-small-cluster case O(k)
                        if min_cluster is not None and int(mem.counts.min()) < min_cluster:
                            fix = fix_small_clusters(
                                mem.features,
                                mem.labels,
                                mem.centroids,
                                min_cluster,
                                random_state=self.random_state + iteration,
                            )
                            if fix.disbanded:
                                mem.relabelled(fix.moved, fix.old_labels)
                                mem.recompute_centroids()
                                n_fixed += len(fix.disbanded)
                        weights = loss_weights(mem.counts, self.reweight_power)
                    if batch_no % _CANCEL_EVERY == _CANCEL_EVERY - 1:
                        self._check_cancel()
            mem.resum()
            n_clipped += refresh_centroids()
            loss, change = loss_sum / n, float((mem.labels != start_labels).double().mean())
            stats = {
                "small_clusters_fixed": n_fixed,
                "centroids_clipped": n_clipped,
                "cluster_size_min": int(mem.counts.min()),
                "cluster_size_max": int(mem.counts.max()),
            }
            history.append(
                {"stage": stage, "epoch": epoch, "loss": loss, "label_change": change, **stats}
            )
            self._report(stage, epoch, epochs, loss, change, **stats)
            if relabel and change < self.tol:
                break
        return history

    # -- predict ---------------------------------------------------------------
    def _similarities(self, X: np.ndarray, reduce) -> np.ndarray:
        centroids = torch.from_numpy(self.cluster_centers_).to(self.device_)
        return np.concatenate(
            [reduce(f @ centroids.T).cpu().numpy() for _, f in self._eval_features(X)]
        )

    def _predict(self, X: np.ndarray) -> np.ndarray:
        return self._similarities(X, lambda s: s.argmax(dim=1)).astype(np.int64)

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self._similarities(X, lambda s: torch.softmax(s / self.temperature, dim=1))

    # -- update ----------------------------------------------------------------
    def _update(
        self,
        X: np.ndarray,
        *,
        max_epochs: int | None,
        max_centroid_shift: float | None,
        **params: Any,
    ) -> None:
        if params:
            raise ClusteringInputError(f"unknown update parameter(s) for odc: {sorted(params)}")
        self._move_to_device()
        gen = seed_everything(self.random_state + 1)
        if max_epochs is not None:
            epochs = int(max_epochs)
        elif self.update_epochs is not None:
            epochs = int(self.update_epochs)
        else:
            epochs = max(1, self._epochs(X.shape[0]) // 10)
        parents = torch.from_numpy(self.cluster_centers_).to(self.device_)
        memory = self._features(X)
        mem = _Memory(memory, nearest_centroid(memory, parents), self.n_clusters_)
        mem.centroids = parents.clone()
        initial = mem.labels.clone()
        history: list[dict[str, Any]] = []
        if epochs > 0:
            history = self._train(
                X,
                mem,
                self._make_optimizer(),
                gen,
                epochs=epochs,
                stage="update",
                parents=parents,
                max_shift=max_centroid_shift,
            )
            self._settle(X, mem, parents, max_centroid_shift)
        shift = (mem.centroids - parents).norm(dim=1)
        self.cluster_centers_ = mem.centroids.cpu().numpy()
        self.labels_ = mem.labels.cpu().numpy()
        self.update_info_ = {
            "epochs": len(history),
            "centroid_shift_mean": float(shift.mean()),
            "centroid_shift_max": float(shift.max()),
            "label_change": float((mem.labels != initial).double().mean()),
            "centroids_clipped": sum(r["centroids_clipped"] for r in history),
            "cluster_size_min": int(mem.counts.min()),
            "cluster_size_max": int(mem.counts.max()),
            "history": history,
        }

    def _move_to_device(self) -> None:
        self.neck_.to(self.device_)
        self.head_.to(self.device_)
        self.input_mean_ = self.input_mean_.to(self.device_)

    # -- persistence -----------------------------------------------------------
    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        tensors = {
            **state_to_numpy(self.neck_, "neck."),
            **state_to_numpy(self.head_, "head."),
            "input_mean": self.input_mean_.cpu().numpy(),
            "cluster_centers": self.cluster_centers_,
        }
        return tensors, {"input_scale": self.input_scale_}

    def _set_state(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self._build()
        # BaseClusterer.save passes every tensor through np.ascontiguousarray, which
        # turns BatchNorm's 0-d step counter into shape (1,); give it its shape back
        tensors = {
            k: np.reshape(v, ()) if k.endswith("num_batches_tracked") else v
            for k, v in tensors.items()
        }
        load_numpy_state(self.neck_, tensors, "neck.")
        load_numpy_state(self.head_, tensors, "head.")
        mean = np.asarray(tensors["input_mean"], dtype=np.float32)
        centers = np.asarray(tensors["cluster_centers"], dtype=np.float32)
        if mean.shape != (self.n_features_in_,):
            raise ValueError(f"input_mean has shape {mean.shape}")
        if centers.shape != (self.n_clusters_, self.feature_dim):
            raise ValueError(f"cluster_centers has shape {centers.shape}")
        self.input_mean_ = torch.from_numpy(mean).to(self.device_)
        self.input_scale_ = float(meta["input_scale"])
        self.cluster_centers_ = centers
