"""Neighbour-consistency clustering of frozen embeddings (SCAN, Van Gansbeke et
al. 2020, arXiv 2005.12320, on frozen features as in TEMI, Adaloglou et al.
2023, arXiv 2303.17896).

Nothing trains the backbone: a small network on top of the input vectors learns
a clustering in which an item and its nearest neighbours agree. Stages:

1. **Space and neighbours.** Rows are centred (stored mean vector) and
   L2-normalised; the ``n_neighbors`` nearest neighbours of every row (cosine)
   are mined once (:func:`~clustering_service.algorithms.knn.nearest_neighbors`:
   exact up to 50k rows, cell-restricted beyond), among the distinct rows (a
   row's copies are never its neighbours), at most half the average cluster
   size ``n_distinct / (2 k)`` of them.
2. **Initial partitions.** Each row is averaged with its neighbours
   (``smooth_steps`` rounds of ``z <- normalise((z + mean of its neighbours) /
   2)``, a diffusion over the kNN graph that pulls an item toward its local
   consensus) and k-means runs on the smoothed vectors, once per head with its
   own seed (``kmeans_n_init`` restarts each). On the real text embeddings this
   alone gains 0.03-0.04 ACC over k-means on the raw vectors
   (docs/benchmarks/neighbors.md). The vectors smoothed are, by ``init_space``,
   the input's (with the input-space neighbours), the learned projection's of
   step 3's pre-training (with neighbours mined again there), or both side by
   side (the default): the learned space has purer neighbours, but it changes
   with the seed and so did the result (ACC std 0.03 over seeds); the input
   space is the same for every seed and anchors the partition. k-means runs on
   the top ``proj_dim`` principal components of those vectors (about the same
   result as on all of them, at a quarter of the cost; optionally whitened,
   ``whiten_power``). Optionally (``init_em_steps`` >
   0, off by default) each k-means partition is refined by EM steps of a
   mixture of unit directions with free mixing weights (:func:`refine_partition`).
3. **Network.** (Its projection is pre-trained first, contrastively: an item and
   a random one of its neighbours are a positive pair, InfoNCE.)
   ``f = normalise(MLP(z))`` (``d -> hidden_dim -> BatchNorm ->
   ReLU -> proj_dim``) and ``n_heads`` heads of ``k`` unit prototypes each;
   logits are cosine similarities over ``temperature``. Each head first learns
   its initial partition (cross-entropy, ``distill_epochs``), then all train on
   the SCAN loss: ``-log <p_i, p_j>`` for an item ``i`` and a random one of its
   neighbours ``j``, minus ``entropy_weight`` times the entropy of the batch's
   mean prediction (the term against collapse), plus ``anchor_weight`` times
   the cross-entropy toward the head's initial partition. The anchor keeps the
   loss from tearing up a partition where neighbours often disagree with it:
   on stackoverflow embedded by LSA (20-NN label purity 0.54) plain SCAN fell
   from 0.57-0.62 ACC to 0.44 (docs/benchmarks/neighbors.md, eleventh round).
4. **Choice of head.** The head with the lowest SCAN loss over the whole data
   (every item with all its neighbours, no noise) is kept; labels are never
   looked at.
5. **Self-labelling** (``self_label_epochs``): the kept head is trained with
   cross-entropy on its own confident predictions (max probability >=
   ``confidence``; in a cluster where fewer than half of the items reach it, its
   more confident half: :func:`self_label_targets`), class-balanced, the input
   replaced by a random neighbour with probability ``neighbor_prob``.

Clustering space: the unit projection ``f``. ``cluster_centers_`` are the kept
head's unit prototypes there, shape ``(n_clusters_, proj_dim)``;
``predict_proba`` is the head's softmax, ``predict`` its argmax, which is the
prototype most similar to ``f``.

Incremental update (:meth:`NeighborClusterer.update`): neighbours are mined
within the current data X (so a new item's neighbours are current items), the
parent model labels X, and training continues from the parent's network for
``max_epochs`` (default ``update_epochs``) epochs on the SCAN loss plus
cross-entropy toward the parent's confident labels: ids keep their meaning by
construction (the same prototypes) and retained items keep their label unless
their neighbourhood changed. With ``max_centroid_shift`` every prototype is
pulled back, after each step, along the great circle to within that (chord)
distance of its parent.
"""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clustering_service.algorithms.base import BaseClusterer, CancelCheck, ProgressCallback
from clustering_service.algorithms.exceptions import ClusteringInputError
from clustering_service.algorithms.kmeans import run_kmeans
from clustering_service.algorithms.knn import (
    capped_neighbors,
    check_whiten_power,
    principal_components,
    smooth,
)
from clustering_service.algorithms.nn import (
    INFERENCE_BATCH,
    load_numpy_state,
    seed_everything,
    state_to_numpy,
    step_threads,
)
from clustering_service.algorithms.odc import clip_centroids

