"""Offline: within-fit Spearman correlation of each label-free criterion with head ACC,
and the ACC of the head it picks (fits from bench/_analysis_heads.py). Labels: scoring only.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import adjusted_rand_score as ari
from sklearn.metrics import normalized_mutual_info_score as nmi

from clustering_service.algorithms.metrics import clustering_accuracy as acc


def agree(L, nb):
    same = (L[:, None] == L[nb]).mean()
    f = np.bincount(L) / len(L)
    return same - (f**2).sum(), same


for name in sys.argv[1:]:
    d = np.load(f"/tmp/nbheads/{name}.npz")
    y, P = d["y"], d["P"]
    L = P.argmax(-1)
    H = L.shape[1]
    a = np.array([acc(y, L[:, h]) for h in range(H)])
    nm = np.array([nmi(y, L[:, h]) for h in range(H)])
    crit = {
        "-loss": -d["head_loss"],
        "-inertia": -d["inertia"],
        "agreeARI": [
            np.mean([ari(L[:, h], L[:, g]) for g in range(H) if g != h]) for h in range(H)
        ],
        "nbIn10": [agree(L[:, h], d["nb_input"][:, :10])[0] for h in range(H)],
        "nbIn20": [agree(L[:, h], d["nb_input"])[0] for h in range(H)],
        "nbIn20raw": [agree(L[:, h], d["nb_input"])[1] for h in range(H)],
        "nbIn5": [agree(L[:, h], d["nb_input"][:, :5])[0] for h in range(H)],
        "nbLe20": [agree(L[:, h], d["nb_learned"])[0] for h in range(H)],
        "conf": [P[:, h].max(-1).mean() for h in range(H)],
    }
    out = [f"{name:18s}"]
    for c, v in crit.items():
        r = spearmanr(v, a).correlation
        out.append(f"{c}:{r:+.2f}/{a[int(np.argmax(v))]:.3f}")
    print(" ".join(out), f"best {a.max():.3f} mean {a.mean():.3f}")
