"""Faults made with real processes and real file systems, for the reliability tests.

* :class:`PostgresCluster`: a throwaway PostgreSQL 15 server (the machine's
  binaries, ``initdb`` + ``pg_ctl`` in a private directory, its own port), so a
  test can restart "the local server" without touching the one other people use;
* :func:`restart_embedded`: a fast shutdown and a new start of a service's
  embedded PostgreSQL, as an operator (or a crash and a supervisor) would do;
* :func:`tmpfs` and :func:`fill`: a small file system that is then filled up;
* :class:`Ingester`: a client thread sending batches of vectors and recording
  what was acknowledged and every error answer;
* the checks every fault test makes afterwards: every acknowledged item stored
  (count and ids), a refused request stored whole or not at all, clear errors
  (503 with a type and a message, never a stack trace), ``/ready`` back to 200
  with no manual step.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from shared.clustering_client import ClusteringClient
from tests.support.clustering import Clustering, vector_items
from tests.support.processes import free_port, private_dir, process_alive, stop_postmaster

PG_BIN = Path(os.environ.get("DINOCLUSTER_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


class PostgresCluster:
    """A PostgreSQL server of its own in a private directory, on a free TCP port.

    Run as the ``postgres`` system user when the tests run as root (PostgreSQL
    refuses root). Skips the test where the binaries or that user are missing.
    """

    def __init__(self) -> None:
        if not (PG_BIN / "pg_ctl").exists():
            pytest.skip(f"no PostgreSQL binaries in {PG_BIN} (set DINOCLUSTER_TEST_PG_BIN)")
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no 'postgres' user to run a server")
            self.user = "postgres"
        self.root = private_dir("dinocluster-pg-")
        self.pgdata = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        if self.user is not None:
            shutil.chown(self.root, self.user)
        self._run("initdb", "-D", str(self.pgdata), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        # sockets in the data directory: nothing written to the shared /var/run/postgresql
        with open(self.pgdata / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.pgdata}'\nfsync = off\n"
            )

    def _run(self, tool: str, *args: str) -> None:
        command = [str(PG_BIN / tool), *args]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def _ctl(self, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self.pgdata), "-l", str(self.root / "log"), "-w", *args)

    def start(self) -> PostgresCluster:
        self._ctl("start")
        return self

    def stop(self) -> None:
        self._ctl("-m", "fast", "stop")

    def restart(self, down_seconds: float = 0.0) -> None:
        """``pg_ctl restart -m fast`` (what ``pg_ctlcluster ... restart`` does), with an
        optional pause while the server is down."""
        if down_seconds:
            self.stop()
            time.sleep(down_seconds)
            self.start()
        else:
            self._ctl("-m", "fast", "restart")

    def log(self) -> str:
        path = self.root / "log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def restart_embedded(pgdata: Path, down_seconds: float = 0.0) -> None:
    """Fast shutdown of the embedded PostgreSQL in ``pgdata``, then start it again
    the way the service does (pgserver, same socket, same data)."""
    from pgserver.postgres_server import PostgresServer

    pid = stop_postmaster(pgdata)
    assert pid is not None and not process_alive(pid), "the embedded PostgreSQL did not stop"
    # the service may start it again before down_seconds are over: that is its job
    time.sleep(down_seconds)
    # a new handle (get_server would return this process's cached one) starts it under
    # pgserver's inter-process lock, so it cannot race a service restarting it too
    PostgresServer(pgdata, cleanup_mode=None)


@contextlib.contextmanager
def tmpfs(size: str) -> Iterator[Path]:
    """A fresh tmpfs of ``size`` (``mount -o size=``) in a private directory.

    Skips the test where mounting is not allowed (not root, or a container
    without CAP_SYS_ADMIN); CI runs as root, where it must work.
    """
    path = private_dir("dinocluster-tmpfs-")
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        path.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        with contextlib.suppress(OSError):
            path.rmdir()


def fill(directory: Path, keep_bytes: int = 0) -> Path:
    """Write one file into ``directory`` until its file system is full (leaving about
    ``keep_bytes``); returns the file, whose deletion frees the space again."""
    filler = directory / "filler.bin"
    block = b"\0" * (1 << 16)
    with open(filler, "wb", buffering=0) as f:
        try:
            while shutil.disk_usage(directory).free > keep_bytes + len(block):
                f.write(block)
            if keep_bytes == 0:
                while True:
                    f.write(block[:4096])
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return filler


class Ingester(threading.Thread):
    """Sends batches of ``batch`` random ``dim``-d vectors (or ``make_items(n)``, the
    n-th batch) to a dataset until stopped; keeps the ids of every acknowledged
    batch and every non-200 answer."""

    def __init__(
        self,
        client: httpx.Client,
        dataset: str,
        batch: int = 500,
        dim: int = 32,
        make_items: Callable[[int], list[dict[str, Any]]] | None = None,
    ):
        super().__init__(daemon=True)
        self.client = client
        self.dataset = dataset
        self.batch = batch
        self.dim = dim
        self.make_items = make_items
        self.acknowledged: list[list[str]] = []
        self.refused: list[tuple[list[str], int, dict[str, Any]]] = []
        self.transport_errors: list[tuple[list[str], str]] = []
        self._halt = threading.Event()
        self._rng = np.random.default_rng(0)

    def run(self) -> None:
        n = 0
        while not self._halt.is_set():
            if self.make_items is not None:
                items = self.make_items(n)
            else:
                X = self._rng.standard_normal((self.batch, self.dim)).astype(np.float32)
                items = vector_items(X, f"b{n}-")
            ids = [item["id"] for item in items]
            try:
                r = self.client.post(f"/v1/datasets/{self.dataset}/items", json={"items": items})
            except httpx.TransportError as exc:
                self.transport_errors.append((ids, repr(exc)))
                time.sleep(0.2)
            else:
                if r.status_code == 200:
                    self.acknowledged.append(ids)
                else:
                    body = r.json() if r.headers.get("content-type") == "application/json" else {}
                    self.refused.append((ids, r.status_code, body or {"text": r.text}))
                    time.sleep(0.2)
            n += 1

    def wait_for(self, acknowledged: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acknowledged) < acknowledged:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"only {len(self.acknowledged)} of {acknowledged} batches acknowledged in "
                    f"{timeout} s; refused: {self.refused[-3:]}"
                )
            time.sleep(0.05)

    def finish(self) -> None:
        self._halt.set()
        self.join(60)


#: error types a client may get while a dependency is briefly away
PASSING = {"database_unavailable", "not_ready", "storage_full"}


def check_clear_error(status: int, body: dict[str, Any], types: set[str] = PASSING) -> None:
    """A 503 naming what is wrong, not an internal error or a stack trace."""
    assert status == 503, (status, body)
    error = body.get("error") or {}
    assert error.get("type") in types, body
    message = error.get("message", "")
    assert message and "Traceback" not in message and len(message) < 2000, body


def wait_ready(service: Clustering, timeout: float = 60) -> float:
    """Seconds until ``/ready`` answers 200 (the service recovers on its own)."""
    started = time.monotonic()
    last: Any = None
    while time.monotonic() - started < timeout:
        try:
            r = httpx.get(f"{service.url}/ready", timeout=5)
            if r.status_code == 200:
                return time.monotonic() - started
            last = r.json()
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise AssertionError(
        f"not ready {timeout} s after the fault: {last}\n{service.output()[-4000:]}"
    )


def check_ingest(
    service: Clustering,
    dataset: str,
    ingester: Ingester,
    model: str,
    error_types: set[str] = PASSING,
) -> int:
    """Every acknowledged item is stored (count and ids, read back through the
    assignments of a model trained after the fault); returns the item count."""
    for _ids, status, body in ingester.refused:
        check_clear_error(status, body, error_types)
    assert not ingester.transport_errors, ingester.transport_errors[:3]
    c = service.client
    # a refused request stored nothing, or (its commit went through as the connection
    # broke) everything
    stored_refused = []
    for ids, _status, _body in ingester.refused:
        present = [
            c.get(f"/v1/datasets/{dataset}/items/{i}").status_code for i in (ids[0], ids[-1])
        ]
        assert present in ([200, 200], [404, 404]), present
        if present[0] == 200:
            stored_refused.append(ids)
    expected = {i for ids in ingester.acknowledged + stored_refused for i in ids}
    count = c.get(f"/v1/datasets/{dataset}").json()["count"]
    assert count == len(expected), (count, len(expected))
    job = service.train(dataset, "kmeans", model, n_clusters=3)
    done = service.wait_job(job["id"])
    assert done["state"] == "succeeded", done
    with ClusteringClient(service.url) as client:
        stored = {a.item_id for a in client.assignments(model, done["result"]["version"])}
    assert stored == expected
    return count
