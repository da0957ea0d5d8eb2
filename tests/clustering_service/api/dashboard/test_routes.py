"""The routes behind the dashboard: projection, transitions, thumbnails in bulk, and
the page itself (open, while the data routes need the API key)."""

from __future__ import annotations

import base64
import math
from typing import Any

import httpx
import pytest

from tests.support.clustering import Clustering

MODEL = "photos"


def _assignments(service: Clustering, version: int) -> dict[str, int]:
    r = service.client.get(f"/v1/models/{MODEL}/versions/{version}/assignments?limit=10000")
    assert r.status_code == 200, r.text
    return {a["item_id"]: a["cluster"] for a in r.json()["items"]}


def _error(response: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == error_type, error
    return error


def test_projection(dashboard_data: Any) -> None:
    service = dashboard_data.service
    c = service.client
    for version in (1, 2):
        r = c.get(f"/v1/models/{MODEL}/versions/{version}/projection")
        assert r.status_code == 200, r.text
        p = r.json()
        assigned = _assignments(service, version)
        assert p["model_name"] == MODEL and p["version"] == version and p["method"] == "pca"
        assert p["dataset_id"] == dashboard_data.dataset_id
        assert p["total"] == len(assigned) == dashboard_data.versions[version]["item_count"]
        # version 1 was made before two of its items were deleted: they have no vector now
        assert p["missing"] == (len(dashboard_data.removed) if version == 1 else 0)
        ids = [point["item_id"] for point in p["points"]]
        assert len(ids) == len(set(ids)) == p["total"] - p["missing"]
        assert set(ids) == set(assigned) - set(dashboard_data.removed)
        assert all(point["cluster"] == assigned[point["item_id"]] for point in p["points"])
        assert all(math.isfinite(point["x"]) and math.isfinite(point["y"]) for point in p["points"])
        # distinct photographs: the points are spread on both axes
        assert len({round(point["x"], 4) for point in p["points"]}) > len(ids) // 2
        first, second = p["explained_variance_ratio"]
        assert 0 < second <= first and first + second <= 1 + 1e-9
        # the same request gives the same answer (seeded sample, fixed axis signs)
        assert c.get(f"/v1/models/{MODEL}/versions/{version}/projection").json() == p


def test_projection_sample(dashboard_data: Any) -> None:
    c = dashboard_data.service.client
    full = c.get(f"/v1/models/{MODEL}/versions/2/projection").json()
    sample = c.get(f"/v1/models/{MODEL}/versions/2/projection", params={"limit": 7}).json()
    assert len(sample["points"]) == 7 and sample["total"] == full["total"]
    assert {p["item_id"] for p in sample["points"]} < {p["item_id"] for p in full["points"]}
    again = c.get(f"/v1/models/{MODEL}/versions/2/projection", params={"limit": 7}).json()
    assert again == sample


def test_transitions(dashboard_data: Any) -> None:
    service = dashboard_data.service
    c = service.client
    r = c.get(f"/v1/models/{MODEL}/versions/2/transitions")
    assert r.status_code == 200, r.text
    t = r.json()
    v2 = dashboard_data.versions[2]
    before, after = _assignments(service, 1), _assignments(service, 2)
    shared = set(before) & set(after)
    assert t["from_version"] == 1 and t["is_parent"] is True
    assert t["items_shared"] == len(shared)
    assert t["items_removed"] == len(dashboard_data.removed)
    assert t["items_added"] == len(dashboard_data.added)
    assert sum(x["count"] for x in t["transitions"]) == len(shared)
    moved = {i for i in shared if before[i] != after[i]}
    assert t["moved"] == len(moved)
    assert sum(x["count"] for x in t["transitions"] if x["from_cluster"] != x["to_cluster"]) == len(
        moved
    )
    for x in t["transitions"]:
        expected = sum(
            1 for i in shared if (before[i], after[i]) == (x["from_cluster"], x["to_cluster"])
        )
        assert x["count"] == expected
    assert t["kept_fraction"] == pytest.approx(v2["stability"]["kept_fraction"])
    assert t["centroid_shift"] == v2["stability"]["centroid_shift"]
    assert len(t["from_sizes"]) == dashboard_data.versions[1]["n_clusters"]
    assert sum(t["from_sizes"]) == len(before) and sum(t["to_sizes"]) == len(after)
    assert t["emptied_clusters"] == v2["stability"]["emptied_clusters"]
    assert len(t["moved_items"]) == len(moved)
    for item in t["moved_items"]:
        assert before[item["item_id"]] == item["from_cluster"] != item["to_cluster"]
        assert after[item["item_id"]] == item["to_cluster"]
    assert c.get(f"/v1/models/{MODEL}/versions/2/transitions").json() == t


def test_transitions_between_any_versions(dashboard_data: Any) -> None:
    c = dashboard_data.service.client
    forward = c.get(f"/v1/models/{MODEL}/versions/2/transitions?limit=0").json()
    assert forward["moved_items"] == [] and forward["moved"] >= 0
    back = c.get(f"/v1/models/{MODEL}/versions/1/transitions?from_version=2").json()
    assert back["is_parent"] is False and back["centroid_shift"] is None
    assert back["items_added"] == forward["items_removed"]
    assert back["moved"] == forward["moved"]
    same = c.get(f"/v1/models/{MODEL}/versions/2/transitions?from_version=2").json()
    assert same["moved"] == 0 and same["kept_fraction"] == 1.0
    assert all(x["from_cluster"] == x["to_cluster"] for x in same["transitions"])


@pytest.mark.parametrize(
    ("path", "status", "error_type", "field"),
    [
        ("/v1/models/nope/versions/1/projection", 404, "not_found", None),
        (f"/v1/models/{MODEL}/versions/9/projection", 404, "not_found", None),
        (
            f"/v1/models/{MODEL}/versions/1/projection?limit=0",
            422,
            "invalid_request",
            "query.limit",
        ),
        (
            f"/v1/models/{MODEL}/versions/1/projection?limit=x",
            422,
            "invalid_request",
            "query.limit",
        ),
        (
            f"/v1/models/{MODEL}/versions/1/projection?limit=20001",
            422,
            "invalid_request",
            "query.limit",
        ),
        (f"/v1/models/{MODEL}/versions/one/projection", 422, "invalid_request", "path.version"),
        ("/v1/models/nope/versions/2/transitions", 404, "not_found", None),
        (f"/v1/models/{MODEL}/versions/9/transitions", 404, "not_found", None),
        (f"/v1/models/{MODEL}/versions/2/transitions?from_version=9", 404, "not_found", None),
        (
            f"/v1/models/{MODEL}/versions/1/transitions",
            422,
            "invalid_request",
            "query.from_version",
        ),
        (
            f"/v1/models/{MODEL}/versions/2/transitions?from_version=0",
            422,
            "invalid_request",
            "query.from_version",
        ),
        (
            f"/v1/models/{MODEL}/versions/2/transitions?limit=-1",
            422,
            "invalid_request",
            "query.limit",
        ),
    ],
)
def test_bad_requests(
    dashboard_data: Any, path: str, status: int, error_type: str, field: str | None
) -> None:
    error = _error(dashboard_data.service.client.get(path), status, error_type)
    if field is not None:
        assert error["field"] == field


def test_thumbnails_lookup(dashboard_data: Any) -> None:
    c = dashboard_data.service.client
    path = f"/v1/datasets/{dashboard_data.dataset_id}/thumbnails/lookup"
    present = dashboard_data.added[0]
    ids = [present, dashboard_data.removed[0], "no/such/item.jpg", present]
    r = c.post(path, json={"ids": ids})
    assert r.status_code == 200, r.text
    found = r.json()["thumbnails"]
    assert [t["item_id"] for t in found] == ids
    prefix = "data:image/webp;base64,"
    assert found[0]["thumbnail"].startswith(prefix) and found[3] == found[0]
    webp = base64.b64decode(found[0]["thumbnail"][len(prefix) :])
    assert webp[:4] == b"RIFF" and webp[8:12] == b"WEBP"
    same = c.get(f"/v1/datasets/{dashboard_data.dataset_id}/items/{present}/thumbnail")
    assert same.content == webp
    assert found[1]["thumbnail"] is None and found[2]["thumbnail"] is None

    _error(c.post("/v1/datasets/ds_nope/thumbnails/lookup", json={"ids": ["a"]}), 404, "not_found")
    assert _error(c.post(path, json={"ids": []}), 422, "invalid_request")["field"] == "ids"
    too_many = {"ids": [f"x{i}" for i in range(501)]}
    assert _error(c.post(path, json=too_many), 422, "invalid_request")["field"] == "ids"


def test_api_key(dashboard_data: Any) -> None:
    """The page and its files are open; every data route needs the key."""
    url = dashboard_data.url
    v = f"/v1/models/{MODEL}/versions/2"
    dataset = dashboard_data.dataset_id
    for method, path in [
        ("GET", f"{v}/projection"),
        ("GET", f"{v}/transitions"),
        ("POST", f"/v1/datasets/{dataset}/thumbnails/lookup"),
    ]:
        r = httpx.request(method, url + path, json={"ids": ["a"]})
        _error(r, 401, "unauthorized")
        wrong = httpx.request(method, url + path, headers={"Authorization": "Bearer nope"})
        _error(wrong, 401, "unauthorized")
    assert httpx.get(f"{url}/info").json()["api_key_required"] is True


def test_page_and_files(dashboard_data: Any) -> None:
    url = dashboard_data.url
    page = httpx.get(f"{url}/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'src="dashboard/static/app.js"' in page.text
    for name, kind in [("app.js", "text/javascript"), ("style.css", "text/css")]:
        r = httpx.get(f"{url}/dashboard/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), name
    _error(httpx.get(f"{url}/dashboard/static/index.html"), 404, "not_found")
    _error(httpx.get(f"{url}/dashboard/static/..%2Fapp.py"), 404, "not_found")