#: items the SCAN stage sees when ``epochs`` is None: ``ceil(TRAIN_SAMPLES / N)``
#: epochs, clipped to [MIN_AUTO_EPOCHS, MAX_AUTO_EPOCHS]
TRAIN_SAMPLES = 300_000
#: the same for the contrastive pre-training of the projection
PRETRAIN_SAMPLES = 150_000
#: and for learning the initial partitions, and for self-labelling
DISTILL_SAMPLES = 50_000
SELF_LABEL_SAMPLES = 200_000
MIN_AUTO_EPOCHS = 2
MAX_AUTO_EPOCHS = 100
#: spaces the initial k-means can partition (``init_space``)
INIT_SPACES = ("both", "learned", "input")
#: iterations between cancel checks inside an epoch
_CANCEL_EVERY = 200
_EPS = 1e-7


class _Net(nn.Module):
    """Centring + L2 normalisation (buffers) -> MLP projection -> unit vectors;
    ``n_heads`` heads of ``k`` prototypes, cosine logits over ``temperature``."""

    def __init__(
        self, d: int, hidden: int, proj_dim: int, k: int, n_heads: int, temperature: float
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(d))
        self.proj = nn.Sequential(
            nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, proj_dim)
        )
        self.prototypes = nn.Parameter(F.normalize(torch.randn(n_heads, k, proj_dim), dim=-1))
        self.temperature = temperature

    def space(self, x: torch.Tensor) -> torch.Tensor:
        """The centred, unit-length input (where neighbours are mined)."""
        return F.normalize(x - self.mean, dim=1)

    def features(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(z), dim=1)

    def logits(self, f: torch.Tensor, heads: slice | int = slice(None)) -> torch.Tensor:
        """(batch, heads, k) cosine logits (a single int head: (batch, k))."""
        protos = F.normalize(self.prototypes[heads], dim=-1)
        if protos.dim() == 2:
            return f @ protos.T / self.temperature
        return torch.einsum("bp,hkp->bhk", f, protos) / self.temperature

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(z))


