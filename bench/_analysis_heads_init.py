"""Offline: ACC of the initial partition (k-means with 3 / 10 / 30 restarts on the stored
neighbour-averaged learned vectors, then the EM of _analysis_heads_vmf), mean over 4
random states per stored fit. Labels: scoring only.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench._analysis_heads_vmf import vmf
from clustering_service.algorithms.kmeans import run_kmeans
from clustering_service.algorithms.metrics import clustering_accuracy as acc

res = {}
for name in sys.argv[1:]:
    d = np.load(f"/tmp/nbheads/{name}.npz")
    y = d["y"]
    k = int(y.max() + 1)
    S = d["smoothed"]
    for ni in (3, 10, 30):
        a, av = [], []
        for r in range(4):
            _, L, _ = run_kmeans(S, k, n_init=ni, random_state=100 + r)
            a.append(acc(y, L))
            av.append(acc(y, vmf(S.astype(np.float64), L, k, 10, 30)))
        ds = name.split("_")[0]
        res.setdefault((ds, ni), []).append((np.mean(a), np.mean(av)))
        print(
            f"{name:18s} n_init {ni:2d}: km {np.mean(a):.3f} (min {min(a):.3f} "
            f"max {max(a):.3f})  +vmf {np.mean(av):.3f} (min {min(av):.3f} max {max(av):.3f})",
            flush=True,
        )
for key, v in res.items():
    v = np.array(v)
    print(key, "km mean", v[:, 0].mean().round(3), "vmf mean", v[:, 1].mean().round(3))
