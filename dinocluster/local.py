"""Both services on this machine, as subprocesses: ``dinocluster serve`` and the demo.

The commands are the ones the containers and the tests run
(``python -m embedding_service``, ``python -m clustering_service``); output
goes to ``<data_dir>/logs/``. A model that cannot be loaded makes the
embedding service exit at start-up: :class:`ModelUnavailable` carries its
message (which says how to provide the weights).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx
from rich.console import Console


class ModelUnavailable(RuntimeError):
    """The embedding service could not load its model (no network, no local copy)."""


class LocalServices:
    def __init__(
        self,
        model: str,
        data_dir: Path,
        embedding_port: int = 8001,
        port: int = 8002,
        console: Console | None = None,
    ) -> None:
        self.model = model
        self.data_dir = data_dir
        self.embedding_url = f"http://127.0.0.1:{embedding_port}"
        self.url = f"http://127.0.0.1:{port}"
        self.embedding_port = embedding_port
        self.port = port
        self.console = console or Console(stderr=True)
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs = data_dir / "logs"

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(
            [sys.executable, "-m", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
        self.processes.append(process)
        return process

    def _wait_ready(
        self, name: str, url: str, process: subprocess.Popen[bytes], timeout: float
    ) -> None:
        deadline = time.monotonic() + timeout
        with self.console.status(f"starting the {name} service ({url}) ..."):
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    tail = (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]
                    raise (
                        ModelUnavailable(tail)
                        if name == "embedding"
                        else RuntimeError(f"the {name} service stopped at start-up:\n{tail}")
                    )
                try:
                    if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
        raise RuntimeError(
            f"the {name} service was not ready after {timeout:.0f} s (see {self.logs})"
        )

    def start(self) -> LocalServices:
        embedding = self._start(
            "embedding",
            [
                "embedding_service",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.embedding_port),
                "--model",
                self.model,
            ],
            {},
        )
        self._wait_ready("embedding", self.embedding_url, embedding, timeout=900)
        clustering = self._start(
            "clustering",
            [
                "clustering_service",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
                "--embedding-url",
                self.embedding_url,
            ],
            {},
        )
        self._wait_ready("clustering", self.url, clustering, timeout=300)
        return self

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes.clear()

    def wait_forever(self) -> None:
        """Until Ctrl-C, or until a service stops (then its log tail is shown)."""
        try:
            while all(p.poll() is None for p in self.processes):
                time.sleep(0.5)
            self.console.print(f"[bold red]a service stopped[/]: see {self.logs}")
        except KeyboardInterrupt:
            self.console.print("stopping ...")

    def __enter__(self) -> LocalServices:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
