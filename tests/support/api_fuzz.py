"""Property-based fuzzing of the services' OpenAPI documents with Schemathesis.

:func:`run_schemathesis` runs ``st run`` (Schemathesis' own engine: examples,
coverage, fuzzing and stateful phases, positive and negative data) against a
real running service and reads the number of generated cases and the failures
from its output. :func:`seed_clustering` stores a small world first (a
dataset with vector and image items, a model with two versions, an alias,
finished jobs) so that generated requests also reach existing resources:
their ids are bound to the path, query and body parameters of the same name
for half of the generated values (Schemathesis "dictionaries"), the other
half stays random.

Used by ``tests/test_api_fuzz.py`` (bounded, in CI) and ``bench/api_fuzz.py``
(longer runs).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.support.clustering import vector_items

#: every check that compares a response with the document
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)
PHASES = ("examples", "coverage", "fuzzing", "stateful")

#: a 32 x 32 PNG (the embedding service refuses images under 16 px)
PNG_32 = (
    "iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAIAAAD8GO2jAAAAKklEQVR42u3NMQEAAAQAMATRP4pYSvBtBZbTHZ8qngkE"
    "AoFAIBAIBIIrC+AFAUQz669uAAAAAElFTkSuQmCC"
)
ALIAS = "production"


@dataclass
class FuzzResult:
    """One ``st run``: exit status, what it printed, and the counts read from it."""

    service: str
    returncode: int
    output: str
    seconds: float
    cases: int = 0
    scenarios: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.failures

    def summary(self) -> str:
        state = "passed" if self.passed else f"FAILED ({len(self.failures)} operations)"
        return (
            f"{self.service}: {self.cases} cases + {self.scenarios} stateful scenarios "
            f"in {self.seconds:.0f} s, {state}"
        )


def seed_clustering(client: httpx.Client, timeout: float = 120.0) -> dict[str, list[Any]]:
    """A dataset (30 vectors and 2 images), a model with v1 (k-means) and v2 (its
    update), alias ``production`` -> 1. Returns the known values per parameter."""
    suffix = uuid.uuid4().hex[:8]
    model = f"fuzz-{suffix}"
    r = client.post("/v1/datasets", json={"name": f"fuzz-data-{suffix}"})
    r.raise_for_status()
    dataset_id = r.json()["id"]
    X = np.random.default_rng(0).normal(size=(30, 32)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    items = vector_items(X, prefix="v", labels=np.arange(30) % 3)
    items += [{"id": f"img/{i}.png", "image": PNG_32} for i in range(2)]
    client.post(f"/v1/datasets/{dataset_id}/items", json={"items": items}).raise_for_status()

    jobs = []
    train = {
        "type": "train",
        "dataset_id": dataset_id,
        "algorithm": "kmeans",
        "model_name": model,
        "n_clusters": 3,
        "params": {"n_init": 1},
    }
    for request in (
        lambda: client.post("/v1/jobs", json=train),
        lambda: client.post(f"/v1/models/{model}/update", json={}),
    ):
        r = request()
        r.raise_for_status()
        jobs.append(_wait_job(client, r.json()["id"], timeout))
    r = client.put(f"/v1/models/{model}/aliases/{ALIAS}", json={"version": 1})
    r.raise_for_status()
    return {
        "dataset_id": [dataset_id],
        "item_id": ["v0", "v1", "img/0.png"],
        "job_id": jobs,
        "name": [model],
        "model_name": [model],
        "version": [1, 2],
        "from_version": [1],
        "alias": [ALIAS],
    }


def _wait_job(client: httpx.Client, job_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] == "succeeded":
            return job_id
        if job["state"] in ("failed", "cancelled"):
            raise AssertionError(f"seeding job {job_id} ended {job['state']}: {job}")
        time.sleep(0.1)
    raise AssertionError(f"seeding job {job_id} unfinished after {timeout} s")


# parameter -> locations it appears in across the clustering service's operations
_LOCATIONS = {
    "dataset_id": ("path", "body"),
    "item_id": ("path",),
    "job_id": ("path",),
    "name": ("path",),
    "model_name": ("query", "body"),
    "version": ("path", "query"),
    "from_version": ("query", "body"),
    "alias": ("path", "query"),
}


def config_toml(known: dict[str, list[Any]] | None, probability: float = 0.5) -> str:
    """A ``schemathesis.toml`` binding each known value to its parameters."""
    lines = ['generation.database = "none"', "generation.allow-x00 = true", ""]
    for name, values in (known or {}).items():
        lines += [f"[dictionaries.{name}]", f"values = {json.dumps(values)}", ""]
    if known:
        lines.append("[parameters]")
        for name in known:
            for location in _LOCATIONS.get(name, ("path",)):
                binding = f'{{ dictionary = "{name}", probability = {probability} }}'
                lines.append(f'"{location}.{name}" = {binding}')
    return "\n".join(lines) + "\n"


def run_schemathesis(
    service: str,
    base_url: str,
    workdir: Path,
    *,
    max_examples: int,
    seed: int | None,
    known: dict[str, list[Any]] | None = None,
    phases: tuple[str, ...] = PHASES,
    timeout: float = 600.0,
) -> FuzzResult:
    """``st run`` of ``base_url/openapi.json`` with every conformance check."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "schemathesis.toml"
    config.write_text(config_toml(known))
    args = [
        *(sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color"),
        *("run", f"{base_url}/openapi.json", "--checks", ",".join(CHECKS)),
        *("--phases", ",".join(phases), "--max-examples", str(max_examples)),
        *("--workers", "1", "--request-timeout", "60", "--mode", "all"),
        *("--suppress-health-check", "all", "--warnings", "off"),
        *(("--seed", str(seed)) if seed is not None else ()),
    ]
    started = time.monotonic()
    proc = subprocess.run(
        args, cwd=workdir, capture_output=True, text=True, timeout=timeout, check=False
    )
    output = proc.stdout + proc.stderr
    result = FuzzResult(service, proc.returncode, output, time.monotonic() - started)
    if m := re.search(r"(\d+) generated", output):
        result.cases = int(m.group(1))
    result.scenarios = sum(int(n) for n in re.findall(r"Scenarios:\s+(\d+)", output))
    result.failures = re.findall(r"^_{3,} (.+?) _{3,}$", output, flags=re.MULTILINE)
    return result
