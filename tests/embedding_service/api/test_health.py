"""GET /health, /ready, /info, /metrics and the error shape of unknown routes."""

from __future__ import annotations

import time
from typing import Any

from fastapi.testclient import TestClient

from embedding_service.app import create_app
from embedding_service.config import Settings


def ready_client(backend: Any, **overrides: Any) -> TestClient:
    app = create_app(Settings(model="random:tiny", batch_size=4, **overrides), backend)
    return TestClient(app)


def wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 30
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_health_and_ready(tiny_backend: Any) -> None:
    with ready_client(tiny_backend) as client:
        wait_ready(client)
        assert client.get("/health").json()["status"] == "ok"
        assert client.get("/ready").json() == {"status": "ready"}


def test_info_describes_model_limits_and_preprocessing(tiny_backend: Any) -> None:
    with ready_client(tiny_backend, max_images_per_request=100, max_queue_images=400) as client:
        wait_ready(client)
        info = client.get("/info").json()
    assert info["model"] == "random:tiny"
    assert info["random_weights"] is True
    assert info["dim"] == 32
    assert info["device"] == "cpu"
    assert info["dtype"] == "float32"
    assert info["precision"] == "fp32"
    assert info["pooling"] == "cls"
    assert info["batch_size"] == 4
    assert info["max_images_per_request"] == 100
    assert info["max_queue_images"] == 400
    assert info["max_request_bytes"] == 64 * 1024 * 1024
    assert info["max_image_pixels"] == 50_000_000
    assert info["preprocessing"]
    assert info["state"] == "ready"
    assert info["version"]


def test_metrics_count_requests_images_batches_and_times(
    tiny_backend: Any, photos_b64: list[str]
) -> None:
    with ready_client(tiny_backend) as client:
        wait_ready(client)
        assert client.post("/v1/embeddings", json={"images": photos_b64[:6]}).status_code == 200
        assert client.post("/v1/embeddings", json={"images": ["nope"]}).status_code == 422
        response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'embedding_requests_total{outcome="success"} 1.0' in text
    assert 'embedding_requests_total{outcome="invalid_image"} 1.0' in text
    assert "embedding_images_total 6.0" in text
    assert "embedding_queue_images 0.0" in text
    assert "embedding_ready 1.0" in text
    # warm-up is not counted: 6 images in batches of 4 -> 4 + 2
    assert "embedding_batch_size_count 2.0" in text
    assert "embedding_batch_size_sum 6.0" in text
    for name in ("queue", "inference", "total"):
        assert f"embedding_{name}_seconds_count 1.0" in text


def test_two_apps_in_one_process_keep_separate_metrics(tiny_backend: Any) -> None:
    with ready_client(tiny_backend) as one, ready_client(tiny_backend) as two:
        wait_ready(one)
        wait_ready(two)
        one.post("/v1/embeddings", json={"images": ["nope"]})
        assert "invalid_image" in one.get("/metrics").text
        assert "invalid_image" not in two.get("/metrics").text


def test_unknown_routes_and_methods_use_the_error_shape(tiny_backend: Any) -> None:
    with ready_client(tiny_backend) as client:
        missing = client.get("/v1/nothing")
        assert missing.status_code == 404
        assert missing.json()["error"]["type"] == "not_found"
        wrong = client.get("/v1/embeddings")
        assert wrong.status_code == 405
        assert wrong.json()["error"]["type"] == "method_not_allowed"
