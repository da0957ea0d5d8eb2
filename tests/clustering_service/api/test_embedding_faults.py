"""The embedding service down or too slow during ingest and prediction: a clear
503 naming it, nothing half-stored, and the service fine once it is back."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np

from tests.support.clustering import vector_items
from tests.support.processes import free_port
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
