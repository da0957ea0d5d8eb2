"""The container stack for real: build Dockerfile.cpu, ``docker-compose up`` the
default services of docker-compose.yml, run the demo flow against them from
this machine, ``docker-compose down -v``.

Needs a Docker engine and Debian's ``docker-compose`` (1.29) or Compose v2.
No image registry is reachable on the machines this runs on, so the image is
built on a local stand-in for the official Python base image
(``../shared/tools/docker-test-base.sh`` makes ``dinocluster-test-base:py311``:
Debian bookworm's Python 3.11 and the CPU torch wheel in /wheels); the
Dockerfile is the one users build, with ``BASE_IMAGE`` pointed at the stand-in
and ``TORCH_INDEX_URL`` empty (plain pip). ``.ci/run`` installs Docker, starts
it, builds the stand-in and the image before ``make test`` (the build is then
a cache hit here); where it could not, this module skips with a warning
saying why, and fails instead with ``DINOCLUSTER_REQUIRE_DOCKER=1`` (which
``.ci/run`` sets once Docker is up).

Settings (environment): ``DINOCLUSTER_TEST_BASE_IMAGE`` (default
``dinocluster-test-base:py311``; ``python:3.11-slim-bookworm`` where a
registry is reachable), ``DINOCLUSTER_TEST_TORCH_INDEX_URL`` (default empty),
``DINOCLUSTER_TEST_IMAGE`` (default ``dinocluster-test:cpu``, so that a user's
``dinocluster:cpu`` is left alone).

The scale profile (PostgreSQL + workers) and the GPU override are checked
with ``docker-compose config`` and hadolint in tests/test_deployment.py: their
images (postgres:16, nvidia/cuda) cannot be pulled here.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support.clustering import vector_items
from tests.support.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = os.environ.get("DINOCLUSTER_TEST_BASE_IMAGE", "dinocluster-test-base:py311")
TORCH_INDEX_URL = os.environ.get("DINOCLUSTER_TEST_TORCH_INDEX_URL", "")
IMAGE = os.environ.get("DINOCLUSTER_TEST_IMAGE", "dinocluster-test:cpu")
REQUIRED = os.environ.get("DINOCLUSTER_REQUIRE_DOCKER") == "1"
HEALTHY_TIMEOUT = 240.0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def _unavailable(reason: str) -> None:
    """Skip loudly (a warning in the summary, not only an 's'), or fail when required."""
    message = f"CONTAINER TEST NOT RUN: {reason}"
    if REQUIRED:
        pytest.fail(message + " (DINOCLUSTER_REQUIRE_DOCKER=1 requires it)")
    warnings.warn(message, stacklevel=2)
    print(f"\n*** {message} ***")
    pytest.skip(message)


def compose_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything the compose file reads (a
    developer's EMBEDDING_*/CLUSTERING_* settings must not reach the test stack)."""
    prefixes = ("EMBEDDING_", "CLUSTERING_", "HF_", "COMPOSE_", "POSTGRES_", "DINOCLUSTER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(
        BASE_IMAGE=BASE_IMAGE,
        TORCH_INDEX_URL=TORCH_INDEX_URL,
        DINOCLUSTER_IMAGE=IMAGE,
        **extra,
    )
    return env


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


