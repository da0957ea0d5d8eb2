"""Training and prediction speed, and peak memory, of every algorithm vs k-means.

Usage (from the repository root)::

    python bench/clustering_speed.py                 # N = 10k, 100k, 1M at d = 384
    python bench/clustering_speed.py --quick         # skips 1M
    python bench/clustering_speed.py --algorithms kmeans odc --sizes 10000 100000 --json out.json
    python bench/clustering_speed.py --default-fit 100000 --algorithms kmeans neighbors

Data: a Gaussian mixture of ``k`` components on the unit sphere (like
L2-normalised embeddings), d = 384, written in chunks to a float32 ``.npy``
memmap in a temporary directory, so generating 1M x 384 (1.5 GB) takes one
chunk of memory. Every run is a fresh subprocess (``--worker``) that maps the
file and fits one algorithm, so its peak RSS (``ru_maxrss``) is that run's
alone. Note that pages of the memmap the run reads count in its RSS (up to
1x the data size).

Measured per (algorithm, N):

* ``fit_s``: wall time of ``fit`` with a short schedule (``EPOCHS[N]``
  epochs, 3 up to 100k and 2 at 1M; k-means: one restart of at most 20
  iterations);
* ``epoch_s``: time per epoch. Deep methods: the mean interval between
  consecutive progress events with ``epoch >= 1`` of the same stage (one
  event per epoch by contract), over the stages planned with more than one
  epoch, i.e. the marginal cost of an epoch without one-off set-up (such as
  DEC's k-means initialisation, reported under ``stages``). k-means: one
  full Lloyd pass over all N rows (``update(X, max_epochs=1)``: assignment,
  mean update, re-assignment);
* ``ratio_vs_kmeans``: ``epoch_s`` / k-means' ``epoch_s`` at the same N;
* ``peak_rss_mb`` and ``rss_over_data`` (peak RSS / data size; target < 3 at 1M);
* ``epoch_s_per_million``: ``epoch_s`` per 1M rows, which is constant when the
  cost per epoch is linear in N;
* ``predict_rows_per_s``: ``predict`` over the N rows (target >= 200k/s at
  d = 384, k = 100).

``--default-fit N`` instead fits every algorithm once with its DEFAULT
parameters (k-means: 10 restarts of up to 300 iterations) at N rows and checks
the frozen-embedding issue's target: ``neighbors`` fit time <= 10x k-means'.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.datasets import sphere_mixture_memmap
from clustering_service.algorithms import ALGORITHMS, create, get_class

D = 384
K = 100
TARGET_RSS_RATIO = 3.0
TARGET_PREDICT = 200_000
TARGET_GROWTH = 1.5
#: neighbors' default fit may take this many times k-means' default fit
TARGET_FIT_RATIO = 10.0
#: epochs per fit: fewer at 1M, but at least 2, so every training stage has an
#: interval between two epochs to time (a stage planned as 1 step is set-up)
EPOCHS = {10_000: 3, 100_000: 3, 1_000_000: 2}
#: how each algorithm's schedule is set to ``e`` epochs (keys it lacks are dropped)
SCHEDULE = {
    "kmeans": lambda e: {"n_init": 1, "max_iter": 20},
    "dec": lambda e: {"pretrain_epochs": e, "cluster_epochs": e},
    "deepcluster": lambda e: {"epochs": e},
    "odc": lambda e: {"n_epochs": e},
    "neighbors": lambda e: {
        "pretrain_epochs": e,
        "distill_epochs": e,
        "epochs": e,
        "self_label_epochs": e,
    },
}


def _epochs_for(n: int) -> int:
    return EPOCHS.get(n, 2 if n >= 1_000_000 else 3)


def worker(algo: str, data: str, epochs: int, device: str) -> dict[str, Any]:
    """Fit one algorithm on the memmap at ``data``; runs in its own process."""
    X = np.load(data, mmap_mode="r")
    valid = set(get_class(algo)._param_names())
    # epochs < 0: the algorithm's default parameters (--default-fit)
    schedule = SCHEDULE[algo](epochs) if epochs >= 0 else {}
    params = {k: v for k, v in schedule.items() if k in valid}
    if algo != "kmeans":
        params["device"] = device
    events: list[tuple[float, str, int, int | None]] = []

    def on_progress(p: Any) -> None:
        events.append((time.perf_counter(), p.stage, p.epoch, p.epochs))

    est = create(algo, n_clusters=K, random_state=0, progress_callback=on_progress, **params)
    start = time.perf_counter()
    est.fit(X)
    fit_s = time.perf_counter() - start
    out: dict[str, Any] = {"fit_s": fit_s, "params": params, "stages": _stage_times(events)}
    if algo == "kmeans":
        start = time.perf_counter()
        est.update(X, max_epochs=1)
        out["epoch_s"] = time.perf_counter() - start
    else:
        # a stage planned as a single step (e.g. DEC's k-means initialisation) is
        # one-off set-up, not an epoch
        timed = [s for s in out["stages"].values() if s["epochs_timed"] and (s["planned"] or 0) > 1]
        total = sum(s["epoch_s"] * s["epochs_timed"] for s in timed)
        count = sum(s["epochs_timed"] for s in timed)
        out["epoch_s"] = total / count if count else None
    est.predict(X[:1000])  # warm-up
    start = time.perf_counter()
    est.predict(X)
    out["predict_s"] = time.perf_counter() - start
    out["predict_rows_per_s"] = X.shape[0] / out["predict_s"]
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _stage_times(events: list[tuple[float, str, int, int | None]]) -> dict[str, dict[str, Any]]:
    """Per stage: mean interval between consecutive same-stage events with
    epoch >= 1, how many intervals, and the planned number of epochs."""
    gaps: dict[str, list[float]] = {}
    planned: dict[str, int | None] = {}
    last: dict[str, float] = {}
    for t, stage, epoch, epochs in events:
        if epoch >= 1 and stage in last:
            gaps.setdefault(stage, []).append(t - last[stage])
        last[stage] = t
        gaps.setdefault(stage, [])
        planned[stage] = epochs
    return {
        stage: {
            "epochs_timed": len(g),
            "epoch_s": float(np.mean(g)) if g else None,
            "planned": planned[stage],
        }
        for stage, g in gaps.items()
    }


def run_one(algo: str, data: Path, epochs: int, device: str, timeout: float) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        algo,
        "--data",
        str(data),
        "--epochs",
        str(epochs),
        "--device",
        device,
    ]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS))
    parser.add_argument("--sizes", nargs="+", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="skip N = 1M")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--tmpdir", default=None, help="where the memmap files go")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--default-fit",
        type=int,
        default=None,
        metavar="N",
        help="fit each algorithm once with default parameters at N rows; fit-time target",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.epochs, args.device)))
        return {}
    if args.default_fit:
        sizes = [args.default_fit]
    else:
        sizes = args.sizes or ([10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000])
    algos = ["kmeans", *[a for a in args.algorithms if a != "kmeans"]]  # the reference first
    results: dict[str, Any] = {
        "command": " ".join(["bench/clustering_speed.py", *(argv or sys.argv[1:])]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            # other work on the machine slows every timing: record how busy it was
            "load_avg_start": os.getloadavg(),
        },
        "d": D,
        "k": K,
        "runs": {},
    }

    def save() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2))

    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        for n in sizes:
            path = Path(tmp) / f"sphere_{n}.npy"
            start = time.perf_counter()
            sphere_mixture_memmap(path, n, D, K, random_state=0)
            print(f"[data] N={n} generated in {time.perf_counter() - start:.1f} s", flush=True)
            data_mb = n * D * 4 / 2**20
            for algo in algos:
                epochs = -1 if args.default_fit else _epochs_for(n)
                r = run_one(algo, path, epochs, args.device, args.timeout)
                r["n"], r["data_mb"] = n, data_mb
                if "error" not in r:
                    r["rss_over_data"] = r["peak_rss_mb"] / data_mb
                    if r.get("epoch_s"):
                        r["epoch_s_per_million"] = r["epoch_s"] * 1e6 / n
                    base = results["runs"].get("kmeans", {}).get(str(n), {})
                    if base.get("epoch_s") and r.get("epoch_s"):
                        r["ratio_vs_kmeans"] = r["epoch_s"] / base["epoch_s"]
                results["runs"].setdefault(algo, {})[str(n)] = r
                print(f"[{algo} N={n}] {json.dumps(r)}", flush=True)
                save()
            path.unlink()
    results["machine"]["load_avg_end"] = os.getloadavg()
    if args.default_fit:
        results["targets"] = check_fit_ratio(results, args.default_fit)
    else:
        results["targets"] = check_targets(results, sizes)
    save()
    print_table(results, sizes)
    print("\n== targets")
    for line in results["targets"]:
        print(line)
    return results


def check_fit_ratio(results: dict[str, Any], n: int) -> list[str]:
    """Default-parameter fit time of each algorithm over k-means' at N = n."""
    base = results["runs"].get("kmeans", {}).get(str(n), {}).get("fit_s")
    lines = []
    for algo, by_n in results["runs"].items():
        r = by_n.get(str(n), {})
        if algo == "kmeans" or base is None or "fit_s" not in r:
            continue
        ratio = r["fit_s"] / base
        r["fit_ratio_vs_kmeans"] = ratio
        if algo == "neighbors":
            ok = ratio <= TARGET_FIT_RATIO
            lines.append(
                f"{'PASS' if ok else 'FAIL'} neighbors default fit at N={n}: {r['fit_s']:.1f} s "
                f"= {ratio:.1f}x k-means' {base:.1f} s (<= {TARGET_FIT_RATIO:.0f}x)"
            )
        else:
            lines.append(f"INFO {algo} default fit at N={n}: {ratio:.1f}x k-means")
    return lines


