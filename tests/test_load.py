"""The load test's quick mode end to end (``bench/load.py``; the long run is in
docs/reliability/load.md): 64 clients on ``/v1/embeddings`` and on predict,
ingest while a training job runs, and the embedding service's memory under a
growing number of clients on a full queue.

Runs against the session's services (tiny random-weight model, the shared
clustering API on the embedded PostgreSQL) plus one small-queue embedding
service. Asserts the invariants, not speeds: every answer a 200 or a 429 with
Retry-After, the job succeeded with every ingested item stored, and the
pressure service's peak RSS did not grow with the clients.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from bench.load import Plan, Services, failures, pressure_growth_limit, pressure_service, run
from tests.support.clustering import Clustering
from tests.support.processes import ServiceProcess


@pytest.fixture
def pressure() -> Iterator[ServiceProcess]:
    process = pressure_service("random:tiny")
    process.env.update({"EMBEDDING_NUM_THREADS": "1", "EMBEDDING_PREPROCESS_WORKERS": "1"})
    process.start().wait_ready(120)
    yield process
    process.close()


def test_quick_load_only_200_and_429_and_memory_bounded(
    embedding_service: ServiceProcess, service: Clustering, pressure: ServiceProcess
) -> None:
    plan = Plan(
        clients=64,
        images_per_request=1,
        duration=2.0,
        max_requests=1_000,
        levels=(16, 128),
        level_duration=1.0,
        seed_items=1_000,
        ingest_clients=8,
        ingest_min_batches=8,
        ingest_max_batches=48,
        train_params={"hidden_dims": [32, 32], "pretrain_epochs": 15, "cluster_epochs": 5},
    )
    pids = {
        "embedding": embedding_service.process.pid,  # type: ignore[union-attr]
        "clustering": service.process.pid,  # type: ignore[union-attr]
        "embedding_pressure": pressure.process.pid,  # type: ignore[union-attr]
    }
    services = Services(embedding_service.url, service.url, pressure.url, pids)
    results = run(services, plan, ["embeddings", "ingest", "predict", "pressure"])
    report = json.dumps(results, indent=1)
    assert failures(results) == [], report
    assert results["embeddings"]["statuses"].get("200", 0) > 0, report
    ingest = results["ingest"]
    assert ingest["job_state"] == "succeeded", report
    assert ingest["batches_while_training"] > 0, report
    assert ingest["dataset_count"] == ingest["dataset_count_expected"], report
    assert set(results["predict"]) == {"embeddings", "images"}, report
    pressure_run = results["pressure"]
    assert pressure_run["rejected_429"] > 0, report  # the queue really was full
    assert pressure_run["rss_growth_mb"] <= pressure_growth_limit(plan.levels) / 2**20, report