@dataclass
class Stack:
    project: str
    env: dict[str, str]
    compose: list[str]
    embedding_url: str
    clustering_url: str
    timings: dict[str, float]

    def run(self, *args: str, timeout: float = 600, check: bool = True) -> str:
        cmd = [*self.compose, "-p", self.project, "-f", str(ROOT / "docker-compose.yml"), *args]
        result = subprocess.run(
            cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
                f"\n--- logs ---\n{self.logs()}"
            )
        return result.stdout + result.stderr

    def container(self, service: str) -> str:
        return self.run("ps", "-q", service).split()[0]

    def health(self, service: str) -> str:
        result = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.Health.Status}}", self.container(service)],
            capture_output=True,
            text=True,
            check=False,
        )
        return result.stdout.strip()

    def wait_healthy(self, *services: str, timeout: float = HEALTHY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        for service in services:
            while (status := self.health(service)) != "healthy":
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"{service} is {status!r}, not healthy, after {timeout:.0f} s\n"
                        f"--- logs ---\n{self.logs()}"
                    )
                time.sleep(1)

    def logs(self) -> str:
        cmd = [*self.compose, "-p", self.project, "-f", str(ROOT / "docker-compose.yml")]
        result = subprocess.run(
            [*cmd, "logs", "--no-color", "--tail=80"],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        return result.stdout[-12000:]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    compose = compose_command()
    if compose is None:
        _unavailable("neither docker-compose nor `docker compose` is installed")
    assert compose is not None
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, check=False)
    if info.returncode != 0:
        _unavailable(f"no Docker engine answers (`docker info`: {info.stderr.strip()[-300:]})")
    probe = subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True)
    if probe.returncode != 0:
        _unavailable(
            f"base image {BASE_IMAGE} is missing: build it with "
            "../shared/tools/docker-test-base.sh (no image registry to pull from)"
        )

    embedding_port, clustering_port = free_port(), free_port()
    stack = Stack(
        project=f"dinocluster-test-{uuid.uuid4().hex[:8]}",
        env=compose_env(
            EMBEDDING_MODEL="random:tiny",
            HF_HUB_OFFLINE="1",
            DINOCLUSTER_BIND="127.0.0.1",
            EMBEDDING_PORT=str(embedding_port),
            CLUSTERING_PORT=str(clustering_port),
            # not ./models: Docker would create it in the checkout
            EMBEDDING_MODELS_DIR=str(tmp_path_factory.mktemp("models")),
            # small and quick: the test machines have two cores
            EMBEDDING_NUM_THREADS="1",
            EMBEDDING_BATCH_SIZE="4",
        ),
        compose=compose,
        embedding_url=f"http://127.0.0.1:{embedding_port}",
        clustering_url=f"http://127.0.0.1:{clustering_port}",
        timings={},
    )
    started = time.monotonic()
    # the compose file's own build (Dockerfile.cpu with BASE_IMAGE/TORCH_INDEX_URL)
    stack.run("build", "embedding", timeout=2400)
    stack.timings["build"] = time.monotonic() - started
    try:
        started = time.monotonic()
        stack.run("up", "-d", "--no-build", timeout=600)
        stack.wait_healthy("embedding", "clustering")
        stack.timings["up_to_healthy"] = time.monotonic() - started
        print(f"\ncontainer stack timings (s): {stack.timings}")
        yield stack
    finally:
        stack.run("down", "-v", "--remove-orphans", timeout=300, check=False)


def _photos() -> list[tuple[str, bytes]]:
    """Real photographs, as JPEG: scikit-learn's two sample images and three of
    scikit-image's."""
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_images

    sklearn_photos = load_sample_images()
    arrays = [
        *zip(["china.jpg", "flower.jpg"], sklearn_photos.images, strict=True),
        ("astronaut.jpg", data.astronaut()),
        ("coffee.jpg", data.coffee()),
        ("chelsea.jpg", data.chelsea()),
    ]
    photos = []
    for name, array in arrays:
        buf = io.BytesIO()
        Image.fromarray(array).convert("RGB").save(buf, "JPEG", quality=90)
        photos.append((name, buf.getvalue()))
    return photos


