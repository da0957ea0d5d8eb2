"""Property-based fuzzing of both services' OpenAPI documents (Schemathesis) against
real processes: the embedding service on ``random:tiny`` weights and a clustering
service of its own on an embedded PostgreSQL, seeded with a dataset, a model with
two versions, an alias and finished jobs.

Every operation of both documents gets Schemathesis' examples, coverage (boundary
and negative values), fuzzing (positive and negative data, NUL characters
included) and stateful phases, with the checks: no 5xx, status code, content
type, response headers and body all as documented. The number of examples per
operation is ``DINOCLUSTER_FUZZ_EXAMPLES`` (default 5: 30-60 s for both on two cores), the
seed ``DINOCLUSTER_FUZZ_SEED`` (default 0, ``random`` for a fresh one); longer
runs: ``bench/api_fuzz.py``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.api_fuzz import FuzzResult, run_schemathesis, seed_clustering
from tests.support.clustering import Clustering
from tests.support.processes import private_dir, stop_postmaster

EXAMPLES = int(os.environ.get("DINOCLUSTER_FUZZ_EXAMPLES", "5"))
_SEED = os.environ.get("DINOCLUSTER_FUZZ_SEED", "0")
SEED = None if _SEED == "random" else int(_SEED)


def _check(result: FuzzResult) -> None:
    print(result.summary())
    assert result.cases > 0, result.output[-6000:]
    assert result.passed, f"{result.summary()}: {result.failures}\n{result.output[-12000:]}"


@pytest.mark.slow
def test_embedding_service_conforms_to_its_schema(embedding_service, tmp_path: Path) -> None:
    result = run_schemathesis(
        "embedding", embedding_service.url, tmp_path, max_examples=EXAMPLES, seed=SEED
    )
    _check(result)


@pytest.fixture(scope="module")
def seeded(embedding_service) -> Iterator[tuple[Clustering, dict[str, list[Any]]]]:
    """A clustering service of its own (embedded PostgreSQL: the fuzzer fills it with
    junk) with the seeded dataset, model, alias and jobs."""
    data_dir = private_dir()
    service = Clustering(embedding_service.url, data_dir=data_dir)
    try:
        service.start().wait_ready(120)
        yield service, seed_clustering(service.client)
    finally:
        service.close()
        stop_postmaster(data_dir / "postgres")
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.mark.slow
def test_clustering_service_conforms_to_its_schema(seeded, tmp_path: Path) -> None:
    service, known = seeded
    result = run_schemathesis(
        "clustering", service.url, tmp_path, max_examples=EXAMPLES, seed=SEED, known=known
    )
    _check(result)
    # every request was answered without the service logging a crash
    assert "Traceback" not in service.output(), service.output()[-6000:]


# What the fuzzer found, pinned (each was a 500 before).


def test_versions_beyond_the_database_range_are_not_found(seeded) -> None:
    """Version numbers past the 4-byte column overflowed in PostgreSQL."""
    service, known = seeded
    name = known["name"][0]
    for path in (f"versions/{2**31}", f"versions/{10**15}/clusters", "versions/99999999999"):
        r = service.client.get(f"/v1/models/{name}/{path}")
        assert r.status_code == 404, r.text
        assert r.json()["error"]["resource"] == "version"
    r = service.client.get(f"/v1/models/{name}/versions/2/transitions?from_version={2**40}")
    assert r.status_code == 404, r.text
    r = service.client.put(f"/v1/models/{name}/aliases/a", json={"version": 2**40})
    assert r.status_code == 404, r.text
    r = service.client.post(
        f"/v1/models/{name}/predict?version={2**40}", json={"embeddings": [[0.0] * 32]}
    )
    assert r.status_code == 404, r.text
    r = service.client.post(f"/v1/models/{name}/update", json={"from_version": 2**40})
    assert r.status_code == 404, r.text


@pytest.mark.parametrize(
    "method, path, field",
    [
        ("GET", "/v1/datasets/a%00b", "dataset_id"),
        ("GET", "/v1/datasets/{dataset_id}/items/v%000", "item_id"),
        ("GET", "/v1/models/a%00", "name"),
        ("GET", "/v1/jobs/job%00", "job_id"),
        ("GET", "/v1/jobs?model_name=%00", "model_name"),
    ],
)
def test_nul_in_path_or_query_is_invalid(seeded, method: str, path: str, field: str) -> None:
    """PostgreSQL text cannot hold NUL: the lookups failed in the database."""
    service, known = seeded
    r = service.client.request(method, path.format(dataset_id=known["dataset_id"][0]))
    assert r.status_code == 422, r.text
    assert r.json()["error"] == {
        "type": "invalid_request",
        "message": f"{field}: must not contain NUL characters",
        "field": field,
    }


def test_nul_in_stored_text_is_invalid(seeded) -> None:
    service, known = seeded
    dataset_id = known["dataset_id"][0]
    item = {"id": "nul-label", "embedding": [0.0] * 32, "label": "a\x00b"}
    r = service.client.post(f"/v1/datasets/{dataset_id}/items", json={"items": [item]})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "items[0].label"
    train = {"type": "train", "dataset_id": "x\x00", "algorithm": "kmeans", "model_name": "m"}
    r = service.client.post("/v1/jobs", json=train)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "dataset_id"


def test_update_of_an_invalid_model_name_is_invalid(seeded) -> None:
    """The name in the path went into a request model unchecked."""
    service, _ = seeded
    r = service.client.post("/v1/models/__main__/update", json={})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "path.name"


def test_a_body_that_is_not_utf8_is_invalid(seeded) -> None:
    """FastAPI answered its own 400 for routes that parse their body with it."""
    service, known = seeded
    headers = {"content-type": "application/json"}
    dataset_id = known["dataset_id"][0]
    for method, path in (
        ("POST", "/v1/datasets"),
        ("POST", f"/v1/datasets/{dataset_id}/items/lookup"),
        ("DELETE", f"/v1/datasets/{dataset_id}/items"),
    ):
        r = service.client.request(method, path, content=b"\xff\xfe{", headers=headers)
        assert r.status_code == 422, (path, r.text)
        assert r.json()["error"]["type"] == "invalid_request"
        assert r.json()["error"]["field"] == "body"


def test_documents_resolve_and_use_the_error_body(embedding_service, seeded) -> None:
    """Nested request models were referenced as ``#/$defs/...`` (unresolvable in an
    OpenAPI document), and FastAPI's ``detail`` 422 body was documented."""
    service, _ = seeded
    for url in (embedding_service.url, service.url):
        text = httpx.get(f"{url}/openapi.json").text
        assert "#/$defs/" not in text
        assert "HTTPValidationError" not in text
