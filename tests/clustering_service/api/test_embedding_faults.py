"""The embedding service down or too slow during ingest and prediction: a clear
503 naming it, nothing half-stored, and the service fine once it is back."""

from __future__ import annotations

import time
from typing import Any

import httpx
import numpy as np
import pytest

from tests.support.clustering import vector_items
from tests.support.faults import Ingester, check_clear_error, check_ingest
from tests.support.processes import free_port, tiny_embedding_service
from tests.support.stub import ThreadedServer, slow_embedding_app


def test_embedding_service_down(
    clustering_factory: Any,
    photo_jpegs: dict[str, bytes],
    to_base64: Any,
    digits_vectors: tuple[np.ndarray, np.ndarray],
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    service = clustering_factory(env={"CLUSTERING_EMBEDDING_URL": closed}).start().wait_ready()
    c = service.client
    dataset = service.dataset()
    photos = [to_base64(p) for p in list(photo_jpegs.values())[:3]]
    items = [{"id": f"p{i}", "image": p} for i, p in enumerate(photos)]
    r = c.post(f"/v1/datasets/{dataset}/items", json={"items": items})
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["type"] == "embedding_service_unavailable" and closed in error["message"]
    assert "retry-after" in r.headers
    assert c.get(f"/v1/datasets/{dataset}").json()["count"] == 0
    # vectors do not need the embedding service; prediction from images does
    X, _ = digits_vectors
    service.add(dataset, vector_items(X[:40]))
    job = service.train(dataset, "kmeans", "no-embedder", n_clusters=3)
    assert service.wait_job(job["id"])["state"] == "succeeded"
    r = c.post("/v1/models/no-embedder/predict", json={"images": photos[:1]})
    assert r.status_code == 503 and r.json()["error"]["type"] == "embedding_service_unavailable"
    assert c.get("/health").status_code == 200


def test_embedding_service_too_slow(
    clustering_factory: Any,
    photo_jpegs: dict[str, bytes],
    to_base64: Any,
) -> None:
    with ThreadedServer(slow_embedding_app(delay=5.0)) as slow:
        service = (
            clustering_factory(
                env={"CLUSTERING_EMBEDDING_URL": slow.url, "CLUSTERING_EMBEDDING_TIMEOUT": "0.5"},
            )
            .start()
            .wait_ready()
        )
        dataset = service.dataset()
        image = to_base64(next(iter(photo_jpegs.values())))
        r = service.client.post(
            f"/v1/datasets/{dataset}/items", json={"items": [{"id": "a", "image": image}]}
        )
        assert r.status_code == 503, r.text
        assert "ReadTimeout" in r.json()["error"]["message"]
        assert service.client.get(f"/v1/datasets/{dataset}").json()["count"] == 0


def test_embedding_service_comes_back(
    clustering_factory: Any,
    embedding_service: Any,
    photo_jpegs: dict[str, bytes],
    to_base64: Any,
) -> None:
    """Two URLs, one dead: the retries go round robin, so ingest still succeeds."""
    dead = f"http://127.0.0.1:{free_port()}"
    service = (
        clustering_factory(
            env={
                "CLUSTERING_EMBEDDING_URL": f"{dead},{embedding_service.url}",
                "CLUSTERING_EMBEDDING_BATCH_SIZE": "2",
            },
        )
        .start()
        .wait_ready()
    )
    dataset = service.dataset()
    photos = [to_base64(p) for p in list(photo_jpegs.values())[:4]]
    r = service.client.post(
        f"/v1/datasets/{dataset}/items",
        json={"items": [{"id": f"p{i}", "image": p} for i, p in enumerate(photos)]},
    )
    assert r.status_code == 200, r.text
    assert r.json()["added"] == 4
    assert httpx.get(f"{service.url}/ready").status_code == 200


@pytest.mark.slow
def test_embedding_service_killed_during_ingest_and_prediction(
    clustering_factory: Any,
    photo_jpegs: dict[str, bytes],
    to_base64: Any,
    digits_vectors: tuple[np.ndarray, np.ndarray],
) -> None:
    """A real embedding service (of this test's own) killed with -9 while images
    stream in, then started again on the same port: ingest and image prediction
    answer 503 meanwhile, store nothing of a refused batch, and work again with
    no step on the clustering service."""
    embedder = tiny_embedding_service()
    try:
        embedder.start().wait_ready(120)
        service = (
            clustering_factory(env={"CLUSTERING_EMBEDDING_URL": embedder.url}).start().wait_ready()
        )
        photos = [to_base64(p) for p in list(photo_jpegs.values())[:2]]
        dataset = service.dataset()
        ingester = Ingester(
            service.client,
            dataset,
            make_items=lambda n: [{"id": f"b{n}-{i}", "image": p} for i, p in enumerate(photos)],
        )
        ingester.start()
        ingester.wait_for(2)
        embedder.kill()
        deadline = time.monotonic() + 30
        while not ingester.refused and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ingester.refused, "no ingest request was refused while the embedder was down"
        model = service.train(dataset, "kmeans", "images", n_clusters=2)
        assert service.wait_job(model["id"])["state"] == "succeeded"
        r = service.client.post("/v1/models/images/predict", json={"images": photos[:1]})
        check_clear_error(r.status_code, r.json(), {"embedding_service_unavailable"})
        assert embedder.url in r.json()["error"]["message"]
        assert service.client.get("/ready").status_code == 200  # it still serves the rest

        embedder.start().wait_ready(120)  # same port
        acknowledged = len(ingester.acknowledged)
        ingester.wait_for(acknowledged + 2)
        ingester.finish()
        r = service.client.post("/v1/models/images/predict", json={"images": photos[:1]})
        assert r.status_code == 200, r.text
        check_ingest(service, dataset, ingester, "after", {"embedding_service_unavailable"})
    finally:
        embedder.close()
