"""Every algorithm, default parameters, on data shaped unlike the benchmark sets.

Usage (from the repository root)::

    python bench/edge_cases.py                                # every algorithm, every case
    python bench/edge_cases.py --algorithms neighbors --cases imbalanced duplicates
    python bench/edge_cases.py --json out.json

Each case is a set of well-separated groups of unit vectors (one random direction
per group, Gaussian noise 0.3 / sqrt(d)), on which k-means recovers the groups
exactly (at k = 100 its restarts can end one merge-and-split short); k is the
number of groups. A method that does worse here fails on
structure, not on hard data. The cases are the shapes real collections take that
the real-embedding benchmarks do not have: very few rows, clusters smaller than
the neighbour count, one cluster of 5 %, exact copies of rows (the same image
uploaded many times), a wide input, many clusters.

Reported per case and algorithm: ACC (Hungarian), clusters used out of k,
whether ``predict`` reproduces ``labels_``, whether ``predict_proba`` rows are
finite and sum to 1, fit seconds. Expected: ACC 1.000 and every cluster used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clustering_service.algorithms import ALGORITHMS, create
from clustering_service.algorithms.metrics import clustering_accuracy


def blobs(sizes: list[int], d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Groups of ``sizes`` unit vectors in ``d`` dimensions: float32 (n, d), labels (n,)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.repeat(np.arange(len(sizes)), sizes)
    X = centres[y] + 0.3 / np.sqrt(d) * rng.normal(size=(len(y), d))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32), y


def copies(n_groups: int, per_group: int, repeats: int, d: int, seed: int):
    """``n_groups`` groups of ``per_group`` distinct vectors, each row ``repeats`` times."""
    X, y = blobs([per_group] * n_groups, d, seed)
    return np.repeat(X, repeats, axis=0), np.repeat(y, repeats)


#: name -> (description, data factory)
CASES: dict[str, tuple[str, Callable[[int], tuple[np.ndarray, np.ndarray]]]] = {
    "tiny": ("3 groups of 4 rows, d=16", lambda s: blobs([4] * 3, 16, s)),
    "small": ("4 groups of 10 rows, d=384", lambda s: blobs([10] * 4, 384, s)),
    "small_clusters": ("40 groups of 5 rows, d=64", lambda s: blobs([5] * 40, 64, s)),
    "imbalanced": ("950 + 50 rows, d=384", lambda s: blobs([950, 50], 384, s)),
    "duplicates": (
        "5 groups of 10 vectors, each 20 times, d=32",
        lambda s: copies(5, 10, 20, 32, s),
    ),
    "wide": ("2 groups of 300 rows, d=768", lambda s: blobs([300] * 2, 768, s)),
    "many_clusters": ("100 groups of 30 rows, d=128", lambda s: blobs([30] * 100, 128, s)),
}


def run_case(algo: str, X: np.ndarray, y: np.ndarray, seed: int) -> dict:
    k = len(np.unique(y))
    start = time.perf_counter()
    est = create(algo, n_clusters=k, random_state=seed, device="cpu").fit(X)
    fit_s = time.perf_counter() - start
    proba = est.predict_proba(X)
    return {
        "acc": clustering_accuracy(y, est.labels_),
        "used": int((np.bincount(est.labels_, minlength=k) > 0).sum()),
        "k": k,
        "predict_matches": float(np.mean(est.predict(X) == est.labels_)),
        "proba_ok": bool(np.isfinite(proba).all() and np.allclose(proba.sum(1), 1, atol=1e-3)),
        "fit_s": fit_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algorithms", nargs="+", default=sorted(ALGORITHMS))
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    results, failures = [], 0
    for case in args.cases:
        description, make = CASES[case]
        for seed in args.seeds:
            X, y = make(seed)
            for algo in args.algorithms:
                row = {"case": case, "seed": seed, "algorithm": algo, **run_case(algo, X, y, seed)}
                results.append(row)
                ok = row["acc"] == 1.0 and row["used"] == row["k"] and row["proba_ok"]
                failures += not ok
                print(
                    f"{case:15s} {algo:12s} seed {seed}  ACC {row['acc']:.3f}  "
                    f"used {row['used']}/{row['k']}  predict=labels {row['predict_matches']:.3f}  "
                    f"proba ok {row['proba_ok']}  {row['fit_s']:.1f} s  "
                    f"{'PASS' if ok else 'FAIL'}  ({description})",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"{failures} of {len(results)} runs missed ACC 1.000 with every cluster used")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
