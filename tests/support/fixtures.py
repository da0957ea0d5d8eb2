"""Real processes for the clustering service's HTTP tests, shared by every test
package (loaded as a plugin by tests/conftest.py, so the session-wide services
start once however many packages use them).

* the embedding service (``python -m embedding_service --model random:tiny``),
  once per session;
* PostgreSQL two ways: the embedded one (pgserver, in a private directory)
  and the machine's server at 127.0.0.1:5432 (a fresh database per test).
  The second must be there in CI (``DINOCLUSTER_REQUIRE_LOCAL_PG=1``, set by
  .ci/run): the tests fail without it instead of skipping;
* ``python -m clustering_service`` (and ``... worker``) processes, started per
  test or shared, on short worker timeouts so crash recovery takes seconds.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from tests.support.clustering import Clustering
from tests.support.processes import (
    ServiceProcess,
    private_dir,
    stop_postmaster,
    tiny_embedding_service,
)

LOCAL_PG = os.environ.get("DINOCLUSTER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def embedding_service() -> Iterator[ServiceProcess]:
    """The real embedding service on a tiny random-weight DINOv2 (32-d vectors)."""
    process = tiny_embedding_service()
    process.start().wait_ready(120)
    yield process
    process.close()


@pytest.fixture(scope="session")
def embedded_data_dir() -> Iterator[Path]:
    """A data directory whose embedded PostgreSQL is stopped after the session."""
    path = private_dir()
    yield path
    stop_postmaster(path / "postgres")
    shutil.rmtree(path, ignore_errors=True)


def _local_pg_available() -> bool:
    try:
        with psycopg.connect(LOCAL_PG, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@pytest.fixture(scope="session")
def local_pg_server() -> str:
    """The URL of the machine's PostgreSQL (skips where there is none, unless required)."""
    if not _local_pg_available():
        message = f"no PostgreSQL at {LOCAL_PG} (set DINOCLUSTER_TEST_PG to point at one)"
        if os.environ.get("DINOCLUSTER_REQUIRE_LOCAL_PG") == "1":
            pytest.fail(message + "; DINOCLUSTER_REQUIRE_LOCAL_PG=1 requires it")
        pytest.skip(message)
    return LOCAL_PG


def _create_database(server_url: str) -> str:
    name = f"dinocluster_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{server_url.rpartition('/')[0]}/{name}"


def _drop_database(url: str) -> None:
    server, _, name = url.rpartition("/")
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class ClusteringFactory:
    """Makes :class:`Clustering` processes (unstarted) and databases for one test; at
    the end stops the processes first, then their databases."""

    def __init__(self, embedding_url: str, request: pytest.FixtureRequest):
        self.embedding_url = embedding_url
        self.request = request
        self._data_dir: Path | None = None
        self.made: list[Clustering] = []
        self.databases: list[str] = []

    def __call__(self, **kwargs: Any) -> Clustering:
        if "data_dir" not in kwargs:
            self._data_dir = self._data_dir or private_dir()
            kwargs["data_dir"] = self._data_dir
        process = Clustering(self.embedding_url, **kwargs)
        self.made.append(process)
        return process

    def local_pg(self) -> str:
        """A fresh database on the machine's PostgreSQL (see ``local_pg_server``)."""
        url = _create_database(self.request.getfixturevalue("local_pg_server"))
        self.databases.append(url)
        return url

    def close(self) -> None:
        for process in self.made:
            process.close()
        for data_dir in {process.data_dir for process in self.made}:
            stop_postmaster(data_dir / "postgres")
        for url in self.databases:
            _drop_database(url)
        if self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)


@pytest.fixture
def clustering_factory(
    embedding_service: ServiceProcess, request: pytest.FixtureRequest
) -> Iterator[ClusteringFactory]:
    """``clustering_factory(data_dir=<fresh>, database_url=None, command="serve", env=None)``
    and ``clustering_factory.local_pg()``; everything is stopped after the test."""
    factory = ClusteringFactory(embedding_service.url, request)
    yield factory
    factory.close()


@pytest.fixture(scope="session")
def service(embedding_service: ServiceProcess, embedded_data_dir: Path) -> Iterator[Clustering]:
    """One API (with its in-process worker) on the embedded PostgreSQL, shared by the
    tests that do not restart or kill it."""
    process = Clustering(embedding_service.url, data_dir=embedded_data_dir)
    process.start().wait_ready(120)
    yield process
    process.close()


@pytest.fixture(scope="session")
def digits_vectors() -> tuple[np.ndarray, np.ndarray]:
    """300 digits (classes 0-4), L2-normalised like embeddings: X float32 (300, 64), y."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    keep = np.flatnonzero(y < 5)
    rows = np.sort(np.random.default_rng(0).choice(keep, 300, replace=False))
    X = X[rows].astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X, y[rows]
