"""Offline: more neighbour-averaging rounds, and over-clustering (2k-4k) merged along
learned-kNN edges, on the stored fits. Labels: scoring only.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from sklearn.metrics import normalized_mutual_info_score as nmi

from clustering_service.algorithms.kmeans import run_kmeans
from clustering_service.algorithms.knn import smooth
from clustering_service.algorithms.metrics import clustering_accuracy as acc


def merge(L, nb, k, mode):
    kk = L.max() + 1
    sizes = np.bincount(L, minlength=kk).astype(float)
    E = np.zeros((kk, kk))
    np.add.at(E, (np.repeat(L, nb.shape[1]), L[nb].ravel()), 1)
    E = E + E.T
    groups = [[c] for c in range(kk)]
    lab = np.arange(kk)
    while len(groups) > k:
        g = len(groups)
        best, pair = -1, None
        for a in range(g):
            for b in range(a + 1, g):
                e = E[np.ix_(groups[a], groups[b])].sum()
                na, nb_ = sizes[groups[a]].sum(), sizes[groups[b]].sum()
                if mode == "avg":
                    s = e / (na * nb_)
                elif mode == "min":
                    s = e / min(na, nb_)
                else:
                    s = e / (na + nb_)
                if s > best:
                    best, pair = s, (a, b)
        a, b = pair
        groups[a] = groups[a] + groups[b]
        groups.pop(b)
    for gi, g in enumerate(groups):
        lab[g] = gi
    return lab[L]


for name in sys.argv[1:]:
    d = np.load(f"/tmp/nbheads/{name}.npz")
    y = d["y"]
    k = int(y.max() + 1)
    feats, nbl = d["feats"], d["nb_learned"]
    out = [name]
    for steps in (2, 4, 8):
        S = smooth(feats, nbl, steps) if steps != 2 else d["smoothed"]
        _, L, _ = run_kmeans(S, k, n_init=10, random_state=0)
        out.append(f"sm{steps}:{acc(y, L):.3f}/{nmi(y, L):.3f}")
    S = d["smoothed"]
    for f in (2, 3, 4):
        _, L, _ = run_kmeans(S, f * k, n_init=3, random_state=0)
        for mode in ("avg", "min", "sum"):
            M = merge(L, nbl[:, :10], k, mode)
            out.append(f"x{f}{mode}:{acc(y, M):.3f}/{nmi(y, M):.3f}")
    print(" ".join(out), flush=True)
