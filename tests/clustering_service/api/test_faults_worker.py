"""kill -9 of standalone workers (``python -m clustering_service worker``) mid-training.

The API runs without an in-process worker; workers share one PostgreSQL. A
killed worker stops heartbeating; another worker's sweep finds its job stalled
and runs it again, up to ``CLUSTERING_JOB_MAX_ATTEMPTS`` runs, after which the
job fails with the reason. No partial version is ever visible.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import psycopg
import pytest

from tests.support.clustering import Clustering, vector_items
from tests.support.faults import wait_ready

SLOW_DEC = {"hidden_dims": [64, 64], "latent_dim": 5, "pretrain_epochs": 150, "cluster_epochs": 2}


def _running_on(database_url: str, job_id: str, workers: list[Clustering]) -> Clustering:
    """The live worker process training ``job_id`` (from the ``worker`` the job records;
    a killed worker's run shows as running until another worker's sweep retries it)."""
    by_pid = {w.process.pid: w for w in workers if w.running()}
    deadline = time.monotonic() + 90
    row: Any = None
    while time.monotonic() < deadline:
        with psycopg.connect(database_url) as conn:
            row = conn.execute(
                "SELECT state, worker, progress->>'stage' FROM jobs WHERE id = %s", (job_id,)
            ).fetchone()
        state, worker, stage = row
        pid = int(worker.rpartition(":")[2]) if worker else None
        if state == "running" and stage == "pretrain" and pid in by_pid:
            return by_pid[pid]
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not training on a worker: {row}")


def _submit(api: Clustering, dataset: str, model: str) -> str:
    job = api.train(dataset, "dec", model, n_clusters=5, params=SLOW_DEC)
    return job["id"]


@pytest.mark.slow
def test_kill_standalone_worker_mid_training(
    clustering_factory: Any, digits_vectors: tuple[np.ndarray, np.ndarray]
) -> None:
    url = clustering_factory.local_pg()
    settings = {"CLUSTERING_JOB_MAX_ATTEMPTS": "2"}

    def worker() -> Clustering:
        return clustering_factory(database_url=url, command="worker", env=settings).start()

    api = clustering_factory(
        database_url=url, env={**settings, "CLUSTERING_IN_PROCESS_WORKER": "false"}
    ).start()
    workers = [worker(), worker()]
    api.wait_ready()
    X, y = digits_vectors
    dataset = api.dataset()
    api.add(dataset, vector_items(X, "d", y))

    # 1. the worker training a job dies: the other one runs it again, to the end
    job = _submit(api, dataset, "retried")
    first = _running_on(url, job, workers)
    first.kill()
    second = _running_on(url, job, workers)
    assert second is not first
    started = time.monotonic()
    done = api.wait_job(job, timeout=180)
    print(f"re-run finished {time.monotonic() - started:.1f} s after the kill")
    assert done["state"] == "succeeded" and done["attempts"] == 2, done
    versions = api.client.get("/v1/models/retried").json()["versions"]
    assert [v["version"] for v in versions] == [1]

    # 2. it dies on every run: after job_max_attempts runs the job fails with the reason
    workers.append(worker())
    job = _submit(api, dataset, "doomed")
    for _ in range(2):
        _running_on(url, job, workers).kill()
    assert not [w for w in workers if w.running()]
    # no worker alive: /ready says so (503 not_ready) once the last heartbeat is stale
    deadline = time.monotonic() + 30
    while (r := api.client.get("/ready")).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert r.status_code == 503 and r.json()["error"]["type"] == "not_ready", r.text
    assert "no job worker" in r.json()["error"]["message"]
    # a new worker's sweep finds the second run stalled, the attempts used: failed
    workers.append(worker())
    done = api.wait_job(job, timeout=120)
    assert done["state"] == "failed", done
    assert done["error"]["type"] == "worker_lost", done
    assert "stopped responding, 2 times" in done["error"]["message"], done
    assert api.client.get("/v1/models/doomed").status_code == 404
    wait_ready(api)
