"""Offline: EM for a mixture of unit directions with free mixing weights from a k-means
partition (the prototype of neighbors.refine_partition), kappa 10 / 20 / 50. Labels:
scoring only.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from sklearn.metrics import normalized_mutual_info_score as nmi

from clustering_service.algorithms.kmeans import run_kmeans
from clustering_service.algorithms.metrics import clustering_accuracy as acc


def vmf(S, L, k, kappa, iters=50):
    R = np.eye(k)[L]
    for _ in range(iters):
        mu = R.T @ S
        mu /= np.linalg.norm(mu, axis=1, keepdims=True)
        pi = R.mean(0) + 1e-9
        logit = kappa * S @ mu.T + np.log(pi)
        logit -= logit.max(1, keepdims=True)
        R = np.exp(logit)
        R /= R.sum(1, keepdims=True)
    return R.argmax(1)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        d = np.load(f"/tmp/nbheads/{name}.npz")
        y = d["y"]
        k = int(y.max() + 1)
        y_ = y
        out = [f"{name:18s}"]
        for space in ("smoothed", "feats"):
            S = d[space].astype(np.float64)
            for h in range(3):
                L = d["init"][:, h]
                if space == "feats":
                    _, L, _ = run_kmeans(d["feats"], k, n_init=3, random_state=h)
                row = [f"{space[:2]}h{h} km {acc(y, L):.3f}"]
                for kappa in (10, 20, 50):
                    V = vmf(S, L, k, kappa)
                    row.append(f"k{kappa} {acc(y, V):.3f}/{nmi(y, V):.3f}")
                out.append(" ".join(row))
        print(" | ".join(out), flush=True)
