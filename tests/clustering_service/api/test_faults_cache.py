"""Corrupted local caches under a running service: the vector snapshot a job
reads and the files of a model version. Each is checked against its checksum
before use, found bad, deleted and rebuilt from the database (the system of
record): the results are the same as with a sound cache, and no request fails.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.clustering import Clustering, vector_items


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _corrupt_entry(entry: Path, how: str) -> list[str]:
    """Damage every data file of a cache entry: ``flip`` a byte (bit rot),
    ``truncate`` to half (a torn write), ``delete`` (lost); returns the names."""
    names = sorted(p.name for p in entry.iterdir() if p.name != "checksums.json")
    for name in names:
        path = entry / name
        if how == "flip":
            _flip_last_byte(path)
        elif how == "truncate":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:
            path.unlink()
    return names


def _assignments(service: Clustering, model: str, version: int) -> dict[str, int]:
    r = service.client.get(f"/v1/models/{model}/versions/{version}/assignments?limit=10000")
    assert r.status_code == 200, r.text
    return {row["item_id"]: row["cluster"] for row in r.json()["items"]}


def _wait_for(pattern: str, root: Path, timeout: float = 30) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p.parent for p in root.glob(pattern)]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no cache entry {pattern} under {root}")


@pytest.mark.slow
def test_corrupted_caches_are_rebuilt_from_the_database(
    clustering_factory: Any, digits_vectors: tuple[np.ndarray, np.ndarray]
) -> None:
    # one loaded model at a time: loading another evicts it, so its next use reads files
    service = clustering_factory(env={"CLUSTERING_MODEL_CACHE_SIZE": "1"}).start().wait_ready()
    cache = service.data_dir / "cache"
    X, y = digits_vectors
    dataset = service.dataset()
    service.add(dataset, vector_items(X, "d", y))
    params = {"hidden_dims": [32, 32], "latent_dim": 5, "pretrain_epochs": 5, "cluster_epochs": 2}

    # the vector snapshot: written by the first job, damaged, the second job rebuilds it
    first = service.wait_job(service.train(dataset, "dec", "a", n_clusters=5, params=params)["id"])
    assert first["state"] == "succeeded", first
    snapshot = _wait_for("datasets/*/*/checksums.json", cache)
    damaged = _corrupt_entry(snapshot, "truncate")
    assert {"X.npy", "ids.json"} <= set(damaged)
    second = service.wait_job(service.train(dataset, "dec", "a", n_clusters=5, params=params)["id"])
    assert second["state"] == "succeeded", second
    expected = _assignments(service, "a", 1)
    assert _assignments(service, "a", 2) == expected  # same seed, same data: same model
    assert len(expected) == 300

    # the files of versions a/1 and a/2: cached by the calls above, damaged, fetched again
    probe = {"embeddings": X[:20].tolist()}
    before = {
        v: service.client.post(f"/v1/models/a/predict?version={v}", json=probe).json()
        for v in (1, 2)
    }
    one, two = sorted((cache / "versions").iterdir(), key=lambda p: p.stat().st_mtime)
    _corrupt_entry(one, "delete")  # version 1's: evicted from memory by version 2
    _corrupt_entry(two, "flip")
    for v in (1, 2):  # loading 1 evicts 2, whose files are read again then
        after = service.client.post(f"/v1/models/a/predict?version={v}", json=probe)
        assert after.status_code == 200, after.text
        assert after.json() == before[v]
    log = service.output()
    assert log.count("is corrupted") >= 3, log[-3000:]
    assert "Traceback" not in log
