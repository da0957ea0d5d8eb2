"""Diagnostic (not part of the package): one default ``neighbors`` fit per seed with
``n_heads=8`` that stops after the SCAN stage and stores everything needed to score
head-selection criteria offline: each head's initial k-means labels, each head's
probabilities after SCAN, the SCAN loss per head, the learned features and
neighbours, the input-space neighbours, and the network's state (to run
self-labelling from any head afterwards). Labels are NOT given to the fit; they
are only stored next to the outputs for scoring.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/_analysis_heads.py searchsnippets 0 1 2
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.clustering_quality import load_dataset
from clustering_service.algorithms.kmeans import run_kmeans
from clustering_service.algorithms.knn import smooth
from clustering_service.algorithms.neighbors import (
    DISTILL_SAMPLES,
    PRETRAIN_SAMPLES,
    TRAIN_SAMPLES,
    NeighborClusterer,
    _column_mean,
)
from clustering_service.algorithms.nn import seed_everything, step_threads

OUT = Path("/tmp/nbheads")


class Probe(NeighborClusterer):
    """The default fit up to the choice of head, with everything stored."""

    def _fit(self, X: np.ndarray) -> None:
        n, k = X.shape[0], self.n_clusters_
        gen = seed_everything(self.random_state)
        n_heads = int(self.n_heads)
        net = self._build(n_heads)
        net.mean.copy_(torch.from_numpy(_column_mean(X)).to(self.device_))
        Zn = self._space(X, net)
        Z = torch.from_numpy(Zn).to(self.device_)
        neighbors = self._neighbors(Zn)
        self.nb_input_ = neighbors.cpu().numpy()
        opt = self._optimizer(net)
        pre_epochs = self._auto_epochs(self.pretrain_epochs, PRETRAIN_SAMPLES, n)
        for _ in range(pre_epochs):
            self._contrast_epoch(net, opt, Z, neighbors, gen)
        feats = self._features(Z, net)
        neighbors = self._neighbors(feats)
        self.nb_learned_ = neighbors.cpu().numpy()
        self.feats_ = feats
        smoothed = smooth(feats, neighbors.cpu().numpy(), int(self.smooth_steps))
        init, inertia = [], []
        for h in range(n_heads):
            _, labels, iner = run_kmeans(
                smoothed, k, n_init=int(self.kmeans_n_init), random_state=self.random_state + h
            )
            init.append(labels)
            inertia.append(iner)
        self.smoothed_ = smoothed
        self.init_ = np.stack(init, axis=1)
        self.inertia_ = np.array(inertia)
        init_t = torch.from_numpy(self.init_).to(self.device_)
        distill_epochs = self._auto_epochs(self.distill_epochs, DISTILL_SAMPLES, n)
        for _ in range(distill_epochs):
            net.train()
            with step_threads(self.device_):
                for idx in self._batches(n, gen):
                    logits = net(Z[idx])
                    loss = torch.nn.functional.cross_entropy(
                        logits.reshape(-1, k), init_t[idx].reshape(-1)
                    )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        self.P_distill_ = self._probs(Z, net).cpu().numpy().astype(np.float16)
        epochs = self._auto_epochs(self.epochs, TRAIN_SAMPLES, n)
        for _ in range(epochs):
            self._scan_epoch(net, opt, Z, neighbors, gen)
        P = self._probs(Z, net)
        self.head_loss_ = self._full_scan_loss(P, neighbors).cpu().numpy()
        self.P_ = P.cpu().numpy()
        self.state_ = {key: v.detach().cpu().clone() for key, v in net.state_dict().items()}
        self.net_ = net
        self.labels_ = P[:, int(self.head_loss_.argmin())].argmax(-1).cpu().numpy()
        self.cluster_centers_ = np.zeros((k, int(self.proj_dim)), dtype=np.float32)
        self.fit_info_ = {}


def main() -> None:
    name, seeds = sys.argv[1], [int(s) for s in sys.argv[2:]]
    X, y, _ = load_dataset(name, quick=False)
    k = int(np.unique(y).size)
    OUT.mkdir(exist_ok=True)
    for seed in seeds:
        start = time.perf_counter()
        # kmeans_n_init=3: the default when this analysis was made (third round)
        est = Probe(n_clusters=k, random_state=seed, n_heads=8, kmeans_n_init=3, device="cpu")
        est.fit(X)
        elapsed = time.perf_counter() - start
        np.savez(
            OUT / f"{name}_s{seed}.npz",
            y=y,
            init=est.init_,
            inertia=est.inertia_,
            P=est.P_.astype(np.float32),
            P_distill=est.P_distill_,
            head_loss=est.head_loss_,
            feats=est.feats_,
            smoothed=est.smoothed_,
            nb_input=est.nb_input_,
            nb_learned=est.nb_learned_,
        )
        torch.save(est.state_, OUT / f"{name}_s{seed}.pt")
        with open("/proc/loadavg") as fh:
            load = fh.read().split()[:3]
        print(f"{name} seed {seed}: {elapsed:.1f} s, load {' '.join(load)}", flush=True)


if __name__ == "__main__":
    main()
