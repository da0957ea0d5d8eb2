"""The data directory's file system fills up (a small tmpfs mounted as
``CLUSTERING_DATA_DIR``), then space is freed again.

* Database elsewhere (the machine's PostgreSQL): the data directory holds only
  caches. Ingest (vectors, images and their thumbnails, all stored in the
  database) goes on; cache writes fail soft; what needs a local file (loading
  a model for prediction, staging a new version) answers a clear 503
  ``storage_full`` or fails the job with that reason. Nothing stored is lost,
  and once space is freed everything works with no restart.
* Embedded PostgreSQL in that directory too: writes answer 503 (database
  unavailable or storage full), never a stack trace; once space is freed the
  service is ready again by itself and every acknowledged item is there.

Skips where a tmpfs cannot be mounted (not root); CI runs as root.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.clustering import vector_items
from tests.support.faults import Ingester, check_clear_error, check_ingest, fill, tmpfs, wait_ready
from tests.support.processes import stop_postmaster


@contextlib.contextmanager
def _stopped_postmaster(factory: Any, pgdata: Path) -> Iterator[None]:
    """Stop the services, then their embedded PostgreSQL, before its tmpfs goes (the
    factory's clean-up comes after the unmount, when its files can no longer be seen;
    and a running service would start the database again)."""
    try:
        yield
    finally:
        for process in factory.made:
            process.close()
        stop_postmaster(pgdata)


def _images(photo_jpegs: dict[str, bytes], to_base64: Any, prefix: str) -> list[dict[str, str]]:
    return [
        {"id": f"{prefix}{name}", "image": to_base64(data)}
        for name, data in list(photo_jpegs.items())[:3]
    ]


@pytest.mark.slow
def test_data_dir_full_with_database_elsewhere(
    clustering_factory: Any,
    digits_vectors: tuple[np.ndarray, np.ndarray],
    photo_jpegs: dict[str, bytes],
    to_base64: Any,
) -> None:
    X, y = digits_vectors
    with tmpfs("32m") as data_dir:
        service = clustering_factory(
            database_url=clustering_factory.local_pg(), data_dir=data_dir
        ).start()
        service.wait_ready()
        c = service.client
        dataset = service.dataset()
        service.add(dataset, vector_items(X[:200], "a", y[:200]))
        before = service.wait_job(service.train(dataset, "kmeans", "before", n_clusters=5)["id"])
        assert before["state"] == "succeeded", before

        filler = fill(data_dir)
        # ingest needs no local disk: vectors, images and thumbnails go to the database
        added = service.add(dataset, vector_items(X[200:], "b", y[200:]))
        assert added["added"] == 100
        photos = service.dataset()
        assert service.add(photos, _images(photo_jpegs, to_base64, "p"))["added"] == 3
        thumb = c.get(f"/v1/datasets/{photos}/items/pchina/thumbnail")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/webp"
        # loading a model needs its files on local disk: a clear 503
        r = c.post("/v1/models/before/predict", json={"embeddings": X[:2].tolist()})
        check_clear_error(r.status_code, r.json(), {"storage_full"})
        assert "CLUSTERING_DATA_DIR" in r.json()["error"]["message"]
        assert r.headers["retry-after"]
        # a job fails with the reason (the snapshot cache failed soft, staging did not)
        during = service.wait_job(service.train(dataset, "kmeans", "during", n_clusters=5)["id"])
        assert during["state"] == "failed", during
        assert during["error"]["type"] == "storage_full", during["error"]
        assert c.get("/v1/models/during").status_code == 404
        assert c.get("/ready").status_code == 200  # the database is fine: still serving

        filler.unlink()
        r = c.post("/v1/models/before/predict", json={"embeddings": X[:2].tolist()})
        assert r.status_code == 200, r.text
        after = service.wait_job(service.train(dataset, "kmeans", "during", n_clusters=5)["id"])
        assert after["state"] == "succeeded", after
        assert after["result"]["version"] == 1  # the failed job left no version
        assert c.get(f"/v1/datasets/{dataset}").json()["count"] == 300
        service.close()


@pytest.mark.slow
def test_data_dir_full_with_embedded_database(clustering_factory: Any) -> None:
    with tmpfs("160m") as data_dir, _stopped_postmaster(clustering_factory, data_dir / "postgres"):
        service = clustering_factory(data_dir=data_dir).start()
        service.wait_ready(120)
        dataset = service.dataset()
        ingester = Ingester(service.client, dataset, batch=2000, dim=64)
        ingester.start()
        ingester.wait_for(2)
        filler = fill(data_dir, keep_bytes=256 * 1024)
        deadline = time.monotonic() + 60
        while not ingester.refused and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ingester.refused, "the database never ran out of space"
        time.sleep(2)  # a few more refusals (and the database's reaction to them)
        full = service.client.get("/ready")
        filler.unlink()
        recovered = wait_ready(service, timeout=90)
        acknowledged = len(ingester.acknowledged)
        ingester.wait_for(acknowledged + 2)  # ingest works again
        ingester.finish()
        print(
            f"/ready while full: {full.status_code}; ready {recovered:.1f} s after freeing "
            f"space; {len(ingester.refused)} refused, first: {ingester.refused[0][1:]}"
        )
        check_ingest(service, dataset, ingester, "after-full")
        service.close()
