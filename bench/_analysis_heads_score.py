"""Offline, from the fits stored by bench/_analysis_heads.py in /tmp/nbheads: each head's ACC
after SCAN and the label-free criteria (SCAN loss, inertia, agreement with the other
heads, chance-corrected agreement with the input / learned 10-NN graphs, silhouette),
the head each criterion picks, and two consensus partitions. Labels: scoring only.

    PYTHONPATH=. python bench/_analysis_heads_score.py searchsnippets_s0 searchsnippets_s1 ...
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score as ari
from sklearn.metrics import normalized_mutual_info_score as nmi

from clustering_service.algorithms.kmeans import run_kmeans
from clustering_service.algorithms.metrics import clustering_accuracy as acc


def agree(L, nb):
    """fraction of (i, neighbour) pairs in one cluster, and that minus chance."""
    same = (L[:, None] == L[nb]).mean()
    f = np.bincount(L) / len(L)
    return same, same - (f**2).sum()


def align(ref, L, k):
    t = np.zeros((k, k))
    np.add.at(t, (L, ref), 1)
    r, c = linear_sum_assignment(t, maximize=True)
    m = np.empty(k, dtype=int)
    m[r] = c
    return m[L]


def silhouette(F, L, rng, m=3000):
    idx = rng.choice(len(L), min(m, len(L)), replace=False)
    f, lab = F[idx], L[idx]
    S = f @ f.T
    D = 1 - S
    k = L.max() + 1
    out = []
    for i in range(len(idx)):
        means = np.array([D[i, lab == c].mean() if (lab == c).any() else np.inf for c in range(k)])
        a = means[lab[i]]
        means[lab[i]] = np.inf
        b = means.min()
        out.append((b - a) / max(a, b))
    return float(np.mean(out))


def main(names):
    for name in names:
        d = np.load(f"/tmp/nbheads/{name}.npz")
        y, P, init = d["y"], d["P"], d["init"]
        k = P.shape[2]
        H = P.shape[1]
        L = P.argmax(-1)  # (n, H)
        rng = np.random.default_rng(0)
        rows = []
        for h in range(H):
            others = [g for g in range(H) if g != h]
            r = {
                "acc_init": acc(y, init[:, h]),
                "acc": acc(y, L[:, h]),
                "nmi": nmi(y, L[:, h]),
                "loss": d["head_loss"][h],
                "inertia": d["inertia"][h],
                "agreeNMI": np.mean([nmi(L[:, h], L[:, g]) for g in others]),
                "agreeARI": np.mean([ari(L[:, h], L[:, g]) for g in others]),
                "nbIn": agree(L[:, h], d["nb_input"][:, :10])[1],
                "nbLe": agree(L[:, h], d["nb_learned"][:, :10])[1],
                "sil": silhouette(d["feats"], L[:, h], rng),
            }
            rows.append(r)
        keys = list(rows[0])
        print(f"== {name}")
        print(" ".join(f"{kk:>8}" for kk in keys))
        for r in rows:
            print(" ".join(f"{r[kk]:8.4f}" for kk in keys))
        # selections
        sel = {
            "loss(min)": np.argmin([r["loss"] for r in rows]),
            "inertia(min)": np.argmin([r["inertia"] for r in rows]),
            "agreeNMI": np.argmax([r["agreeNMI"] for r in rows]),
            "agreeARI": np.argmax([r["agreeARI"] for r in rows]),
            "nbIn": np.argmax([r["nbIn"] for r in rows]),
            "nbLe": np.argmax([r["nbLe"] for r in rows]),
            "sil": np.argmax([r["sil"] for r in rows]),
        }
        print(
            "  best head acc",
            max(r["acc"] for r in rows),
            "mean",
            np.mean([r["acc"] for r in rows]),
        )
        for s, h in sel.items():
            print(f"  {s:14s} head {h} acc {rows[h]['acc']:.4f} nmi {rows[h]['nmi']:.4f}")
        # consensus: majority vote after alignment to the most agreeing head
        ref = L[:, sel["agreeARI"]]
        A = np.stack([align(ref, L[:, h], k) for h in range(H)], 1)
        votes = np.zeros((len(y), k))
        for h in range(H):
            votes[np.arange(len(y)), A[:, h]] += 1
        mv = votes.argmax(1)
        print(
            f"  vote(align)    acc {acc(y, mv):.4f} nmi {nmi(y, mv):.4f} "
            f"unanimity {(votes.max(1) == H).mean():.3f}"
        )
        # consensus: k-means on concatenated one-hot of all heads
        onehot = np.zeros((len(y), H * k), dtype=np.float32)
        for h in range(H):
            onehot[np.arange(len(y)), h * k + L[:, h]] = 1
        _, kl, _ = run_kmeans(onehot, k, n_init=10, random_state=0)
        print(f"  km(onehot)     acc {acc(y, kl):.4f} nmi {nmi(y, kl):.4f}")
        Pc = P.reshape(len(y), -1).astype(np.float32)
        _, kl2, _ = run_kmeans(Pc, k, n_init=10, random_state=0)
        print(f"  km(probs)      acc {acc(y, kl2):.4f} nmi {nmi(y, kl2):.4f}")
        # k-means with more restarts on the smoothed space (idea 3)
        _, kl3, in3 = run_kmeans(d["smoothed"], k, n_init=30, random_state=0)
        print(f"  km(smooth,30)  acc {acc(y, kl3):.4f} nmi {nmi(y, kl3):.4f} inertia {in3:.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
