"""kill -9 of the API process during ingest and during training.

After a restart every acknowledged item is present, no partial version is
visible, and the interrupted job is run again (or failed with the reason once
it has used its attempts), with no manual step.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from tests.support.clustering import vector_items

SLOW_DEC = {"hidden_dims": [64, 64], "latent_dim": 5, "pretrain_epochs": 60, "cluster_epochs": 2}


def _running(service: Any, job_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = service.client.get(f"/v1/jobs/{job_id}").json()
        stage = (job["progress"] or {}).get("stage")
        if job["state"] == "running" and stage not in (None, "starting", "loading"):
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never started training")


@pytest.mark.slow
def test_kill_during_ingest_loses_no_acknowledged_item(clustering_factory: Any) -> None:
    service = clustering_factory().start().wait_ready()
    dataset = service.dataset()
    rng = np.random.default_rng(0)
    acknowledged: list[list[str]] = []
    stop = threading.Event()

    def ingest() -> None:
        batch = 0
        while not stop.is_set():
            items = vector_items(rng.standard_normal((2000, 128)).astype(np.float32), f"b{batch}-")
            try:
                r = service.client.post(f"/v1/datasets/{dataset}/items", json={"items": items})
            except Exception:  # the server died under us: this batch was never acknowledged
                return
            if r.status_code == 200:
                acknowledged.append([items[0]["id"], items[-1]["id"]])
            batch += 1

    thread = threading.Thread(target=ingest)
    thread.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    service.kill()
    stop.set()
    thread.join(30)
    assert len(acknowledged) >= 3

    service.start().wait_ready()
    c = service.client
    count = c.get(f"/v1/datasets/{dataset}").json()["count"]
    # every acknowledged batch is there; at most the one in flight besides, and whole
    assert count in (2000 * len(acknowledged), 2000 * (len(acknowledged) + 1))
    for first, last in acknowledged:
        for item_id in (first, last):
            assert c.get(f"/v1/datasets/{dataset}/items/{item_id}").status_code == 200
    # the dataset stays usable
    job = service.train(dataset, "kmeans", "after-crash", n_clusters=3)
    assert service.wait_job(job["id"])["state"] == "succeeded"


@pytest.mark.slow
@pytest.mark.parametrize(("how", "max_attempts"), [("kill", 3), ("kill", 1), ("term", 3)])
def test_kill_during_training(
    clustering_factory: Any,
    digits_vectors: tuple[np.ndarray, np.ndarray],
    how: str,
    max_attempts: int,
) -> None:
    """kill -9 (a crash: the job is found stalled and re-run) or SIGTERM (a shutdown:
    the job is aborted at once and handed back to the queue)."""
    service = (
        clustering_factory(env={"CLUSTERING_JOB_MAX_ATTEMPTS": str(max_attempts)})
        .start()
        .wait_ready()
    )
    X, y = digits_vectors
    dataset = service.dataset()
    service.add(dataset, vector_items(X, "k", y))
    job = service.client.post(
        "/v1/jobs",
        json={
            "type": "train",
            "dataset_id": dataset,
            "algorithm": "dec",
            "n_clusters": 5,
            "model_name": "crashed",
            "params": SLOW_DEC,
        },
    ).json()
    _running(service, job["id"])
    if how == "kill":
        service.kill()
    else:
        service.stop()
    service.start().wait_ready()
    c = service.client
    # no partial version became visible
    assert c.get("/v1/models/crashed").status_code == 404
    done = service.wait_job(job["id"], timeout=180)
    if max_attempts > 1:
        assert done["state"] == "succeeded", done
        assert done["attempts"] == 2
        model = c.get("/v1/models/crashed").json()
        assert [v["version"] for v in model["versions"]] == [1]
    else:
        assert done["state"] == "failed", done
        assert done["error"]["type"] == "worker_lost"
        assert "stopped responding" in done["error"]["message"]
        assert c.get("/v1/models/crashed").status_code == 404
