"""Real service processes for tests: start, wait until ready, kill, restart."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(
    base_url: str, timeout: float = 60.0, process: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode}")
        try:
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{base_url} not ready after {timeout} s")


def stop_postmaster(pgdata: Path, timeout: float = 30.0) -> int | None:
    """Stop the embedded PostgreSQL a clustering service left running in ``pgdata``
    (fast shutdown); returns the pid it had, None when none ran.

    Waits for that process to exit, not for ``postmaster.pid`` to go: a running
    service starts its embedded PostgreSQL again within seconds
    (``EMBEDDED_WATCH_SECONDS``) and writes a new pid file, which raced the file
    check (the restart test failed once that way in CI).
    """
    pid_file = pgdata / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
    except (FileNotFoundError, ValueError, IndexError, ProcessLookupError):
        return None
    deadline = time.monotonic() + timeout
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return pid


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state != "Z"


class ServiceProcess:
    """``python -m <module> [args]`` in a subprocess with its output in a file.

    Environment variables starting with ``env_prefix`` are taken from ``env``
    only, so the developer's own settings never leak into a test.
    """

    def __init__(
        self,
        module: str,
        *args: str,
        env: dict[str, str] | None = None,
        env_prefix: str = "",
        port: int | None = None,
        listen: bool = True,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        listen_args = ["--host", "127.0.0.1", "--port", str(self.port)] if listen else []
        self.args = [sys.executable, "-m", module, *args, *listen_args]
        inherited = {
            k: v for k, v in os.environ.items() if not env_prefix or not k.startswith(env_prefix)
        }
        self.env = {**inherited, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log")  # noqa: SIM115
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        self.process = subprocess.Popen(
            self.args, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )
        return self

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> ServiceProcess:
        try:
            wait_ready(self.url, timeout, self.process)
        except (RuntimeError, TimeoutError) as exc:
            output = self.output()
            self.stop()
            raise AssertionError(f"{exc}; server output:\n{output[-8000:]}") from None
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as a crash or the OOM killer would."""
        if self.running():
            assert self.process is not None
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.running():
            assert self.process is not None
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def close(self) -> None:
        self.stop()
        self.log.close()


def tiny_embedding_service(env: dict[str, str] | None = None, **kwargs: Any) -> ServiceProcess:
    """The embedding service on a tiny random-weight DINOv2 (32-d vectors), batches of
    4, one thread: what every test that needs a real embedding service runs (not
    started; ``env`` adds settings)."""
    return ServiceProcess(
        "embedding_service",
        "--model",
        "random:tiny",
        "--batch-size",
        "4",
        env_prefix="EMBEDDING_",
        env={"EMBEDDING_NUM_THREADS": "1", "EMBEDDING_PREPROCESS_WORKERS": "1", **(env or {})},
        **kwargs,
    )


def private_dir(prefix: str = "dinocluster-test-") -> Path:
    """A fresh directory OUTSIDE pytest's temporary root, for an embedded PostgreSQL.

    Its server runs as another user (pgserver's, when tests run as root) that must
    traverse the path; every pytest session resets its own root to mode 0700, which
    cut off the servers of any other test session running on the same machine.
    """
    return Path(tempfile.mkdtemp(prefix=prefix))
