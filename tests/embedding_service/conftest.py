"""Fixtures for the embedding service's HTTP tests: images, backends, servers.

Three ways to serve the app, from cheapest to most real:
``TestClient`` (in process, no sockets), :class:`ThreadedServer` (uvicorn in
a thread on a free port: real HTTP, with an injectable backend) and
:class:`ServerProcess` (``python -m embedding_service`` in a subprocess, as
deployed).
"""

from __future__ import annotations

import base64
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI

from embedding_service.model import EmbeddingBackend, load_backend
from tests.support.processes import ServiceProcess, free_port, wait_ready

# --- images ------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="session")
def photos(
    photo_jpegs: dict[str, bytes],
    photo_arrays: dict[str, np.ndarray],
    encode_image: Callable[..., bytes],
) -> list[bytes]:
    """Eight JPEG photographs (tests/conftest.py) of different sizes and aspect ratios."""
    odd = photo_arrays["coffee"][37:300, 11:402]  # odd sizes: 263 x 391
    return [*photo_jpegs.values(), encode_image(odd)]


@pytest.fixture(scope="session")
def photos_b64(photos: list[bytes]) -> list[str]:
    return [b64(p) for p in photos]


def png_header_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="session")
def bad_images(photos: list[bytes], encode_image: Callable[..., bytes]) -> dict[str, str]:
    """Each kind of broken image, base64-encoded (except the invalid base64)."""
    return {
        "invalid_base64": "this is not base64!!",
        "not_an_image": b64(b"hello, I am a text file and not an image at all"),
        "truncated_jpeg": b64(photos[0][: len(photos[0]) // 3]),
        "one_pixel": b64(encode_image(np.zeros((1, 1, 3), np.uint8), "PNG")),
        "decompression_bomb": b64(png_header_bomb(30_000, 30_000)),
        "empty": "",
    }


# --- backends ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_backend() -> EmbeddingBackend:
    """The real DINOv2 code path with a 2-layer, 32-wide random model (fast on CPU)."""
    return load_backend("random:tiny", device="cpu")


class ControlledBackend:
    """Wraps a backend so tests can hold, fail or kill the model thread.

    ``gate``: while set to an unset Event, every forward waits for it.
    ``fail``: the next forward raises RuntimeError.
    ``kill``: the next forward raises SystemExit, which ends the model thread.
    ``seen``: the first pixel of every image that reached forward, in order.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.info = inner.info
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.fail = False
        self.kill = False
        self.seen: list[np.ndarray] = []
        self.batch_sizes: list[int] = []

    def warmup(self, batch_size: int) -> None:
        self.inner.warmup(batch_size)

    def forward(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.seen.extend(images.copy())
        self.batch_sizes.append(len(images))
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        if self.fail:
            self.fail = False
            raise RuntimeError("injected model failure")
        if self.kill:
            raise SystemExit("injected worker death")
        return self.inner.forward(images)


@pytest.fixture
def controlled(tiny_backend: EmbeddingBackend) -> ControlledBackend:
    return ControlledBackend(tiny_backend)


# --- servers -------------------------------------------------------------------------


class ThreadedServer:
    """uvicorn serving ``app`` from a thread of this process, on a free port."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        wait_ready(self.url, timeout=30)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


class ServerProcess(ServiceProcess):
    """``python -m embedding_service`` in a subprocess, output captured in a file."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__("embedding_service", *args, env=env, env_prefix="EMBEDDING_")

    def stop(self) -> None:
        super().stop()
        self.log.close()


@pytest.fixture
def threaded_server() -> type[ThreadedServer]:
    return ThreadedServer


@pytest.fixture(scope="session")
def server_class() -> type[ServerProcess]:
    return ServerProcess


@pytest.fixture
def server_process() -> Iterator[type[ServerProcess]]:
    """Factory of subprocess servers; every one started is stopped afterwards."""
    started: list[ServerProcess] = []

    class Tracked(ServerProcess):
        def start(self) -> ServerProcess:
            started.append(self)
            return super().start()

    yield Tracked
    for server in started:
        server.stop()
