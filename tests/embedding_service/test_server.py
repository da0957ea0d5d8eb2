"""``python -m embedding_service`` as deployed: a real process, real HTTP.

One module-scoped server (random:tiny, API key, small limits) serves most
tests; start-up failure and a local-directory model get their own process.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from embedding_service.model import pool
from embedding_service.preprocess import PreprocessConfig, preprocess_base64

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_IMAGES = 16
MAX_BYTES = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def server(server_class: Any) -> Iterator[Any]:
    process = server_class(
        "--model", "random:tiny", "--batch-size", "4", "--preprocess-workers", "2",
        env={
            "EMBEDDING_API_KEY": KEY,
            "EMBEDDING_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES),
            "EMBEDDING_MAX_REQUEST_BYTES": str(MAX_BYTES),
            "EMBEDDING_MAX_QUEUE_IMAGES": "512",
            "EMBEDDING_LOG_LEVEL": "warning",
        },
    )  # fmt: skip
    process.start().wait_ready()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def http(server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client


def embed(http: httpx.Client, images: list[str], **fields: Any) -> httpx.Response:
    return http.post("/v1/embeddings", json={"images": images, **fields})


def vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["embeddings"], np.float32)


def test_embeddings_match_the_backend_in_process(
    http: httpx.Client, tiny_backend: Any, photos_b64: list[str]
) -> None:
    response = embed(http, photos_b64)
    got = vectors(response)
    crops = np.stack(
        [preprocess_base64(p, PreprocessConfig(), i) for i, p in enumerate(photos_b64)]
    )
    expected = pool(*tiny_backend.forward(crops), "cls", True)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    for header in ("x-queue-time", "x-inference-time", "x-total-time"):
        assert float(response.headers[header]) >= 0


def test_concurrent_clients_get_the_vectors_of_sequential_requests(
    http: httpx.Client, photos_b64: list[str]
) -> None:
    singles = np.concatenate([vectors(embed(http, [p])) for p in photos_b64])
    rng = np.random.default_rng(0)
    jobs = []
    for _ in range(16 * 4):
        picks = rng.integers(0, len(photos_b64), size=int(rng.integers(1, 13)))
        jobs.append(picks)

    def run(picks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with httpx.Client(base_url=http.base_url, headers=AUTH, timeout=120) as client:
            return picks, vectors(embed(client, [photos_b64[i] for i in picks]))

    with ThreadPoolExecutor(16) as pool_:
        results = list(pool_.map(run, jobs))
    for picks, got in results:
        cosine = np.sum(got * singles[picks], axis=1)
        assert cosine.min() >= 0.99999


@pytest.mark.parametrize(
    "kind",
    ["invalid_base64", "not_an_image", "truncated_jpeg", "one_pixel", "decompression_bomb"],
)
def test_each_bad_image_gets_422_with_its_index_and_the_service_carries_on(
    http: httpx.Client, photos_b64: list[str], bad_images: dict[str, str], kind: str
) -> None:
    response = embed(http, [photos_b64[0], bad_images[kind]])
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["type"], error["index"]) == ("invalid_image", 1)
    assert error["message"]
    assert vectors(embed(http, photos_b64[:2])).shape == (2, 32)


@pytest.mark.parametrize(
    ("request_kwargs", "status", "error_type"),
    [
        ({"json": {"images": []}}, 422, "invalid_request"),
        ({"json": {"images": ["x"] * (MAX_IMAGES + 1)}}, 413, "too_many_images"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422,
         "invalid_request"),
        ({"json": {"images": [1, 2]}}, 422, "invalid_request"),
        ({"json": {"images": ["x"], "normalize": "no"}}, 422, "invalid_request"),
        ({"json": {"images": ["x"]}, "headers": {"Authorization": "Bearer nope"}}, 401,
         "unauthorized"),
    ],
)  # fmt: skip
def test_bad_requests_get_their_documented_status(
    http: httpx.Client,
    photos_b64: list[str],
    request_kwargs: dict[str, Any],
    status: int,
    error_type: str,
) -> None:
    response = http.post("/v1/embeddings", **request_kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error"]["type"] == error_type
    assert vectors(embed(http, photos_b64[:1])).shape == (1, 32)


def _raw_response(sock: socket.socket, timeout: float = 10) -> bytes:
    """What the server sends until it closes the connection (it must close it).

    A server that closes with unread request bytes in its socket makes the
    kernel send a reset, which can overtake its answer: then this returns what
    arrived before the reset (possibly nothing).
    """
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_declared_body_over_the_limit_is_refused_before_it_is_sent(
    server: Any, http: httpx.Client, photos_b64: list[str]
) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        head = (
            "POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Length: {10 * MAX_BYTES}\r\n\r\n"
        )
        started = time.perf_counter()
        sock.sendall(head.encode())  # and not a byte of the body
        response = _raw_response(sock)
        elapsed = time.perf_counter() - started
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert b"connection: close" in response.lower()
    body = json.loads(response.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["type"] == "payload_too_large"
    assert elapsed < 2
    assert vectors(embed(http, photos_b64[:1])).shape == (1, 32)


def test_chunked_body_is_cut_off_once_it_passes_the_limit(
    server: Any, http: httpx.Client, photos_b64: list[str]
) -> None:
    # A chunked body (no Content-Length) that passes the limit and never ends:
    # a server that waited for the whole body would never answer.
    piece = b"A" * 65536
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        head = (
            "POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        sock.sendall(head.encode() + b'10\r\n{"images": ["AAA\r\n')
        for _ in range(MAX_BYTES // len(piece) + 1):  # just past the limit
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        response = _raw_response(sock)
    # The server answered or hung up although the body never ended. The 413 is
    # checked when it arrives before the reset the unread bytes cause.
    if response:
        assert response.startswith(b"HTTP/1.1 413"), response[:200]
        body = json.loads(response.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["type"] == "payload_too_large"
    assert vectors(embed(http, photos_b64[:1])).shape == (1, 32)


def test_health_ready_info_metrics_are_open_and_v1_is_not(server: Any) -> None:
    for path in ("/health", "/ready", "/metrics", "/info"):
        assert httpx.get(server.url + path).status_code == 200, path
    response = httpx.post(server.url + "/v1/embeddings", json={"images": ["x"]})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "unauthorized"


def test_metrics_over_http(http: httpx.Client, photos_b64: list[str]) -> None:
    before = http.get("/metrics").text
    embed(http, photos_b64[:3])
    text = http.get("/metrics").text

    def value(text: str, name: str) -> float:
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    assert value(text, "embedding_images_total") == value(before, "embedding_images_total") + 3
    success = 'embedding_requests_total{outcome="success"}'
    assert value(text, success) == value(before, success) + 1
    assert "embedding_queue_images 0.0" in text
    assert "embedding_batch_size_bucket" in text
    for name in ("queue", "inference", "total"):
        assert f"embedding_{name}_seconds_bucket" in text
    assert 'embedding_requests_total{outcome="unauthorized"}' in text


def test_serves_a_local_model_directory(
    tmp_path: Path, server_process: Any, photos_b64: list[str]
) -> None:
    from transformers import Dinov2Model

    from embedding_service.model import load_backend, random_config

    Dinov2Model(random_config("tiny")).save_pretrained(tmp_path / "dinov2-tiny")
    model_dir = str(tmp_path / "dinov2-tiny")
    server = server_process("--model", model_dir, "--batch-size", "2").start().wait_ready()
    info = httpx.get(server.url + "/info").json()
    assert (info["model"], info["dim"], info["random_weights"]) == (model_dir, 32, False)
    response = httpx.post(server.url + "/v1/embeddings", json={"images": photos_b64[:3]})
    crops = np.stack([preprocess_base64(p, PreprocessConfig(), 0) for p in photos_b64[:3]])
    expected = pool(*load_backend(model_dir, device="cpu").forward(crops), "cls", True)
    np.testing.assert_allclose(vectors(response), expected, atol=1e-5)


def test_an_unloadable_model_fails_start_up_with_the_how_to(
    tmp_path: Path, server_process: Any
) -> None:
    server = server_process("--model", str(tmp_path / "no-such-model")).start()
    assert server.process is not None
    code = server.process.wait(120)
    output = server.output()
    assert code != 0, output
    assert "no-such-model" in output
    assert "How to provide DINOv2 weights" in output


def test_invalid_settings_exit_with_status_2(server_process: Any) -> None:
    server = server_process("--batch-size", "0").start()
    assert server.process is not None
    assert server.process.wait(60) == 2
    assert "batch_size" in server.output()


def test_base64_encoding_over_http(http: httpx.Client, photos_b64: list[str]) -> None:
    floats = vectors(embed(http, photos_b64[:2]))
    body = embed(http, photos_b64[:2], encoding="base64").json()
    decoded = np.stack([np.frombuffer(base64.b64decode(s), "<f4") for s in body["embeddings"]])
    np.testing.assert_allclose(decoded, floats, atol=1e-6)