def check_targets(results: dict[str, Any], sizes: list[int]) -> list[str]:
    lines = []
    big = max(sizes)
    for algo, by_n in results["runs"].items():
        r = by_n.get(str(big), {})
        if "rss_over_data" in r and big >= 1_000_000:
            ok = r["rss_over_data"] < TARGET_RSS_RATIO
            lines.append(
                f"{'PASS' if ok else 'FAIL'} {algo} peak RSS at N={big}: "
                f"{r['rss_over_data']:.2f}x data < {TARGET_RSS_RATIO}x"
            )
        preds = [
            by_n[str(n)] for n in sizes if n >= 100_000 and "error" not in by_n.get(str(n), {})
        ]
        if preds:
            rate = max(p["predict_rows_per_s"] for p in preds)
            ok = rate >= TARGET_PREDICT
            lines.append(
                f"{'PASS' if ok else 'FAIL'} {algo} predict {rate:,.0f} rows/s "
                f">= {TARGET_PREDICT:,}"
            )
        # linear cost: from one N to the next (10x) the epoch time may grow up to
        # TARGET_GROWTH x the growth of N; less (fixed per-epoch overhead at small N)
        # is fine, more means worse than linear
        timed = [n for n in sizes if by_n.get(str(n), {}).get("epoch_s")]
        growth = [
            (by_n[str(b)]["epoch_s"] / by_n[str(a)]["epoch_s"]) / (b / a)
            for a, b in itertools.pairwise(timed)
        ]
        if growth:
            ok = max(growth) <= TARGET_GROWTH
            lines.append(
                f"{'PASS' if ok else 'FAIL'} {algo} epoch cost linear in N: epoch time grows "
                + ", ".join(f"{g:.2f}" for g in growth)
                + f" x as fast as N between consecutive sizes (<= {TARGET_GROWTH})"
            )
        for n in sizes:
            r = by_n.get(str(n), {})
            if "error" in r:
                lines.append(f"FAIL {algo} N={n}: {r['error']}")
    return lines


def print_table(results: dict[str, Any], sizes: list[int]) -> None:
    print(
        f"\n{'algorithm':<12} {'N':>9} {'fit s':>9} {'epoch s':>9} {'vs km':>7} "
        f"{'s/ep/1M':>9} {'RSS MB':>8} {'RSS/data':>9} {'predict/s':>11}"
    )
    for algo, by_n in results["runs"].items():
        for n in sizes:
            r = by_n.get(str(n))
            if r is None:
                continue
            if "error" in r:
                print(f"{algo:<12} {n:>9} {r['error']}")
                continue

            def f(key: str, fmt: str, r: dict[str, Any] = r) -> str:
                v = r.get(key)
                return "-" if v is None else format(v, fmt)

            print(
                f"{algo:<12} {n:>9} {f('fit_s', '.1f'):>9} {f('epoch_s', '.3f'):>9} "
                f"{f('ratio_vs_kmeans', '.1f'):>7} {f('epoch_s_per_million', '.2f'):>9} "
                f"{f('peak_rss_mb', '.0f'):>8} {f('rss_over_data', '.2f'):>9} "
                f"{f('predict_rows_per_s', ',.0f'):>11}"
            )


if __name__ == "__main__":
    main()
