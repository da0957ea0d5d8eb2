"""POST /v1/embeddings in process (TestClient), plus real-HTTP cases needing an injected backend."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from embedding_service.app import create_app
from embedding_service.config import Settings
from embedding_service.model import pool
from embedding_service.preprocess import PreprocessConfig, preprocess_base64


def settings(**overrides: Any) -> Settings:
    return Settings(**{"model": "random:tiny", "batch_size": 4, **overrides})


def wait_ready(client: TestClient, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, client.get("/ready").json()
        time.sleep(0.02)


@pytest.fixture
def client(tiny_backend: Any) -> Iterator[TestClient]:
    with TestClient(create_app(settings(), tiny_backend)) as client:
        wait_ready(client)
        yield client


def embed(client: TestClient, images: list[str], **fields: Any) -> httpx.Response:
    return client.post("/v1/embeddings", json={"images": images, **fields})


def reference(backend: Any, image: str, pooling: str = "cls", normalize: bool = True) -> np.ndarray:
    crop = preprocess_base64(image, PreprocessConfig(), 0)
    return pool(*backend.forward(crop[None]), pooling, normalize)[0]


def test_embeds_in_input_order_with_the_documented_shape(
    client: TestClient, tiny_backend: Any, photos_b64: list[str]
) -> None:
    images = photos_b64[:6]
    response = embed(client, images)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"model", "dim", "pooling", "normalized", "encoding", "embeddings"}
    assert body["model"] == "random:tiny"
    assert (body["dim"], body["pooling"], body["normalized"], body["encoding"]) == (
        32,
        "cls",
        True,
        "float",
    )
    vectors = np.asarray(body["embeddings"], np.float32)
    assert vectors.shape == (6, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    for image, vector in zip(images, vectors, strict=True):
        np.testing.assert_allclose(vector, reference(tiny_backend, image), atol=1e-5)
    for header in ("x-queue-time", "x-inference-time", "x-total-time"):
        assert float(response.headers[header]) >= 0


@pytest.mark.parametrize(("pooling", "dim"), [("cls", 32), ("mean", 32), ("cls_mean", 64)])
def test_poolings_and_unnormalised_output(
    client: TestClient, tiny_backend: Any, photos_b64: list[str], pooling: str, dim: int
) -> None:
    body = embed(client, photos_b64[:2], pooling=pooling, normalize=False).json()
    assert (body["dim"], body["pooling"], body["normalized"]) == (dim, pooling, False)
    expected = reference(tiny_backend, photos_b64[1], pooling, normalize=False)
    np.testing.assert_allclose(body["embeddings"][1], expected, rtol=1e-4, atol=1e-5)


def test_base64_encoding_is_little_endian_float32_of_the_same_vectors(
    client: TestClient, photos_b64: list[str]
) -> None:
    floats = embed(client, photos_b64[:3]).json()["embeddings"]
    body = embed(client, photos_b64[:3], encoding="base64").json()
    assert body["encoding"] == "base64"
    decoded = [np.frombuffer(base64.b64decode(s), "<f4") for s in body["embeddings"]]
    np.testing.assert_allclose(np.stack(decoded), np.asarray(floats, np.float32), atol=1e-6)


def test_accepts_the_seed_field_name_and_data_uris(
    client: TestClient, photos_b64: list[str]
) -> None:
    plain = embed(client, photos_b64[:1]).json()["embeddings"]
    alias = client.post("/v1/embeddings", json={"base64_images": photos_b64[:1]})
    assert alias.status_code == 200
    assert alias.json()["embeddings"] == plain
    uri = embed(client, ["data:image/jpeg;base64," + photos_b64[0]])
    assert uri.status_code == 200
    np.testing.assert_allclose(uri.json()["embeddings"], plain, atol=1e-6)


def test_same_vector_whatever_shares_the_batch(client: TestClient, photos_b64: list[str]) -> None:
    alone = np.asarray(embed(client, photos_b64[2:3]).json()["embeddings"][0])
    crowded = np.asarray(embed(client, photos_b64).json()["embeddings"][2])
    np.testing.assert_allclose(crowded, alone, atol=1e-5)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"images": []}, "images"),
        ({}, "images"),
        ({"images": "abc"}, "images"),
        ({"images": ["abc", 3]}, "images[1]"),
        ({"images": ["abc"], "normalize": "yes"}, "normalize"),
        ({"images": ["abc"], "pooling": "max"}, "pooling"),
        ({"images": ["abc"], "encoding": "hex"}, "encoding"),
        ([1, 2], "body"),
    ],
)
def test_malformed_requests_are_invalid_request_naming_the_field(
    client: TestClient, payload: Any, field: str
) -> None:
    response = client.post("/v1/embeddings", json=payload)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "invalid_request"
    assert error["field"] == field
    assert error["message"]


def test_non_json_body_is_invalid_request(client: TestClient) -> None:
    response = client.post(
        "/v1/embeddings", content=b"images=1", headers={"content-type": "text/plain"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["type"] == "invalid_request"
    assert response.json()["error"]["field"] == "body"


def test_a_bad_image_names_its_index_and_the_next_request_succeeds(
    client: TestClient, photos_b64: list[str], bad_images: dict[str, str]
) -> None:
    for kind, bad in bad_images.items():
        response = embed(client, [photos_b64[0], photos_b64[1], bad, photos_b64[2]])
        assert response.status_code == 422, (kind, response.text)
        error = response.json()["error"]
        assert (error["type"], error["index"]) == ("invalid_image", 2), kind
        assert embed(client, photos_b64[:1]).status_code == 200


def test_too_many_images(tiny_backend: Any, photos_b64: list[str]) -> None:
    app = create_app(settings(max_images_per_request=3, max_queue_images=8), tiny_backend)
    with TestClient(app) as client:
        wait_ready(client)
        response = embed(client, photos_b64[:4])
        assert response.status_code == 413
        error = response.json()["error"]
        assert error["type"] == "too_many_images"
        assert "3" in error["message"]
        assert embed(client, photos_b64[:3]).status_code == 200


def test_body_over_the_byte_limit_is_refused(tiny_backend: Any, photos_b64: list[str]) -> None:
    limit = 2 * max(len(p) for p in photos_b64)
    app = create_app(settings(max_request_bytes=limit), tiny_backend)
    with TestClient(app) as client:
        wait_ready(client)
        response = embed(client, photos_b64)
        assert response.status_code == 413
        error = response.json()["error"]
        assert error["type"] == "payload_too_large"
        assert str(limit) in error["message"]
        assert embed(client, photos_b64[:1]).status_code == 200


def test_api_key(tiny_backend: Any, photos_b64: list[str]) -> None:
    app = create_app(settings(api_key="s3cret"), tiny_backend)
    with TestClient(app) as client:
        wait_ready(client)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = client.post(
                "/v1/embeddings", json={"images": photos_b64[:1]}, headers=headers
            )
            assert response.status_code == 401
            assert response.json()["error"]["type"] == "unauthorized"
        ok = client.post(
            "/v1/embeddings",
            json={"images": photos_b64[:1]},
            headers={"Authorization": "Bearer s3cret"},
        )
        assert ok.status_code == 200
        for path in ("/health", "/ready", "/metrics", "/info"):
            assert client.get(path).status_code == 200, path


def test_a_model_failure_fails_that_request_only(controlled: Any, photos_b64: list[str]) -> None:
    with TestClient(create_app(settings(), controlled)) as client:
        wait_ready(client)
        controlled.fail = True
        response = embed(client, photos_b64[:2])
        assert response.status_code == 500
        assert response.json()["error"]["type"] == "internal_error"
        assert client.get("/ready").status_code == 200
        assert embed(client, photos_b64[:2]).status_code == 200


def test_a_dead_worker_turns_health_and_ready_red_and_requests_fail_fast(
    controlled: Any, photos_b64: list[str]
) -> None:
    with TestClient(create_app(settings(), controlled)) as client:
        wait_ready(client)
        controlled.kill = True
        response = embed(client, photos_b64[:1])
        assert response.status_code >= 500
        for path in ("/ready", "/health"):
            response = client.get(path)
            assert response.status_code == 503, path
            assert "worker died" in response.json()["error"]["message"]
        started = time.perf_counter()
        response = embed(client, photos_b64[:1])
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "not_ready"
        assert time.perf_counter() - started < 1


def test_not_ready_while_warming_up(controlled: Any, photos_b64: list[str]) -> None:
    warm = threading.Event()
    inner_warmup = controlled.warmup
    controlled.warmup = lambda batch_size: (warm.wait(30), inner_warmup(batch_size))
    with TestClient(create_app(settings(), controlled)) as client:
        assert client.get("/health").status_code == 200
        response = client.get("/ready")
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "not_ready"
        assert embed(client, photos_b64[:1]).status_code == 503
        warm.set()
        wait_ready(client)
        assert embed(client, photos_b64[:1]).status_code == 200


# --- over real HTTP (uvicorn in a thread) -------------------------------------------


def test_full_queue_answers_429_at_once(
    controlled: Any, photos_b64: list[str], threaded_server: Any
) -> None:
    app = create_app(settings(max_queue_images=8, max_images_per_request=8), controlled)
    with threaded_server(app) as server:
        controlled.gate = threading.Event()
        held = threading.Thread(
            target=httpx.post,
            args=(f"{server.url}/v1/embeddings",),
            kwargs={"json": {"images": photos_b64[:6]}, "timeout": 30},
        )
        held.start()
        assert controlled.entered.wait(10)
        started = time.perf_counter()
        response = httpx.post(f"{server.url}/v1/embeddings", json={"images": photos_b64[:3]})
        elapsed = time.perf_counter() - started
        controlled.gate.set()
        held.join(30)
        assert response.status_code == 429
        assert response.json()["error"]["type"] == "overloaded"
        assert int(response.headers["retry-after"]) >= 1
        assert elapsed < 1.0
        ok = httpx.post(f"{server.url}/v1/embeddings", json={"images": photos_b64[:3]})
        assert ok.status_code == 200
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'embedding_requests_total{outcome="overloaded"} 1.0' in metrics


def test_full_queue_or_byte_budget_refuses_before_the_body_is_read(
    controlled: Any, photos_b64: list[str], threaded_server: Any
) -> None:
    """A refused request's body is never parsed: garbage that would be a 422 once read
    gets the 429, both when the image queue is full and when the bytes being served
    would pass max_pending_bytes. The server drains it, so the client reads the 429."""
    held_body = json.dumps({"images": photos_b64[:2]}).encode()
    limit = 1024 * 1024
    app = create_app(
        settings(
            max_queue_images=8,
            max_images_per_request=8,
            max_request_bytes=limit,
            max_pending_bytes=limit,
        ),
        controlled,
    )
    garbage = b"x" * (limit - len(held_body) + 1)
    with threaded_server(app) as server:
        controlled.gate = threading.Event()
        controlled.entered.clear()
        held = threading.Thread(
            target=httpx.post,
            args=(f"{server.url}/v1/embeddings",),
            kwargs={"content": held_body, "timeout": 30},
        )
        held.start()
        assert controlled.entered.wait(10)
        small = httpx.post(f"{server.url}/v1/embeddings", content=b"not json")
        over = httpx.post(f"{server.url}/v1/embeddings", content=garbage)
        controlled.gate.set()
        held.join(30)
        assert small.status_code == 422  # fits: read and refused for what it is
        assert over.status_code == 429, over.text
        assert over.json()["error"]["type"] == "overloaded"
        assert int(over.headers["retry-after"]) >= 1

    app = create_app(settings(max_queue_images=8, max_images_per_request=8), controlled)
    with threaded_server(app) as server:
        controlled.gate = threading.Event()
        controlled.entered.clear()
        held = threading.Thread(
            target=httpx.post,
            args=(f"{server.url}/v1/embeddings",),
            kwargs={"json": {"images": photos_b64[:8]}, "timeout": 30},
        )
        held.start()
        assert controlled.entered.wait(10)
        full = httpx.post(f"{server.url}/v1/embeddings", content=b"not json")
        controlled.gate.set()
        held.join(30)
        assert full.status_code == 429, full.text
        assert httpx.post(f"{server.url}/v1/embeddings", content=b"not json").status_code == 422


def test_work_of_a_client_that_went_away_is_dropped(
    controlled: Any, photos_b64: list[str], threaded_server: Any
) -> None:
    app = create_app(settings(batch_size=1), controlled)
    with threaded_server(app) as server:
        controlled.gate = threading.Event()
        controlled.entered.clear()
        busy = threading.Thread(
            target=httpx.post,
            args=(f"{server.url}/v1/embeddings",),
            kwargs={"json": {"images": photos_b64[:1]}, "timeout": 30},
        )
        busy.start()
        assert controlled.entered.wait(10)
        seen_before = len(controlled.seen)
        # A second client sends 4 images, then hangs up while they wait for the model.
        body = httpx.Request(
            "POST", f"{server.url}/v1/embeddings", json={"images": photos_b64[1:5]}
        )
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            head = "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            head += f"Content-Length: {len(body.content)}\r\n\r\n"
            sock.sendall(head.encode() + body.content)
            deadline = time.monotonic() + 10
            while app.state.runtime.batcher.depth < 5:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.2)  # decoded and queued behind the busy batch
        deadline = time.monotonic() + 10
        while app.state.runtime.batcher.depth > 1:
            assert time.monotonic() < deadline, "the abandoned request is still queued"
            time.sleep(0.01)
        controlled.gate.set()
        busy.join(30)
        ok = httpx.post(f"{server.url}/v1/embeddings", json={"images": photos_b64[5:6]})
        assert ok.status_code == 200
        # Only the busy request's image and the last one reached the model.
        assert len(controlled.seen) - seen_before == 1
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'embedding_requests_total{outcome="disconnected"} 1.0' in metrics


def test_seed_client_route(client: TestClient, tiny_backend: Any, photos_b64: list[str]) -> None:
    """The seed project's client: POST /embeddings/ with base64_images (and normalize),
    reading "embeddings" -- only the host and port change."""
    response = client.post(
        "/embeddings/", json={"base64_images": photos_b64[:3], "normalize": False}
    )
    assert response.status_code == 200, response.text
    vectors = np.asarray(response.json()["embeddings"], dtype=np.float32)
    expected = reference(tiny_backend, photos_b64[1], normalize=False)
    np.testing.assert_allclose(vectors[1], expected, rtol=1e-4, atol=1e-5)
    assert abs(float(np.linalg.norm(vectors[0])) - 1.0) > 1e-3  # not normalised, as asked
    bad = client.post("/embeddings/", json={"base64_images": ["not an image"]})
    assert bad.status_code == 422 and bad.json()["error"]["index"] == 0