def scan_loss(
    p_anchor: torch.Tensor, p_neighbor: torch.Tensor, entropy_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SCAN's loss per head: ``-mean log <p_i, p_j> - entropy_weight * H(mean_i p_i)``.

    p_anchor, p_neighbor : (batch, heads, k) probabilities of the items and of one
    neighbour each. Returns (loss, consistency, entropy), each of shape (heads,).
    """
    consistency = -torch.log((p_anchor * p_neighbor).sum(-1).clamp_min(_EPS)).mean(0)
    mean_p = p_anchor.mean(0)
    entropy = -(mean_p * torch.log(mean_p.clamp_min(_EPS))).sum(-1)
    return consistency - entropy_weight * entropy, consistency, entropy


def self_label_targets(P: torch.Tensor, confidence: float) -> torch.Tensor:
    """Self-labels from the probabilities P (n, k): (n,) the argmax where its
    probability reaches ``confidence``, -1 elsewhere; in a cluster where fewer than
    half of the items reach it, its more confident half (probability >= the
    cluster's median) instead. Every cluster thus keeps targets: with a global
    threshold alone, a large spread-out cluster can have none, and two epochs
    moved all 950 items of such a cluster into a compact one of 50
    (docs/benchmarks/neighbors.md, seventh round)."""
    conf, label = P.max(-1)
    k = P.shape[1]
    counts = torch.bincount(label, minlength=k)
    # per-cluster medians: sort by (label, confidence), take each segment's middle
    order = torch.argsort(label.double() + 0.5 * conf.double())
    starts = torch.cumsum(counts, 0) - counts
    middle = (starts + (counts - 1).clamp_min(0) // 2).clamp(max=max(len(label) - 1, 0))
    median = torch.where(counts > 0, conf[order[middle]], torch.ones_like(conf[:1]))
    threshold = torch.minimum(median, torch.full_like(median, confidence))
    return torch.where(conf >= threshold[label], label, torch.full_like(label, -1))


def refine_partition(
    Z: np.ndarray, labels: np.ndarray, k: int, kappa: float, steps: int
) -> np.ndarray:
    """EM for a mixture of ``k`` unit directions with free mixing weights, from a hard
    partition of the unit rows Z: ``r_ic ∝ pi_c exp(kappa <z_i, mu_c>)``, ``mu_c =
    normalise(sum_i r_ic z_i)``, ``pi_c = mean_i r_ic``; returns the final argmax.
    k-means gives every cluster the same spread, so on imbalanced data it tends to
    split a large group and merge a small one into a neighbour; the mixing weights
    let a large cluster stay whole. They also let a cluster grow at its neighbours'
    expense where clusters are poorly separated, which is why the estimator leaves it
    off by default (docs/benchmarks/neighbors.md, third round). If a cluster ends up
    with no row, the input partition is returned unchanged.
    """
    n = Z.shape[0]
    resp = np.zeros((n, k), dtype=np.float32)
    resp[np.arange(n), labels] = 1.0
    for _ in range(steps):
        mu = resp.T @ Z
        mu /= np.maximum(np.linalg.norm(mu, axis=1, keepdims=True), 1e-12)
        log_pi = np.log(np.maximum(resp.mean(axis=0), 1e-12))
        for start in range(0, n, INFERENCE_BATCH):
            rows = slice(start, start + INFERENCE_BATCH)
            logit = kappa * (Z[rows] @ mu.T) + log_pi
            logit -= logit.max(axis=1, keepdims=True)
            e = np.exp(logit)
            resp[rows] = e / e.sum(axis=1, keepdims=True)
    out = resp.argmax(axis=1).astype(np.int64)
    if np.bincount(out, minlength=k).min() == 0:
        return labels
    return out


class NeighborClusterer(BaseClusterer):
    """Neighbour-consistency clustering head on frozen embeddings (SCAN-style).

    Parameters
    ----------
    n_clusters, random_state, device, progress_callback, cancel_check : as in
        :class:`BaseClusterer`.
    n_neighbors : nearest neighbours mined per item (cosine, centred input), capped
        at ``n_distinct / (2 k)`` (at least 1).
    pretrain_epochs : epochs of contrastive pre-training of the projection (an item
        and a random neighbour are a positive pair, InfoNCE); None:
        ``ceil(PRETRAIN_SAMPLES / N)`` clipped to [MIN_AUTO_EPOCHS, MAX_AUTO_EPOCHS];
        0: none (neighbours and initial k-means then use the input space).
    contrast_temperature : temperature of the InfoNCE logits.
    smooth_steps : neighbour-averaging rounds before the initial k-means (0: k-means
        on the unsmoothed vectors).
    init_space : {"both", "learned", "input"}: the vectors the initial k-means
        partitions: the centred, normalised input, the pre-trained projection
        (each smoothed over its own neighbours), or the two side by side,
        ``[input, learned] / sqrt(2)`` (the default: on the real sets it cut the
        ACC spread over seeds from 0.03 to 0.01 or less;
        docs/benchmarks/neighbors.md, eighth round). Without pre-training all
        three are the input. k-means sees the top ``proj_dim`` principal
        components of the space (:func:`principal_components`).
    hidden_dim, proj_dim : widths of the projection MLP.
    n_heads : heads trained together, each from its own initial k-means; the one
        with the lowest SCAN loss is kept. 8 rather than 4 gained 0.002-0.013 ACC
        on each real set; the fit costs 4.8x k-means at 100k rows instead of 3.8x
        (docs/benchmarks/neighbors.md).
    temperature : of the cosine logits.
    entropy_weight : weight of the entropy of the mean prediction in the SCAN loss.
    anchor_weight : weight of the cross-entropy toward each head's initial partition
        added to the SCAN loss (0: plain SCAN); 1 is the weight :meth:`update`
        gives its anchor toward the parent's labels.
    epochs : SCAN epochs; None: ``ceil(TRAIN_SAMPLES / N)`` clipped to
        [MIN_AUTO_EPOCHS, MAX_AUTO_EPOCHS].
    distill_epochs : epochs learning the initial partitions; None:
        ``ceil(DISTILL_SAMPLES / N)`` clipped likewise.
    self_label_epochs : epochs of self-labelling (0: none); None:
        ``ceil(SELF_LABEL_SAMPLES / N)`` clipped likewise.
    confidence : probability above which a prediction is a self-label (a cluster
        with fewer than half its items above it uses its more confident half).
    neighbor_prob : in self-labelling, probability that the input is a neighbour.
    batch_size, lr, weight_decay : Adam settings.
    kmeans_n_init : restarts of each initial k-means.
    init_em_steps : EM steps refining each initial k-means partition as a mixture of
        unit directions with free mixing weights (:func:`refine_partition`, sharpness
        ``1 / temperature``); 0: none.
    update_epochs : default ``max_epochs`` of :meth:`update`.
    whiten_power : in [-1, 0]: the initial k-means space's principal axes are scaled
        by their variance to this power (0: none, the default; -0.25: half
        whitening, as DeepCluster and ODC do by default). Opt-in: on
        stackoverflow embedded by the Universal Sentence Encoder, whose variance
        sits in few axes, -0.25 gains 0.07 ACC, and 0.06 on digits, but it makes
        the heads' initial partitions far more diverse, and the SCAN loss then
        picks among them less reliably (searchsnippets' ACC std 0.010 -> 0.035);
        on bag-of-words (LSA) vectors it loses 0.05-0.18
        (docs/benchmarks/neighbors.md, twelfth round).

    Attributes
    ----------
    labels_ : (n,) int64.
    cluster_centers_ : (k, proj_dim) unit prototypes of the kept head.
    fit_info_ : dict: per-head SCAN loss, kept head, per-head fraction of rows the EM
        refinement moved (empty without it), per-head fraction of rows whose label
        after SCAN differs from the head's initial partition (``scan_moved``),
        ``init_dims`` (width of the initial partitions' space, and of its principal
        components the k-means ran on), epochs, neighbours per item (after the
        cap), seconds per stage.
    update_info_ : dict after :meth:`update`.
    """

    name: ClassVar[str] = "neighbors"

    def __init__(
        self,
        n_clusters: int | None = 8,
        random_state: int = 0,
        device: str = "auto",
        progress_callback: ProgressCallback | None = None,
        cancel_check: CancelCheck | None = None,
        n_neighbors: int = 20,
        pretrain_epochs: int | None = None,
        contrast_temperature: float = 0.2,
        smooth_steps: int = 2,
        hidden_dim: int = 512,
        proj_dim: int = 128,
        n_heads: int = 8,
        temperature: float = 0.1,
        entropy_weight: float = 1.0,
        epochs: int | None = None,
        distill_epochs: int | None = None,
        self_label_epochs: int | None = None,
        confidence: float = 0.99,
        neighbor_prob: float = 0.0,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        kmeans_n_init: int = 10,
        init_em_steps: int = 0,
        update_epochs: int = 2,
        init_space: str = "both",
        anchor_weight: float = 1.0,
        whiten_power: float = 0.0,
    ) -> None:
        self.n_clusters = n_clusters
        self.random_state = random_state
        self.device = device
        self.progress_callback = progress_callback
        self.cancel_check = cancel_check
        self.n_neighbors = n_neighbors
        self.pretrain_epochs = pretrain_epochs
        self.contrast_temperature = contrast_temperature
        self.smooth_steps = smooth_steps
        self.hidden_dim = hidden_dim
        self.proj_dim = proj_dim
        self.n_heads = n_heads
        self.temperature = temperature
        self.entropy_weight = entropy_weight
        self.epochs = epochs
        self.distill_epochs = distill_epochs
        self.self_label_epochs = self_label_epochs
        self.confidence = confidence
        self.neighbor_prob = neighbor_prob
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.kmeans_n_init = kmeans_n_init
        self.init_em_steps = init_em_steps
        self.update_epochs = update_epochs
        self.init_space = init_space
        self.anchor_weight = anchor_weight
        self.whiten_power = whiten_power

    # -- parameters ------------------------------------------------------------
    def _validate_params(self) -> None:
        super()._validate_params()

        def is_int(value: Any, low: int) -> bool:
            integer = isinstance(value, int | np.integer) and not isinstance(value, bool)
            return integer and value >= low

        for key, low in (
            ("n_neighbors", 1),
            ("smooth_steps", 0),
            ("hidden_dim", 1),
            ("proj_dim", 1),
            ("n_heads", 1),
            ("batch_size", 2),
            ("kmeans_n_init", 1),
            ("init_em_steps", 0),
            ("update_epochs", 0),
        ):
            if not is_int(getattr(self, key), low):
                raise ClusteringInputError(
                    f"{key} must be an integer >= {low}, got {getattr(self, key)!r}"
                )
        for key in ("epochs", "pretrain_epochs", "distill_epochs", "self_label_epochs"):
            value = getattr(self, key)
            if value is not None and not is_int(value, 0):
                raise ClusteringInputError(f"{key} must be None or an integer >= 0, got {value!r}")
        for key in ("temperature", "contrast_temperature", "lr"):
            if not (isinstance(getattr(self, key), int | float) and getattr(self, key) > 0):
                raise ClusteringInputError(f"{key} must be > 0, got {getattr(self, key)!r}")
        for key in ("entropy_weight", "anchor_weight", "weight_decay"):
            if not (isinstance(getattr(self, key), int | float) and getattr(self, key) >= 0):
                raise ClusteringInputError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        check_whiten_power(self.whiten_power)
        if self.init_space not in INIT_SPACES:
            raise ClusteringInputError(
                f"init_space must be one of {', '.join(INIT_SPACES)}, got {self.init_space!r}"
            )
        for key in ("confidence", "neighbor_prob"):
            value = getattr(self, key)
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
                raise ClusteringInputError(f"{key} must be in [0, 1], got {value!r}")

    @staticmethod
    def _auto_epochs(value: int | None, samples: int, n: int) -> int:
        if value is not None:
            return int(value)
        return int(min(MAX_AUTO_EPOCHS, max(MIN_AUTO_EPOCHS, math.ceil(samples / n))))

    # -- helpers ---------------------------------------------------------------
    def _build(self, n_heads: int) -> _Net:
        return _Net(
            self.n_features_in_,
            int(self.hidden_dim),
            int(self.proj_dim),
            self.n_clusters_,
            n_heads,
            float(self.temperature),
        ).to(self.device_)

    def _rows(self, X: np.ndarray, rows: np.ndarray | slice) -> torch.Tensor:
        arr = np.ascontiguousarray(X[rows], dtype=np.float32)
        if not arr.flags.writeable:  # rows of a read-only memmap
            arr = arr.copy()
        return torch.from_numpy(arr).to(self.device_)

    @torch.no_grad()
    def _space(self, X: np.ndarray, net: _Net) -> np.ndarray:
        """Centred, unit-length rows of X, float32 (n, d), in chunks."""
        out = np.empty(X.shape, dtype=np.float32)
        for start in range(0, X.shape[0], INFERENCE_BATCH):
            z = net.space(self._rows(X, slice(start, start + INFERENCE_BATCH)))
            out[start : start + z.shape[0]] = z.cpu().numpy()
        return out

    @torch.no_grad()
    def _probs(self, Z: torch.Tensor, net: _Net, heads: slice | int = slice(None)) -> torch.Tensor:
        """Eval-mode softmax of ``heads`` over every row of Z (already in the input space)."""
        was = net.training
        net.eval()
        try:
            out = [
                torch.softmax(net.logits(net.features(Z[s : s + INFERENCE_BATCH]), heads), -1)
                for s in range(0, Z.shape[0], INFERENCE_BATCH)
            ]
        finally:
            net.train(was)
        return torch.cat(out)

    def _optimizer(self, net: _Net) -> torch.optim.Optimizer:
        return torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def _batches(self, n: int, gen: torch.Generator) -> list[torch.Tensor]:
        """One epoch of shuffled index batches; a last batch of one row (BatchNorm
        cannot train on it) joins the previous one."""
        perm = torch.randperm(n, generator=gen)
        batches = list(torch.split(perm, int(self.batch_size)))
        if len(batches) > 1 and batches[-1].numel() < 2:
            batches[-2] = torch.cat([batches[-2], batches.pop()])
        return batches

    def _neighbor_of(
        self, idx: torch.Tensor, neighbors: torch.Tensor, gen: torch.Generator
    ) -> torch.Tensor:
        pick = torch.randint(neighbors.shape[1], (idx.numel(),), generator=gen)
        return neighbors[idx, pick]

    def _scan_epoch(
        self,
        net: _Net,
        opt: torch.optim.Optimizer,
        Z: torch.Tensor,
        neighbors: torch.Tensor,
        gen: torch.Generator,
        *,
        anchor_labels: torch.Tensor | None = None,
        anchor_weight: float = 1.0,
        heads: slice | int = slice(None),
        parents: torch.Tensor | None = None,
        max_shift: float | None = None,
    ) -> float:
        """One epoch of the SCAN loss (summed over heads); with ``anchor_labels``
        ((n,) or (n, heads); -1 = none) plus ``anchor_weight`` times the
        cross-entropy toward them, summed over heads. Returns the mean loss."""
        net.train()
        with step_threads(self.device_):
            return self._scan_steps(
                net, opt, Z, neighbors, gen, anchor_labels, anchor_weight, heads, parents, max_shift
            )

    def _scan_steps(
        self,
        net: _Net,
        opt: torch.optim.Optimizer,
        Z: torch.Tensor,
        neighbors: torch.Tensor,
        gen: torch.Generator,
        anchor_labels: torch.Tensor | None,
        anchor_weight: float,
        heads: slice | int,
        parents: torch.Tensor | None,
        max_shift: float | None,
    ) -> float:
        total, count = 0.0, 0
        for step, idx in enumerate(self._batches(Z.shape[0], gen)):
            idx = idx.to(self.device_)
            nb = self._neighbor_of(idx, neighbors, gen)
            logits = net.logits(net.features(torch.cat([Z[idx], Z[nb]])), heads)
            if logits.dim() == 2:
                logits = logits[:, None, :]
            probs = torch.softmax(logits, -1)
            b = idx.numel()
            loss = scan_loss(probs[:b], probs[b:], self.entropy_weight)[0].sum()
            if anchor_labels is not None and anchor_weight > 0:
                target = anchor_labels[idx].reshape(b, -1)  # (b, heads)
                keep = target >= 0
                if bool(keep.any()):
                    ce = F.cross_entropy(logits[:b][keep], target[keep])
                    loss = loss + anchor_weight * logits.shape[1] * ce
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if parents is not None and max_shift is not None:
                self._clip(net, heads, parents, max_shift)
            total += float(loss.detach())
            count += 1
            if step % _CANCEL_EVERY == _CANCEL_EVERY - 1:
                self._check_cancel()
        return total / max(count, 1)

    @staticmethod
    @torch.no_grad()
    def _clip(net: _Net, head: slice | int, parents: torch.Tensor, max_shift: float) -> None:
        protos = F.normalize(net.prototypes[head], dim=-1)
        clipped, _ = clip_centroids(protos, parents, max_shift)
        net.prototypes[head] = clipped

    @torch.no_grad()
    def _full_scan_loss(self, P: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
        """SCAN loss per head over all items and all their neighbours; P (n, heads, k)."""
        consistency = torch.zeros(P.shape[1], dtype=torch.float64, device=P.device)
        for m in range(neighbors.shape[1]):
            inner = (P * P[neighbors[:, m]]).sum(-1).clamp_min(_EPS)
            consistency -= torch.log(inner).double().mean(0)
        consistency /= neighbors.shape[1]
        mean_p = P.mean(0)
        entropy = -(mean_p * torch.log(mean_p.clamp_min(_EPS))).sum(-1)
        return consistency - self.entropy_weight * entropy.double()

    # -- fit -------------------------------------------------------------------
    def _fit(self, X: np.ndarray) -> None:
        n, k = X.shape[0], self.n_clusters_
        clock = _Clock()
        gen = seed_everything(self.random_state)
        n_heads = int(self.n_heads)
        net = self._build(n_heads)
        net.mean.copy_(torch.from_numpy(_column_mean(X)).to(self.device_))

        self._report("neighbors", 0, 1)
        Zn = self._space(X, net)
        Z = torch.from_numpy(Zn).to(self.device_)
        neighbors = self._neighbors(Zn)
        steps = int(self.smooth_steps)
        pre_epochs = self._auto_epochs(self.pretrain_epochs, PRETRAIN_SAMPLES, n)
        smoothed_input = None
        if self.init_space != "learned" or not pre_epochs:
            smoothed_input = smooth(Zn, neighbors.cpu().numpy(), steps)
        clock.lap("neighbors")
        self._report("neighbors", 1, 1)

        opt = self._optimizer(net)
        for epoch in range(1, pre_epochs + 1):
            loss = self._contrast_epoch(net, opt, Z, neighbors, gen)
            self._report("pretrain", epoch, pre_epochs, loss)
        if pre_epochs:
            # neighbours again, in the learned space (purer: docs/benchmarks/neighbors.md)
            feats = self._features(Z, net)
            neighbors = self._neighbors(feats)
        else:
            feats = Zn
        del Zn
        clock.lap("pretrain")

        if smoothed_input is None:
            smoothed = smooth(feats, neighbors.cpu().numpy(), steps)
        elif pre_epochs and self.init_space == "both":
            smoothed_learned = smooth(feats, neighbors.cpu().numpy(), steps)
            smoothed = np.concatenate([smoothed_input, smoothed_learned], axis=1) / np.sqrt(2.0)
            del smoothed_learned
        else:
            smoothed = smoothed_input
        del feats, smoothed_input
        reduced = principal_components(smoothed, int(self.proj_dim), power=float(self.whiten_power))
        init, em_moved = [], []
        for h in range(n_heads):
            _, labels, _ = run_kmeans(
                reduced,
                k,
                n_init=int(self.kmeans_n_init),
                random_state=self.random_state + h,
                callback=lambda *_: self._check_cancel(),
            )
            if self.init_em_steps:
                refined = refine_partition(
                    smoothed, labels, k, 1.0 / float(self.temperature), int(self.init_em_steps)
                )
                em_moved.append(float(np.mean(refined != labels)))
                labels = refined
            init.append(labels)
            self._report("kmeans_init", h + 1, n_heads)
        init_dims = (int(smoothed.shape[1]), int(reduced.shape[1]))
        del smoothed, reduced
        init_t = torch.from_numpy(np.stack(init, axis=1)).to(self.device_)  # (n, heads)
        clock.lap("kmeans_init")

        distill_epochs = self._auto_epochs(self.distill_epochs, DISTILL_SAMPLES, n)
        for epoch in range(1, distill_epochs + 1):
            net.train()
            total = 0.0
            batches = self._batches(n, gen)
            with step_threads(self.device_):
                for idx in batches:
                    idx = idx.to(self.device_)
                    logits = net(Z[idx])
                    loss = F.cross_entropy(logits.reshape(-1, k), init_t[idx].reshape(-1))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach())
            self._report("distill", epoch, distill_epochs, total / len(batches))
        clock.lap("distill")

        epochs = self._auto_epochs(self.epochs, TRAIN_SAMPLES, n)
        labels = self._probs(Z, net).argmax(-1)
        for epoch in range(1, epochs + 1):
            loss = self._scan_epoch(
                net,
                opt,
                Z,
                neighbors,
                gen,
                anchor_labels=init_t,
                anchor_weight=float(self.anchor_weight),
            )
            new = self._probs(Z, net).argmax(-1)
            change = float((new != labels).double().mean())
            labels = new
            self._report("scan", epoch, epochs, loss / n_heads, change)
        scan_moved = (labels != init_t).double().mean(0).tolist()
        head_loss = self._full_scan_loss(self._probs(Z, net), neighbors)
        best = int(head_loss.argmin())
        clock.lap("scan")

        # keep only the chosen head from here on
        kept = self._build(1)
        kept.load_state_dict({**net.state_dict(), "prototypes": net.prototypes[best : best + 1]})
        net = kept
        sl_epochs = self._auto_epochs(self.self_label_epochs, SELF_LABEL_SAMPLES, n)
        if sl_epochs:
            opt = self._optimizer(net)
        P = self._probs(Z, net, 0)
        labels = P.argmax(-1)
        for epoch in range(1, sl_epochs + 1):
            target = self_label_targets(P, float(self.confidence))
            loss = self._self_label_epoch(net, opt, Z, target, neighbors, gen)
            P = self._probs(Z, net, 0)
            new = P.argmax(-1)
            change = float((new != labels).double().mean())
            labels = new
            n_conf = int((target >= 0).sum())
            self._report("self_label", epoch, sl_epochs, loss, change, confident=n_conf / n)
        clock.lap("self_label")

        self.net_ = net
        self.labels_ = labels.cpu().numpy().astype(np.int64)
        self.cluster_centers_ = self._centers()
        sizes = np.bincount(self.labels_, minlength=k)
        self.fit_info_ = {
            "head_scan_loss": head_loss.tolist(),
            "kept_head": best,
            "init_em_moved": em_moved,
            "scan_moved": scan_moved,
            "init_dims": init_dims,
            "pretrain_epochs": pre_epochs,
            "scan_epochs": epochs,
            "self_label_epochs": sl_epochs,
            "n_neighbors": int(neighbors.shape[1]),
            "cluster_size_min": int(sizes.min()),
            "cluster_size_max": int(sizes.max()),
            "seconds": clock.laps,
        }

    def _neighbors(self, feats: np.ndarray) -> torch.Tensor:
        """(n, m) neighbours of the rows of ``feats`` on the device: ``n_neighbors``
        capped at half the average cluster size (:func:`~clustering_service.
        algorithms.knn.capped_neighbors`)."""
        found = capped_neighbors(feats, int(self.n_neighbors), self.n_clusters_, self.random_state)
        return torch.from_numpy(found).to(self.device_)

    @torch.no_grad()
    def _features(self, Z: torch.Tensor, net: _Net) -> np.ndarray:
        """Eval-mode unit projections of Z (rows already in the input space), float32."""
        was = net.training
        net.eval()
        try:
            out = [
                net.features(Z[s : s + INFERENCE_BATCH]).cpu().numpy()
                for s in range(0, Z.shape[0], INFERENCE_BATCH)
            ]
        finally:
            net.train(was)
        return np.concatenate(out)

    def _contrast_epoch(
        self,
        net: _Net,
        opt: torch.optim.Optimizer,
        Z: torch.Tensor,
        neighbors: torch.Tensor,
        gen: torch.Generator,
    ) -> float:
        """One epoch of InfoNCE on the projection: an item and a random neighbour are
        the positive pair, the other items of the batch the negatives."""
        net.train()
        total, count = 0.0, 0
        with step_threads(self.device_):
            for step, idx in enumerate(self._batches(Z.shape[0], gen)):
                idx = idx.to(self.device_)
                nb = self._neighbor_of(idx, neighbors, gen)
                f = net.features(torch.cat([Z[idx], Z[nb]]))
                fa, fb = f[: idx.numel()], f[idx.numel() :]
                sims = fa @ fb.T / self.contrast_temperature
                target = torch.arange(idx.numel(), device=sims.device)
                loss = 0.5 * (F.cross_entropy(sims, target) + F.cross_entropy(sims.T, target))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                count += 1
                if step % _CANCEL_EVERY == _CANCEL_EVERY - 1:
                    self._check_cancel()
        return total / max(count, 1)

    def _self_label_epoch(
        self,
        net: _Net,
        opt: torch.optim.Optimizer,
        Z: torch.Tensor,
        target: torch.Tensor,
        neighbors: torch.Tensor,
        gen: torch.Generator,
    ) -> float:
        """One epoch of cross-entropy toward ``target`` (n,) (the head's own confident
        predictions, -1 = not confident), classes weighted by 1 / count among the
        confident; returns the mean loss."""
        counts = torch.bincount(target[target >= 0], minlength=self.n_clusters_).float()
        weight = torch.where(counts > 0, 1.0 / counts.clamp_min(1.0), torch.zeros_like(counts))
        weight = weight / weight[counts > 0].mean()
        net.train()
        total, count = 0.0, 0
        with step_threads(self.device_):
            for step, idx in enumerate(self._batches(Z.shape[0], gen)):
                idx = idx.to(self.device_)
                idx = idx[target[idx] >= 0]
                if idx.numel() < 2:
                    continue
                src = idx
                if self.neighbor_prob > 0:
                    use = torch.rand(idx.numel(), generator=gen) < self.neighbor_prob
                    use = use.to(idx.device)
                    src = torch.where(use, self._neighbor_of(idx, neighbors, gen), idx)
                logits = net.logits(net.features(Z[src]), 0)
                loss = F.cross_entropy(logits, target[idx], weight=weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                count += 1
                if step % _CANCEL_EVERY == _CANCEL_EVERY - 1:
                    self._check_cancel()
        return total / max(count, 1)

    def _centers(self) -> np.ndarray:
        with torch.no_grad():
            return F.normalize(self.net_.prototypes[0], dim=-1).cpu().numpy().astype(np.float32)

    # -- predict ---------------------------------------------------------------
    @torch.no_grad()
    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        net = self.net_.eval()
        out = np.empty((X.shape[0], self.n_clusters_), dtype=np.float32)
        for start in range(0, X.shape[0], INFERENCE_BATCH):
            z = net.space(self._rows(X, slice(start, start + INFERENCE_BATCH)))
            out[start : start + z.shape[0]] = (
                torch.softmax(net.logits(net.features(z), 0), -1).cpu().numpy()
            )
        return out

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
            raise ClusteringInputError(
                f"unknown update parameter(s) {sorted(params)} for neighbors; "
                "valid: max_epochs, max_centroid_shift"
            )
        started = time.perf_counter()
        epochs = self.update_epochs if max_epochs is None else int(max_epochs)
        gen = seed_everything(self.random_state + 1)
        net = self.net_.to(self.device_)
        parents = F.normalize(net.prototypes[0].detach(), dim=-1).clone()
        Zn = self._space(X, net)
        Z = torch.from_numpy(Zn).to(self.device_)
        P = self._probs(Z, net, 0)
        conf, initial = P.max(-1)
        anchor = torch.where(conf >= self.confidence, initial, torch.full_like(initial, -1))
        labels = initial
        losses = []
        if epochs > 0:
            neighbors = self._neighbors(self._features(Z, net))
            opt = self._optimizer(net)
            for epoch in range(1, epochs + 1):
                loss = self._scan_epoch(
                    net,
                    opt,
                    Z,
                    neighbors,
                    gen,
                    anchor_labels=anchor,
                    heads=0,
                    parents=parents,
                    max_shift=max_centroid_shift,
                )
                new = self._probs(Z, net, 0).argmax(-1)
                change = float((new != labels).double().mean())
                labels = new
                losses.append(loss)
                self._report("update", epoch, epochs, loss, change)
        self.labels_ = labels.cpu().numpy().astype(np.int64)
        self.cluster_centers_ = self._centers()
        shift = np.linalg.norm(self.cluster_centers_ - parents.cpu().numpy(), axis=1)
        sizes = np.bincount(self.labels_, minlength=self.n_clusters_)
        self.update_info_ = {
            "epochs": epochs,
            "loss": losses,
            "centroid_shift_mean": float(shift.mean()),
            "centroid_shift_max": float(shift.max()),
            "centroid_shift": shift.tolist(),
            "label_change": float((labels != initial).double().mean()),
            "cluster_sizes": sizes.tolist(),
            "n_empty": int((sizes == 0).sum()),
            "seconds": time.perf_counter() - started,
        }

    # -- persistence -----------------------------------------------------------
    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return state_to_numpy(self.net_, "net."), {}

    def _set_state(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        net = _Net(
            self.n_features_in_,
            int(self.hidden_dim),
            int(self.proj_dim),
            self.n_clusters_,
            1,
            float(self.temperature),
        )
        # BaseClusterer.save turns BatchNorm's 0-d step counter into shape (1,)
        tensors = {
            k: np.reshape(v, ()) if k.endswith("num_batches_tracked") else v
            for k, v in tensors.items()
        }
        load_numpy_state(net, tensors, "net.")
        self.net_ = net.to(self.device_).eval()
        self.cluster_centers_ = self._centers()


class _Clock:
    """Seconds per stage: ``lap(name)`` records the time since the previous lap."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self._last
        self._last = now


def _column_mean(X: np.ndarray) -> np.ndarray:
    """Mean row of X (float64 accumulation, chunked), float32 (d,)."""
    total = np.zeros(X.shape[1])
    for start in range(0, X.shape[0], INFERENCE_BATCH):
        total += np.asarray(X[start : start + INFERENCE_BATCH], dtype=np.float64).sum(axis=0)
    return (total / X.shape[0]).astype(np.float32)
