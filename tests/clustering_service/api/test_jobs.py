"""Job control: idempotent submission, cancellation of queued and running jobs,
and standalone workers sharing one queue without running any job twice."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import psycopg
import pytest

from tests.support.clustering import Clustering, vector_items

#: a DEC job that runs for many seconds on 300 items (long enough to act on it)
SLOW_DEC = {"hidden_dims": [64, 64], "latent_dim": 5, "pretrain_epochs": 2000, "cluster_epochs": 2}


@pytest.fixture(scope="module")
def dataset(service: Clustering, digits_vectors: tuple[np.ndarray, np.ndarray]) -> str:
    X, y = digits_vectors
    dataset = service.dataset()
    service.add(dataset, vector_items(X, "j", y))
    return dataset


def _submit(service: Clustering, body: dict[str, Any], key: str | None = None) -> Any:
    headers = {"Idempotency-Key": key} if key else {}
    return service.client.post("/v1/jobs", json=body, headers=headers)


def _wait_running(service: Clustering, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = service.client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] == "running" and (job["progress"] or {}).get("stage") not in (
            None, "starting", "loading"
        ):  # fmt: skip
            return job
        assert job["state"] in ("queued", "running"), job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never got going")


def test_idempotency_key(service: Clustering, dataset: str) -> None:
    body = {
        "type": "train",
        "dataset_id": dataset,
        "algorithm": "kmeans",
        "model_name": "idem",
        "n_clusters": 3,
        "params": {"n_init": 1},
    }
    first = _submit(service, body, "key-1")
    again = _submit(service, body, "key-1")
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other = _submit(service, {**body, "n_clusters": 4}, "key-1")
    assert other.status_code == 409 and other.json()["error"]["type"] == "conflict"
    service.wait_job(first.json()["id"])
    assert service.client.get("/v1/models/idem").json()["latest_version"] == 1


def test_cancel_queued_and_running(service: Clustering, dataset: str) -> None:
    c = service.client
    body = {
        "type": "train",
        "dataset_id": dataset,
        "algorithm": "dec",
        "n_clusters": 5,
        "params": SLOW_DEC,
    }
    running = _submit(service, {**body, "model_name": "cancel-running"}).json()
    queued = _submit(service, {**body, "model_name": "cancel-queued"}).json()
    _wait_running(service, running["id"])
    # one worker with concurrency 1: the second job waits
    r = c.post(f"/v1/jobs/{queued['id']}/cancel")
    assert r.status_code == 202 and r.json()["state"] == "cancelled"
    r = c.post(f"/v1/jobs/{running['id']}/cancel")
    assert r.status_code == 202 and r.json()["cancel_requested"] is True
    started = time.monotonic()
    done = service.wait_job(running["id"], timeout=30)
    assert done["state"] == "cancelled" and time.monotonic() - started < 15
    for job in (running, queued):
        assert c.get(f"/v1/jobs/{job['id']}").json()["state"] == "cancelled"
        assert c.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409
    for name in ("cancel-running", "cancel-queued"):
        assert c.get(f"/v1/models/{name}").status_code == 404  # no version was stored
    cancelled = c.get("/v1/jobs", params={"state": "cancelled"}).json()["jobs"]
    assert {running["id"], queued["id"]} <= {j["id"] for j in cancelled}


@pytest.mark.slow
def test_standalone_workers_share_the_queue(
    clustering_factory: Any, digits_vectors: tuple[np.ndarray, np.ndarray]
) -> None:
    """An API without a worker and two workers on the machine's PostgreSQL: every job
    runs exactly once, versions of one model are numbered without gaps or clashes."""
    local_pg = clustering_factory.local_pg()
    workers = [
        clustering_factory(database_url=local_pg, command="worker").start() for _ in range(2)
    ]
    api = (
        clustering_factory(database_url=local_pg, env={"CLUSTERING_IN_PROCESS_WORKER": "false"})
        .start()
        .wait_ready()
    )
    X, y = digits_vectors
    dataset = api.dataset()
    api.add(dataset, vector_items(X, "w", y))
    jobs = [api.train(dataset, "kmeans", "shared", n_clusters=3 + i % 3) for i in range(8)]
    done = [api.wait_job(job["id"]) for job in jobs]
    assert all(job["state"] == "succeeded" for job in done), done
    assert all(job["attempts"] == 1 for job in done)
    assert sorted(job["result"]["version"] for job in done) == list(range(1, 9))
    with psycopg.connect(local_pg) as conn:
        starts = conn.execute(
            "SELECT job_id, count(*) FROM procrastinate_events WHERE type = 'started' "
            "GROUP BY job_id"
        ).fetchall()
        names = {r[0] for r in conn.execute("SELECT worker FROM jobs").fetchall()}
    assert len(starts) == 8 and all(n == 1 for _, n in starts)
    assert len(names) == 2, names  # both workers took jobs
    assert all(w.running() for w in workers)
