"""Every input path given bad input: a clear error naming what was wrong, nothing
stored, and the service still healthy afterwards."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest

from tests.support.clustering import Clustering, b64_vector, vector_items


@pytest.fixture(scope="module")
def trained(service: Clustering, digits_vectors: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """A dataset of 100 64-d vectors and a k-means model on it."""
    X, y = digits_vectors
    dataset = service.dataset()
    service.add(dataset, vector_items(X[:100], "x", y[:100]))
    job = service.train(dataset, "kmeans", "bad-input-model", n_clusters=3)
    assert service.wait_job(job["id"])["state"] == "succeeded"
    return {"dataset": dataset, "model": "bad-input-model", "X": X}


def _error(response: Any, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["type"] == error_type, body
    assert body["message"]
    return body


def test_unknown_things_are_404(service: Clustering, trained: dict[str, Any]) -> None:
    c, model = service.client, trained["model"]
    for path in (
        "/v1/datasets/ds_nope",
        "/v1/jobs/job_nope",
        "/v1/models/nope",
        f"/v1/models/{model}/versions/99",
        f"/v1/models/{model}/versions/99/clusters",
        f"/v1/models/{model}/versions/99/assignments",
        f"/v1/datasets/{trained['dataset']}/items/none",
        f"/v1/datasets/{trained['dataset']}/items/x1/thumbnail",
    ):
        _error(c.get(path), 404, "not_found")
    _error(c.post("/v1/jobs/job_nope/cancel"), 404, "not_found")
    _error(
        c.post("/v1/datasets/ds_nope/items", json={"items": [{"id": "a", "embedding": [1.0]}]}),
        404,
        "not_found",
    )
    _error(
        c.post(f"/v1/models/{model}/predict?alias=nope", json={"embeddings": [[0.0] * 64]}),
        404,
        "not_found",
    )
    _error(c.put(f"/v1/models/{model}/aliases/prod", json={"version": 42}), 404, "not_found")
    _error(c.post("/v1/models/nope/update", json={}), 404, "not_found")


def test_vectors_are_checked(service: Clustering, trained: dict[str, Any]) -> None:
    c, dataset = service.client, trained["dataset"]
    before = c.get(f"/v1/datasets/{dataset}").json()["count"]
    url = f"/v1/datasets/{dataset}/items"
    good = {"id": "ok", "embedding": [0.1] * 64}
    cases = [
        ([good, {"id": "b", "embedding": [0.1] * 63}], 422, "dimension_mismatch", 1),
        ([{"id": "b", "embedding": [0.1] * 32}], 422, "dimension_mismatch", None),
        (
            [good, {"id": "b", "embedding": [float("nan")] + [0.0] * 63}],
            422,
            "invalid_embedding",
            1,
        ),
        ([good, {"id": "b", "embedding": "not base64!"}], 422, "invalid_embedding", 1),
        (
            [{"id": "b", "embedding": base64.b64encode(b"abc").decode()}],
            422,
            "invalid_embedding",
            0,
        ),
        ([{"id": "b", "embedding": []}], 422, "invalid_embedding", 0),
        (
            [good, {"id": "b", "embedding": [float("nan")] + [0.0] * 63}],
            422,
            "invalid_embedding",
            1,
        ),
        ([good, dict(good)], 422, "invalid_request", 1),  # the same id twice
        ([{"id": "b"}], 422, "invalid_request", 0),  # neither image nor embedding
        ([{"id": "b", "embedding": [1.0], "image": "AAAA"}], 422, "invalid_request", 0),
        ([{"id": "", "embedding": [1.0] * 64}], 422, "invalid_request", 0),
        ([{"id": "a\nb", "embedding": [1.0] * 64}], 422, "invalid_request", 0),
    ]
    for items, status, error_type, index in cases:
        content = json.dumps({"items": items}, allow_nan=True)
        body = _error(c.post(url, content=content), status, error_type)
        if index is not None:
            assert body.get("index") == index, body
    # NaN sneaked in as base64 float32
    nan = b64_vector(np.full(64, np.nan, dtype=np.float32))
    _error(c.post(url, json={"items": [{"id": "n", "embedding": nan}]}), 422, "invalid_embedding")
    _error(c.post(url, content=b"{not json"), 422, "invalid_request")
    _error(c.post(url, json={"items": []}), 422, "invalid_request")
    assert c.get(f"/v1/datasets/{dataset}").json()["count"] == before


def test_bad_images_name_the_item(
    service: Clustering, photo_jpegs: dict[str, bytes], to_base64: Any
) -> None:
    c = service.client
    dataset = service.dataset()
    good = to_base64(next(iter(photo_jpegs.values())))
    items = [
        {"id": "good", "image": good},
        {"id": "truncated", "image": good[: len(good) // 3]},
    ]
    body = _error(
        c.post(f"/v1/datasets/{dataset}/items", json={"items": items}), 422, "invalid_image"
    )
    assert body["index"] == 1 and "truncated" in body["message"]
    body = _error(
        c.post(f"/v1/datasets/{dataset}/items", json={"items": [{"id": "x", "image": "%%%"}]}),
        422,
        "invalid_image",
    )
    assert body["index"] == 0
    assert c.get(f"/v1/datasets/{dataset}").json()["count"] == 0  # nothing half-stored
    assert service.add(dataset, [{"id": "good", "image": good}])["added"] == 1


def test_jobs_are_validated_before_queueing(service: Clustering, trained: dict[str, Any]) -> None:
    c, dataset = service.client, trained["dataset"]
    empty = service.dataset()
    base = {"type": "train", "dataset_id": dataset, "algorithm": "kmeans", "model_name": "m"}
    cases = [
        ({**base, "algorithm": "dbscan"}, 422, "invalid_request", "algorithm"),
        ({**base, "params": {"n_init": "many"}}, 422, "invalid_request", "params.n_init"),
        ({**base, "params": {"bogus": 1}}, 422, "invalid_request", "params.bogus"),
        ({**base, "params": {"n_init": 0}}, 422, "invalid_request", "params.n_init"),
        ({**base, "n_clusters": 1}, 422, "invalid_request", "n_clusters"),
        ({**base, "n_clusters": 101}, 422, "invalid_request", "n_clusters"),
        ({**base, "model_name": "../../etc"}, 422, "invalid_request", "model_name"),
        ({**base, "dataset_id": empty}, 422, "empty_dataset", "dataset_id"),
        ({**base, "type": "retrain"}, 422, "invalid_request", None),
        (
            {"type": "update", "model_name": trained["model"], "params": {"max_epochs": -1}},
            422,
            "invalid_request",
            "params.max_epochs",
        ),
        (
            {"type": "update", "model_name": trained["model"], "dataset_id": empty},
            422,
            "empty_dataset",
            "dataset_id",
        ),
    ]
    before = len(c.get("/v1/jobs").json()["jobs"])
    for body, status, error_type, field in cases:
        error = _error(c.post("/v1/jobs", json=body), status, error_type)
        if field is not None:
            assert error["field"] == field, error
    assert len(c.get("/v1/jobs").json()["jobs"]) == before


def test_update_on_another_dimension_is_refused(
    service: Clustering, trained: dict[str, Any]
) -> None:
    other = service.dataset()
    service.add(other, [{"id": f"o{i}", "embedding": [float(i), 1.0]} for i in range(10)])
    body = {"type": "update", "model_name": trained["model"], "dataset_id": other}
    _error(service.client.post("/v1/jobs", json=body), 422, "dimension_mismatch")


def test_prediction_input_is_checked(service: Clustering, trained: dict[str, Any]) -> None:
    c, model = service.client, trained["model"]
    url = f"/v1/models/{model}/predict"
    _error(c.post(url, json={"embeddings": [[0.0] * 10]}), 422, "dimension_mismatch")
    _error(c.post(url, json={"embeddings": [[1e39] * 64]}), 422, "invalid_embedding")
    _error(c.post(url, json={}), 422, "invalid_request")
    _error(
        c.post(url + "?version=1&alias=x", json={"embeddings": [[0.0] * 64]}),
        422,
        "invalid_request",
    )
    _error(c.post(url, json={"embeddings": [[0.0] * 64] * 10_001}), 413, "too_many_items")


def test_assignment_cursor_is_checked(service: Clustering, trained: dict[str, Any]) -> None:
    url = f"/v1/models/{trained['model']}/versions/1/assignments"
    _error(service.client.get(url, params={"cursor": "garbage!"}), 422, "invalid_request")
    _error(service.client.get(url, params={"limit": 0}), 422, "invalid_request")


def test_names_and_conflicts(service: Clustering) -> None:
    c = service.client
    _error(c.post("/v1/datasets", json={"name": "a/b"}), 422, "invalid_request")
    _error(c.post("/v1/datasets", json={"name": ".hidden"}), 422, "invalid_request")
    c.post("/v1/datasets", json={"name": "taken"})
    body = _error(c.post("/v1/datasets", json={"name": "taken"}), 409, "conflict")
    assert body["id"].startswith("ds_")


def test_oversized_request_is_refused_unread(clustering_factory: Any) -> None:
    service = (
        clustering_factory(
            env={"CLUSTERING_MAX_REQUEST_BYTES": "4096", "CLUSTERING_MAX_ITEMS_PER_REQUEST": "3"},
        )
        .start()
        .wait_ready()
    )
    dataset = service.dataset()
    big = [{"id": f"i{i}", "embedding": [0.5] * 64} for i in range(50)]
    _error(
        service.client.post(f"/v1/datasets/{dataset}/items", json={"items": big}),
        413,
        "payload_too_large",
    )
    four = [{"id": f"i{i}", "embedding": [0.5] * 4} for i in range(4)]
    _error(
        service.client.post(f"/v1/datasets/{dataset}/items", json={"items": four}),
        413,
        "too_many_items",
    )
    assert service.client.get("/health").status_code == 200
    assert service.client.get(f"/v1/datasets/{dataset}").json()["count"] == 0


def test_algorithms_are_described(service: Clustering) -> None:
    algorithms = service.client.get("/v1/algorithms").json()["algorithms"]
    names = {a["name"] for a in algorithms}
    assert {"kmeans", "dec", "deepcluster", "odc"} <= names
    kmeans = next(a for a in algorithms if a["name"] == "kmeans")
    n_init = next(p for p in kmeans["parameters"] if p["name"] == "n_init")
    assert n_init["default"] == 10 and n_init["schema"] == {"type": "integer"}
    assert {p["name"] for p in kmeans["update_parameters"]} >= {"max_epochs", "max_centroid_shift"}
    assert all(a["description"] for a in algorithms)


def test_health_info_metrics(service: Clustering) -> None:
    c = service.client
    assert c.get("/health").json() == {"status": "ok"}
    assert c.get("/ready").json() == {"status": "ready"}
    info = c.get("/info").json()
    assert info["database"] == "embedded" and info["in_process_worker"] is True
    metrics = c.get("/metrics").text
    assert 'clustering_jobs{state="succeeded",type="train"}' in metrics
    assert "clustering_job_duration_seconds_bucket" in metrics
    assert "clustering_ingest_seconds_count" in metrics
    assert 'clustering_request_failures_total{type="not_found"}' in metrics
