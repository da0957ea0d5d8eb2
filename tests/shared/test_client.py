"""shared.client against a real server (uvicorn in a thread) and scripted transports."""

from __future__ import annotations

import asyncio
import base64
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn

from embedding_service.app import create_app
from embedding_service.config import Settings
from embedding_service.model import load_backend
from shared.client import AsyncEmbeddingClient, EmbeddingClient, EmbeddingServiceError

MAX_IMAGES = 4


@pytest.fixture(scope="module")
def photos(photo_jpegs: dict[str, bytes]) -> list[bytes]:
    """Seven JPEG photographs (tests/conftest.py): more than one request's worth."""
    return list(photo_jpegs.values())


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The embedding service with small limits, so the client has to split."""
    settings = Settings(
        model="random:tiny",
        batch_size=4,
        max_images_per_request=MAX_IMAGES,
        max_queue_images=64,
        api_key="k",
    )
    app = create_app(settings, load_backend("random:tiny", device="cpu"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/ready").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(10)


def one_by_one(url: str, photos: list[bytes], **fields: Any) -> np.ndarray:
    rows = []
    for photo in photos:
        response = httpx.post(
            f"{url}/v1/embeddings",
            json={"images": [base64.b64encode(photo).decode()], **fields},
            headers={"Authorization": "Bearer k"},
        )
        rows.append(response.json()["embeddings"][0])
    return np.asarray(rows, np.float32)


def test_embeds_long_lists_within_the_server_limit_in_order(
    server: str, photos: list[bytes]
) -> None:
    with EmbeddingClient(server, api_key="k") as client:
        vectors = client.embed_images(photos)
        assert client.max_batch == MAX_IMAGES  # learnt from /info
    assert vectors.dtype == np.float32
    assert vectors.shape == (len(photos), 32)
    np.testing.assert_allclose(vectors, one_by_one(server, photos), atol=1e-5)


def test_accepts_bytes_base64_strings_and_paths(
    server: str, photos: list[bytes], tmp_path: Path
) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(photos[2])
    inputs = [photos[2], base64.b64encode(photos[2]).decode(), path]
    with EmbeddingClient(server, api_key="k", encoding="float") as client:
        vectors = client.embed_images(inputs, pooling="cls_mean", normalize=False)
    assert vectors.shape == (3, 64)
    np.testing.assert_allclose(vectors[1:], vectors[[0, 0]], atol=1e-6)


def test_splits_by_bytes_as_well_as_by_count(server: str, photos: list[bytes]) -> None:
    with EmbeddingClient(server, api_key="k") as client:
        client.embed_images(photos[:1])  # learn the limits
        client.max_bytes = 2 * max(len(p) for p in photos)  # room for ~1 photo per request
        chunks = list(client._chunks([base64.b64encode(p).decode() for p in photos]))
        assert len(chunks) > len(photos) // MAX_IMAGES + 1
        assert [offset for offset, _ in chunks] == sorted({offset for offset, _ in chunks})
        vectors = client.embed_images(photos)
    np.testing.assert_allclose(vectors, one_by_one(server, photos), atol=1e-5)


def test_errors_carry_the_type_and_the_index_in_the_callers_list(
    server: str, photos: list[bytes]
) -> None:
    images: list[bytes] = [*photos[:6], b"not an image", photos[0]]
    with (
        EmbeddingClient(server, api_key="k") as client,
        pytest.raises(EmbeddingServiceError) as caught,
    ):
        client.embed_images(images)
    error = caught.value
    assert (error.status, error.type, error.index) == (422, "invalid_image", 6)
    assert "6" in error.message


def test_wrong_api_key_is_not_retried(server: str, photos: list[bytes]) -> None:
    with (
        EmbeddingClient(server, api_key="wrong") as client,
        pytest.raises(EmbeddingServiceError) as caught,
    ):
        client.embed_images(photos[:1])
    assert (caught.value.status, caught.value.type) == (401, "unauthorized")


def test_async_client_sends_chunks_concurrently_and_keeps_order(
    server: str, photos: list[bytes]
) -> None:
    async def main() -> np.ndarray:
        async with AsyncEmbeddingClient(server, api_key="k", concurrency=3) as client:
            return await client.embed_images(photos * 2)

    vectors = asyncio.run(main())
    expected = one_by_one(server, photos)
    np.testing.assert_allclose(vectors, np.concatenate([expected, expected]), atol=1e-5)


# --- retries, with a scripted transport ----------------------------------------------


INFO = {"max_images_per_request": 8, "max_request_bytes": 1 << 20}


def ok(n: int) -> httpx.Response:
    vector = base64.b64encode(np.ones(3, "<f4").tobytes()).decode()
    body = {"model": "m", "dim": 3, "pooling": "cls", "normalized": True, "encoding": "base64"}
    return httpx.Response(200, json={**body, "embeddings": [vector] * n})


def error(status: int, kind: str, **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"type": kind, "message": kind}}, headers=headers)


def scripted(*answers: httpx.Response | Exception) -> tuple[httpx.MockTransport, list[float]]:
    """Answers /v1/embeddings with ``answers`` in turn; records when each call came."""
    pending = list(answers)
    calls: list[float] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/info":
            return httpx.Response(200, json=INFO)
        calls.append(time.monotonic())
        answer = pending.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.MockTransport(handle), calls


def test_retries_429_after_retry_after_then_503_and_connection_errors() -> None:
    transport, calls = scripted(
        error(429, "overloaded", **{"Retry-After": "1"}),
        error(503, "not_ready"),
        httpx.ConnectError("refused"),
        ok(2),
    )
    client = EmbeddingClient("http://test", transport=transport, max_wait=2)
    vectors = client.embed_images([b"a", b"b"])
    assert vectors.shape == (2, 3)
    assert len(calls) == 4
    assert calls[1] - calls[0] >= 0.95  # honoured Retry-After


def test_gives_up_after_the_configured_retries() -> None:
    transport, calls = scripted(*[error(503, "not_ready")] * 3)
    client = EmbeddingClient("http://test", transport=transport, retries=2, max_wait=0.01)
    with pytest.raises(EmbeddingServiceError) as caught:
        client.embed_images([b"a"])
    assert (caught.value.status, caught.value.type) == (503, "not_ready")
    assert len(calls) == 3


def test_async_client_retries_too() -> None:
    transport, calls = scripted(error(429, "overloaded", **{"Retry-After": "0"}), ok(1))

    async def main() -> np.ndarray:
        async with AsyncEmbeddingClient("http://test", transport=transport) as client:
            return await client.embed_images([b"a"])

    assert asyncio.run(main()).shape == (1, 3)
    assert len(calls) == 2


def test_empty_input_is_refused_locally() -> None:
    with pytest.raises(ValueError):
        EmbeddingClient("http://test").embed_images([])
