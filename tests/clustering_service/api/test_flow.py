"""The whole product over real HTTP, on both kinds of PostgreSQL.

Datasets from images (embedded by the real embedding service) and from
vectors -> a training job for every algorithm -> its events -> assignments ->
prediction -> delete and add items -> update -> stability report -> alias ->
restart of the service -> everything still there and answering the same.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from clustering_service.algorithms import ALGORITHMS
from tests.support.clustering import vector_items


def _events(client: Any, job_id: str) -> list[dict[str, Any]]:
    events = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=120) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events


def _all_assignments(client: Any, model: str, version: int, **query: Any) -> list[dict]:
    items, cursor = [], None
    while True:
        params = {"limit": 70, **query, **({"cursor": cursor} if cursor else {})}
        r = client.get(f"/v1/models/{model}/versions/{version}/assignments", params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


@pytest.mark.slow
@pytest.mark.parametrize("database", ["embedded", "local"])
def test_full_flow(
    database: str,
    clustering_factory: Any,
    digits_vectors: tuple[np.ndarray, np.ndarray],
    photo_jpegs: dict[str, bytes],
    to_base64: Any,
) -> None:
    url = clustering_factory.local_pg() if database == "local" else None
    service = clustering_factory(database_url=url).start().wait_ready()
    c = service.client
    X, y = digits_vectors

    # -- a dataset of vectors, with labels for the metrics
    vectors = service.dataset("digits")
    items = vector_items(X[:250], "d", y[:250])
    assert service.add(vectors, items) == {"added": 250, "duplicates": 0, "count": 250, "dim": 64}
    # re-sending is idempotent
    assert service.add(vectors, items[:10])["duplicates"] == 10

    # -- a dataset of images, embedded by the embedding service
    images = service.dataset("photos")
    photos = [to_base64(p) for p in photo_jpegs.values()]
    image_items = [{"id": f"photos/{i}.jpg", "image": p} for i, p in enumerate(photos)]
    added = service.add(images, image_items)
    assert added["added"] == len(photos) and added["dim"] == 32
    thumb = c.get(f"/v1/datasets/{images}/items/photos/0.jpg/thumbnail")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/webp"
    assert thumb.content[:4] == b"RIFF"

    # -- train every algorithm; follow the first job's events
    versions = {}
    for algorithm in ALGORITHMS:
        job = service.train(vectors, algorithm, f"digits-{algorithm}", n_clusters=5)
        if algorithm == ALGORITHMS[0]:
            events = _events(c, job["id"])
            states = [e["state"] for e in events]
            assert states[-1] == "succeeded", events[-1]
            assert "running" in states and states.index("running") < len(states) - 1
            # the stream starts from the job's state when the client subscribes (a fast
            # worker may be past "loading" by then) and sends the job as it is when a
            # change is announced (quick stages may be merged): several stages arrive,
            # the last one before the end is "saving"
            stages = [e["progress"]["stage"] for e in events if e["progress"]]
            assert len(set(stages)) >= 2 and stages[-1] == "saving", stages
        done = service.wait_job(job["id"])
        assert done["state"] == "succeeded", done
        assert done["result"] == {"model_name": f"digits-{algorithm}", "version": 1}
        versions[algorithm] = c.get(f"/v1/models/digits-{algorithm}/versions/1").json()

    for algorithm, version in versions.items():
        model = f"digits-{algorithm}"
        assert version["algorithm"] == algorithm and version["n_clusters"] == 5
        assert version["item_count"] == 250 and version["dim"] == 64
        metrics = version["metrics"]
        assert metrics["labelled_items"] == 250
        assert metrics["acc"] > 0.5, (algorithm, metrics)  # 5 digit classes: chance is 0.2
        assert -1 <= metrics["silhouette"] <= 1
        clusters = c.get(f"/v1/models/{model}/versions/1/clusters").json()["clusters"]
        assert sum(cl["size"] for cl in clusters) == 250
        assigned = _all_assignments(c, model, 1)
        assert sorted(a["item_id"] for a in assigned) == sorted(i["id"] for i in items)
        one = _all_assignments(c, model, 1, cluster=clusters[0]["cluster"])
        assert len(one) == clusters[0]["size"]
        assert set(clusters[0]["exemplars"]) <= {a["item_id"] for a in one}
        # prediction of stored vectors gives their stored assignments
        r = c.post(
            f"/v1/models/{model}/predict", json={"embeddings": [i["embedding"] for i in items[:20]]}
        )
        assert r.status_code == 200, r.text
        by_id = {a["item_id"]: a["cluster"] for a in assigned}
        assert [p["cluster"] for p in r.json()["predictions"]] == [
            by_id[f"d{i}"] for i in range(20)
        ]

    # -- images: automatic k, predict from images
    job = service.train(images, "kmeans", "photos")
    assert service.wait_job(job["id"])["state"] == "succeeded"
    photo_version = c.get("/v1/models/photos/versions/1").json()
    assert photo_version["k_selection"] is not None
    assert photo_version["n_clusters"] == photo_version["k_selection"]["best_k"]
    predicted = c.post(
        "/v1/models/photos/predict", json={"images": photos[:3], "return_probabilities": True}
    )
    assert predicted.status_code == 200, predicted.text
    p0 = predicted.json()["predictions"][0]
    assert len(p0["probabilities"]) == photo_version["n_clusters"]
    assert abs(sum(p0["probabilities"]) - 1) < 1e-4

    # -- delete some items, add new ones, update
    r = c.request(
        "DELETE",
        f"/v1/datasets/{vectors}/items",
        json={"ids": [f"d{i}" for i in range(100)] + ["nope"]},
    )
    assert r.json() == {"deleted": 100, "missing": 1, "count": 150}
    service.add(vectors, vector_items(X[250:], "new", y[250:]))
    r = c.post("/v1/models/digits-kmeans/update", json={"params": {"max_epochs": 5}})
    assert r.status_code == 202 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    assert service.wait_job(r.json()["id"])["state"] == "succeeded"
    v2 = c.get("/v1/models/digits-kmeans/versions/2").json()
    assert v2["parent_version"] == 1 and v2["item_count"] == 200
    s = v2["stability"]
    assert s["items_retained"] == 150 and s["items_removed"] == 100 and s["items_added"] == 50
    assert s["kept_fraction"] >= 0.9 and s["ari"] >= 0.8
    assert len(s["centroid_shift"]) == 5 and s["emptied_clusters"] == []

    # -- aliases move, with their history
    assert (
        c.put("/v1/models/digits-kmeans/aliases/production", json={"version": 1}).status_code == 200
    )
    moved = c.put("/v1/models/digits-kmeans/aliases/production", json={"version": 2}).json()
    assert moved["previous_version"] == 1
    via_alias = c.post(
        "/v1/models/digits-kmeans/predict?alias=production", json={"embeddings": [X[0].tolist()]}
    ).json()
    assert via_alias["version"] == 2

    # -- a restart loses nothing
    before = {
        "datasets": c.get("/v1/datasets").json(),
        "models": c.get("/v1/models").json(),
        "model": c.get("/v1/models/digits-kmeans").json(),
        "assignments": _all_assignments(c, "digits-dec", 1),
        "predict": c.post(
            "/v1/models/digits-odc/predict", json={"embeddings": [X[5].tolist(), X[6].tolist()]}
        ).json(),
    }
    service.restart()
    after = {
        "datasets": c.get("/v1/datasets").json(),
        "models": c.get("/v1/models").json(),
        "model": c.get("/v1/models/digits-kmeans").json(),
        "assignments": _all_assignments(c, "digits-dec", 1),
        "predict": c.post(
            "/v1/models/digits-odc/predict", json={"embeddings": [X[5].tolist(), X[6].tolist()]}
        ).json(),
    }
    assert after == before
    assert after["model"]["aliases"] == {"production": 2}
    assert [h["version"] for h in after["model"]["alias_history"]] == [1, 2]
