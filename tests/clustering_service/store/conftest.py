"""A migrated database for the storage tests: a fresh one on the machine's
PostgreSQL when there is one, else the embedded PostgreSQL in a temporary
directory."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine

from clustering_service.db import migrate
from clustering_service.db.engine import make_engine

LOCAL_PG = os.environ.get("DINOCLUSTER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    try:
        with psycopg.connect(LOCAL_PG, autocommit=True, connect_timeout=3) as conn:
            name = f"dinocluster_store_{uuid.uuid4().hex[:10]}"
            conn.execute(f"CREATE DATABASE {name}")
        url = f"{LOCAL_PG.rpartition('/')[0]}/{name}"
        yield url
        with psycopg.connect(LOCAL_PG, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    except psycopg.OperationalError:
        import pgserver

        from tests.support.processes import private_dir

        pgdata = private_dir() / "postgres"
        server = pgserver.get_server(pgdata, cleanup_mode=None)
        yield server.get_uri()
        pid = int((Path(pgdata) / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGINT)


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url, pool_size=2)
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def dataset_id(engine: Engine) -> str:
    from clustering_service.db import datasets

    return datasets.create(engine, f"t-{uuid.uuid4().hex[:8]}")["id"]
