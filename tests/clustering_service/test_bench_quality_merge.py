"""``bench/clustering_quality.py --merge``: seeds run in separate processes pool
into one summary per (dataset, algorithm); data sets run apart sit side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.clustering_quality import merge


def _result(path: Path, ds: str, algo: str, seeds_acc: dict[int, float]) -> Path:
    runs = [
        {"seed": seed, "acc": acc, "nmi": acc / 2, "ari": acc / 3, "fit_s": 1.0}
        for seed, acc in seeds_acc.items()
    ]
    path.write_text(
        json.dumps(
            {
                "command": f"clustering_quality.py --datasets {ds}",
                "machine": {},
                "datasets": {ds: {"n": 10, "d": 2, "k": 2}},
                "fit": {ds: {algo: {"runs": runs, "summary": {}}}},
                "online": {},
            }
        )
    )
    return path


def test_merge_pools_seeds_and_keeps_data_sets(tmp_path: Path) -> None:
    files = [
        _result(tmp_path / "a.json", "mnist", "dec", {0: 0.6}),
        _result(tmp_path / "b.json", "mnist", "dec", {1: 0.7, 2: 0.9}),
        _result(tmp_path / "c.json", "mnist", "dec", {2: 0.8}),  # a rerun of seed 2 wins
        _result(tmp_path / "d.json", "digits", "dec", {0: 0.5}),
    ]
    out = tmp_path / "merged.json"
    merged = merge(files, out)
    dec = merged["fit"]["mnist"]["dec"]
    assert [run["seed"] for run in dec["runs"]] == [0, 1, 2]
    assert dec["summary"]["n_runs"] == 3
    assert dec["summary"]["acc_mean"] == pytest.approx(0.7)
    assert merged["fit"]["digits"]["dec"]["summary"]["acc_mean"] == pytest.approx(0.5)
    assert json.loads(out.read_text())["fit"]["mnist"]["dec"]["summary"]["n_runs"] == 3