def _digits(n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    keep = np.flatnonzero(y < 5)[:n]
    X = X[keep].astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X, y[keep]


def _wait_job(client: httpx.Client, job_id: str, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not finished after {timeout} s: {job}")


def test_containers_run_as_non_root_without_compilers(stack: Stack) -> None:
    for service in ("embedding", "clustering"):
        uid = stack.run("exec", "-T", service, "id", "-u").strip()
        assert uid == "10001", f"{service} runs as uid {uid}"
    find_tools = "for c in gcc cc g++ c++ make; do command -v $c; done; true"
    out = stack.run("exec", "-T", "clustering", "sh", "-c", find_tools)
    assert out.strip() == "", f"build tools in the image: {out}"
    # the clustering container's command is the tests' own, through the entry point
    top = stack.run("top", "clustering")
    assert "python -m clustering_service --host 0.0.0.0 --port 8002" in top, top


def test_demo_flow(stack: Stack) -> None:
    """The README's session, from this machine against the published ports."""
    started = time.monotonic()
    assert httpx.get(f"{stack.embedding_url}/ready", timeout=10).status_code == 200
    info = httpx.get(f"{stack.embedding_url}/info", timeout=10).json()
    assert info["random_weights"] is True

    with httpx.Client(base_url=stack.clustering_url, timeout=120) as client:
        assert client.get("/ready").status_code == 200

        # real photographs, embedded by the embedding container
        photos = _photos()
        r = client.post("/v1/datasets", json={"name": "photos"})
        assert r.status_code == 201, r.text
        photos_id = r.json()["id"]
        items = [{"id": name, "image": base64.b64encode(jpeg).decode()} for name, jpeg in photos]
        r = client.post(f"/v1/datasets/{photos_id}/items", json={"items": items})
        assert r.status_code == 200, r.text
        assert r.json()["added"] == len(photos)
        dataset = client.get(f"/v1/datasets/{photos_id}").json()
        assert dataset["count"] == len(photos)
        assert dataset["dim"] == info["dim"]

        # vectors: a clustering model trained by the in-process worker
        X, y = _digits()
        r = client.post("/v1/datasets", json={"name": "digits"})
        digits_id = r.json()["id"]
        r = client.post(
            f"/v1/datasets/{digits_id}/items", json={"items": vector_items(X, "d", labels=y)}
        )
        assert r.status_code == 200, r.text
        assert r.json()["count"] == len(X)
        r = client.post(
            "/v1/jobs",
            json={
                "type": "train",
                "dataset_id": digits_id,
                "algorithm": "kmeans",
                "n_clusters": 5,
                "model_name": "demo",
            },
        )
        assert r.status_code == 202, r.text
        job = _wait_job(client, r.json()["id"])
        assert job["state"] == "succeeded", job
        assert job["result"]["model_name"] == "demo"
        version = job["result"]["version"]

        assigned: dict[str, int] = {}
        cursor = None
        while True:
            params: dict[str, str | int] = {"limit": 100, **({"cursor": cursor} if cursor else {})}
            page = client.get(
                f"/v1/models/demo/versions/{version}/assignments", params=params
            ).json()
            assigned.update({a["item_id"]: a["cluster"] for a in page["items"]})
            if not (cursor := page.get("next_cursor")):
                break
        assert len(assigned) == len(X)
        assert len(set(assigned.values())) == 5

        r = client.post("/v1/models/demo/predict", json={"embeddings": X[:20].tolist()})
        assert r.status_code == 200, r.text
        predicted = [p["cluster"] for p in r.json()["predictions"]]
        assert predicted == [assigned[f"d{i}"] for i in range(20)]
    stack.timings["demo_flow"] = time.monotonic() - started
    print(f"\ncontainer stack timings (s): {stack.timings}")


def test_clustering_data_survive_a_restart(stack: Stack) -> None:
    """The embedded PostgreSQL lives in the clustering-data volume and is stopped
    cleanly with its container (docker/entrypoint.sh): a restarted container finds
    the model trained before (run after test_demo_flow)."""
    stack.run("restart", "clustering", timeout=180)
    stack.wait_healthy("clustering")
    logs = stack.run("logs", "--no-color", "clustering")
    assert "left by a container that was killed" not in logs, logs[-4000:]
    model = httpx.get(f"{stack.clustering_url}/v1/models/demo", timeout=30)
    assert model.status_code == 200, model.text


def test_embedding_serves_a_mounted_local_model_offline(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The README's offline recipe: save_pretrained weights in a host directory,
    mounted at /models, EMBEDDING_MODEL=/models/<dir>, HF_HUB_OFFLINE=1, and no
    network at all (--network none): the image serves them as its non-root user."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    models = tmp_path_factory.mktemp("offline-models")
    models.chmod(0o755)  # readable by the container's user (uid 10001)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(models / "tiny-dinov2")
    for path in models.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)

    name = f"{stack.project}-offline"
    subprocess.run(
        ["docker", "run", "-d", "--name", name, "--network", "none",
         "-v", f"{models}:/models:ro",
         "-e", "EMBEDDING_MODEL=/models/tiny-dinov2", "-e", "HF_HUB_OFFLINE=1",
         "-e", "EMBEDDING_NUM_THREADS=1", IMAGE],
        check=True, capture_output=True, env=stack.env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + HEALTHY_TIMEOUT
        while True:
            inspect = subprocess.run(
                ["docker", "inspect", "-f", "{{.State.Status}} {{.State.Health.Status}}", name],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True)
            assert inspect[0] == "running", logs.stdout + logs.stderr
            if inspect[1] == "healthy":
                break
            assert time.monotonic() < deadline, logs.stdout + logs.stderr
            time.sleep(1)
        info = subprocess.run(
            ["docker", "exec", name, "python", "-c",
             "import urllib.request; print(urllib.request.urlopen("
             "'http://127.0.0.1:8001/info', timeout=5).read().decode())"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert '"random_weights":false' in info.replace(" ", ""), info
        assert '"dim":32' in info.replace(" ", ""), info
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
