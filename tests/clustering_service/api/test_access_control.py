"""Access control on real processes: both services with API keys, the clustering
service forwarding its embedding key.

* Every route of each app's route table (read from the app, so a route added later
  fails :func:`test_every_route_is_classified` until it is listed here) is called
  without a key, with wrong keys and with the right one: 401 ``unauthorized`` for
  every protected route (and nothing done), success with the key; the public ones
  answer without it and show no secret.
* The embedding key is forwarded: image ingest and prediction work; a clustering
  service without it gets a 502 naming the key setting, and stores nothing.
* Names that reach a path, a URL or the database are refused with 422 (``../``,
  ``/``, NUL, control characters, look-alike letters, too long), never a 500, and
  nothing lands outside the data directory's own layout.
* Neither service's log (debug level, access log on) holds a key, an image payload
  or a vector value.

Public routes, and why (docs/reliability/images_and_access.md):
``/health`` and ``/ready`` (probes of orchestrators and load balancers, which hold
no key), ``/info`` (limits and versions a client reads before sending; no data, no
secret), ``/metrics`` (Prometheus scrapes without credentials; counts and latencies
only, no names), ``/openapi.json``, ``/docs``, ``/docs/oauth2-redirect``, ``/redoc``
(the shape of the API, public in docs/api.md anyway), and the dashboard's shell
``/dashboard`` and ``/dashboard/static/{name}`` (HTML, JavaScript and CSS shipped in
the package: no data; the page asks for the key and sends it with every ``/v1`` call).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts

from tests.support.clustering import Clustering
from tests.support.fixtures import ClusteringFactory
from tests.support.processes import ServiceProcess, tiny_embedding_service

# A keyed embedding service and clustering service of its own (about a minute to start
# on 2 cores), beyond the session-wide ones.
pytestmark = pytest.mark.slow

EMBEDDING_KEY = "emb-" + secrets.token_urlsafe(24)
CLUSTERING_KEY = "clu-" + secrets.token_urlsafe(24)
MODEL = "acl-model"

PUBLIC: dict[str, frozenset[tuple[str, str]]] = {
    "embedding": frozenset(
        {("GET", p) for p in ("/health", "/ready", "/info", "/metrics")}
        | {("GET", p) for p in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")}
    ),
    "clustering": frozenset(
        {("GET", p) for p in ("/health", "/ready", "/info", "/metrics")}
        | {("GET", p) for p in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")}
        | {("GET", "/dashboard"), ("GET", "/dashboard/static/{name}")}
    ),
}


#: the responses of the calls made so far, by route (a later call may need an id)
Done = dict[tuple[str, str], httpx.Response]


@dataclass(frozen=True)
class Call:
    """A request that must succeed with the key: its path (or a function of the earlier
    responses giving it), the status expected, httpx keyword arguments."""

    path: str | Callable[[Done], str]
    status: int
    kwargs: dict[str, Any]

    def url(self, done: Done | None) -> str:
        if isinstance(self.path, str):
            return self.path
        # without the key nothing may be looked up: any well-formed id will do
        return self.path(done) if done is not None else "/v1/jobs/job_0000000000000000/cancel"


def call(path: str | Callable[[Done], str], status: int = 200, **kwargs: Any) -> Call:
    return Call(path, status, kwargs)


def route_table(app: FastAPI) -> set[tuple[str, str]]:
    """Every (method, path template) the app routes, HEAD aside (Starlette adds it to
    every GET)."""
    table = set()
    for route in iter_route_contexts(app.routes):
        for method in getattr(route, "methods", None) or ():
            if method != "HEAD":
                table.add((method, route.path))
    return table


def embedding_app() -> FastAPI:
    from embedding_service.app import create_app
    from embedding_service.config import Settings

    return create_app(Settings(model="random:tiny"))


def clustering_app() -> FastAPI:
    from clustering_service.app import create_app
    from clustering_service.config import Settings

    return create_app(Settings())


# --- the stack ------------------------------------------------------------------------


@dataclass
class Stack:
    embedding: ServiceProcess
    clustering: Clustering
    factory: ClusteringFactory
    database_url: str
    images: list[str]
    dataset: str
    job: str

    def auth(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest, photo_jpegs: dict[str, bytes], to_base64: Any
) -> Iterator[Stack]:
    """A keyed embedding service and a keyed clustering service (local PostgreSQL) that
    forwards the embedding key, both logging at debug level with access logs; a dataset
    of six photos and two versions of a k-means model."""
    embedding = tiny_embedding_service(
        env={
            "EMBEDDING_API_KEY": EMBEDDING_KEY,
            "EMBEDDING_LOG_LEVEL": "debug",
            "EMBEDDING_ACCESS_LOG": "true",
        }
    )
    factory = ClusteringFactory(embedding.url, request)
    try:
        embedding.start().wait_ready(120)
        database_url = factory.local_pg()
        clustering = factory(
            database_url=database_url,
            env={
                "CLUSTERING_API_KEY": CLUSTERING_KEY,
                "CLUSTERING_EMBEDDING_API_KEY": EMBEDDING_KEY,
                "CLUSTERING_LOG_LEVEL": "debug",
                "CLUSTERING_ACCESS_LOG": "true",
            },
        )
        clustering.client.headers["Authorization"] = f"Bearer {CLUSTERING_KEY}"
        clustering.start().wait_ready(120)
        images = [to_base64(jpeg) for jpeg in photo_jpegs.values()]
        dataset = clustering.dataset("acl")
        added = clustering.add(
            dataset, [{"id": f"photos/{i}.jpg", "image": image} for i, image in enumerate(images)]
        )
        assert added["added"] == len(images)
        jobs = [clustering.train(dataset, "kmeans", MODEL, n_clusters=2) for _ in range(2)]
        for job in jobs:
            assert clustering.wait_job(job["id"])["state"] == "succeeded"
        yield Stack(embedding, clustering, factory, database_url, images, dataset, jobs[0]["id"])
    finally:
        factory.close()
        embedding.close()


def clustering_calls(s: Stack) -> dict[tuple[str, str], Call]:
    """One successful request per protected clustering route, in an order that works."""
    ds, item, m = s.dataset, "photos/0.jpg", f"/v1/models/{MODEL}"
    v1 = f"{m}/versions/1"
    # long enough to be cancelled by the next call (the cancel stops it at once)
    long_job = {
        "type": "train", "dataset_id": ds, "algorithm": "dec", "model_name": "acl-long",
        "n_clusters": 2, "params": {"pretrain_epochs": 1_000_000},
    }  # fmt: skip
    return {
        ("POST", "/v1/datasets"): call("/v1/datasets", 201, json={"name": "acl-other"}),
        ("GET", "/v1/datasets"): call("/v1/datasets"),
        ("GET", "/v1/datasets/{dataset_id}"): call(f"/v1/datasets/{ds}"),
        ("POST", "/v1/datasets/{dataset_id}/items"): call(
            f"/v1/datasets/{ds}/items", json={"items": [{"id": "extra", "image": s.images[0]}]}
        ),
        ("POST", "/v1/datasets/{dataset_id}/items/lookup"): call(
            f"/v1/datasets/{ds}/items/lookup", json={"ids": [item]}
        ),
        ("POST", "/v1/datasets/{dataset_id}/thumbnails/lookup"): call(
            f"/v1/datasets/{ds}/thumbnails/lookup", json={"ids": [item]}
        ),
        ("GET", "/v1/datasets/{dataset_id}/items/{item_id:path}/thumbnail"): call(
            f"/v1/datasets/{ds}/items/{item}/thumbnail"
        ),
        ("GET", "/v1/datasets/{dataset_id}/items/{item_id:path}"): call(
            f"/v1/datasets/{ds}/items/{item}"
        ),
        ("DELETE", "/v1/datasets/{dataset_id}/items"): call(
            f"/v1/datasets/{ds}/items", json={"ids": ["extra"]}
        ),
        ("GET", "/v1/algorithms"): call("/v1/algorithms"),
        ("POST", "/v1/jobs"): call("/v1/jobs", 202, json=long_job),
        ("POST", "/v1/jobs/{job_id}/cancel"): call(
            lambda done: f"/v1/jobs/{done['POST', '/v1/jobs'].json()['id']}/cancel", 202
        ),
        ("GET", "/v1/jobs"): call("/v1/jobs", params={"model_name": MODEL}),
        ("GET", "/v1/jobs/{job_id}"): call(f"/v1/jobs/{s.job}"),
        ("GET", "/v1/jobs/{job_id}/events"): call(f"/v1/jobs/{s.job}/events"),
        ("GET", "/v1/models"): call("/v1/models"),
        ("GET", "/v1/models/{name}"): call(m),
        ("GET", "/v1/models/{name}/versions/{version}"): call(v1),
        ("PUT", "/v1/models/{name}/aliases/{alias}"): call(
            f"{m}/aliases/production", json={"version": 1}
        ),
        ("GET", "/v1/models/{name}/versions/{version}/clusters"): call(f"{v1}/clusters"),
        ("GET", "/v1/models/{name}/versions/{version}/assignments"): call(f"{v1}/assignments"),
        ("POST", "/v1/models/{name}/update"): call(f"{m}/update", 202, json={"params": {}}),
        ("POST", "/v1/models/{name}/predict"): call(f"{m}/predict", json={"images": s.images[:2]}),
        ("GET", "/v1/models/{name}/versions/{version}/projection"): call(f"{v1}/projection"),
        ("GET", "/v1/models/{name}/versions/{version}/transitions"): call(
            f"{m}/versions/2/transitions", params={"from_version": 1}
        ),
    }


def embedding_calls(s: Stack) -> dict[tuple[str, str], Call]:
    return {
        ("POST", "/v1/embeddings"): call("/v1/embeddings", json={"images": s.images[:2]}),
        ("POST", "/embeddings/"): call("/embeddings/", json={"base64_images": s.images[:1]}),
    }


def public_paths(template: str) -> str:
    return template.replace("{name}", "app.js")


def wrong_headers(key: str) -> list[dict[str, str]]:
    """No key, and keys that are almost right."""
    return [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {key[:-1]}"},
        {"Authorization": f"Bearer {key}x"},
        {"Authorization": key},
        {"Authorization": f"Basic {key}"},
        {"X-API-Key": key},
    ]


# --- tests --------------------------------------------------------------------------------


@pytest.mark.parametrize(("service", "make_app"), [("embedding", embedding_app),
                                                   ("clustering", clustering_app)])  # fmt: skip
def test_every_route_is_classified(service: str, make_app: Callable[[], FastAPI]) -> None:
    """A new route fails here until it is listed as public or given a request below."""
    stub = Stack(None, None, None, "", [""] * 2, "ds", "job")  # type: ignore[arg-type]
    calls = embedding_calls(stub) if service == "embedding" else clustering_calls(stub)
    table = route_table(make_app())
    assert table == set(calls) | PUBLIC[service], (
        f"unclassified: {sorted(table - set(calls) - PUBLIC[service])}; "
        f"gone: {sorted((set(calls) | PUBLIC[service]) - table)}"
    )


def _check_service(
    url: str, key: str, calls: dict[tuple[str, str], Call], public: frozenset[tuple[str, str]],
    state: Callable[[], Any],
) -> None:  # fmt: skip
    before = state()
    with httpx.Client(base_url=url, timeout=60) as client:
        for (method, template), c in calls.items():
            for headers in wrong_headers(key):
                r = _request(client, method, c.url(None), c, headers)
                assert r.status_code == 401, (method, template, headers, r.text)
                assert r.json()["error"]["type"] == "unauthorized", r.text
        assert state() == before, "a request without the key changed something"
        done: Done = {}
        for (method, template), c in calls.items():
            r = _request(client, method, c.url(done), c, {"Authorization": f"Bearer {key}"})
            assert r.status_code == c.status, (method, template, r.text[:500])
            done[method, template] = r
        for method, template in sorted(public):
            r = client.request(method, public_paths(template))
            assert r.status_code == 200, (template, r.text[:300])
            assert EMBEDDING_KEY not in r.text and CLUSTERING_KEY not in r.text, template


def _request(
    client: httpx.Client, method: str, path: str, c: Call, headers: dict[str, str]
) -> httpx.Response:
    if path.endswith("/events"):
        with client.stream(method, path, headers=headers) as response:
            response.read()
            return response
    return client.request(method, path, headers=headers, **c.kwargs)


def test_clustering_routes_need_the_key(stack: Stack) -> None:
    c = stack.clustering.client

    def state() -> Any:  # what a request could have created, changed or deleted
        jobs = c.get("/v1/jobs").json()["jobs"]
        return (
            c.get("/v1/datasets").json(),
            sorted((job["id"], job["cancel_requested"]) for job in jobs),
            c.get("/v1/models").json(),
        )

    _check_service(
        stack.clustering.url, CLUSTERING_KEY, clustering_calls(stack), PUBLIC["clustering"], state
    )
    events = c.get(f"/v1/jobs/{stack.job}/events").text
    assert "event: job" in events and '"succeeded"' in events


def test_embedding_routes_need_the_key(stack: Stack) -> None:
    def state() -> Any:
        metrics = httpx.get(f"{stack.embedding.url}/metrics").text
        return [line for line in metrics.splitlines() if line.startswith("embedding_images")]

    _check_service(
        stack.embedding.url, EMBEDDING_KEY, embedding_calls(stack), PUBLIC["embedding"], state
    )


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both services check keys with shared.server.check_bearer, which compares with
    hmac.compare_digest (time independent of where the first difference is)."""
    import inspect

    import clustering_service.api.deps as clustering_deps
    import embedding_service.api.deps as embedding_deps
    import shared.server as server

    for deps in (clustering_deps, embedding_deps):
        assert "check_bearer(" in inspect.getsource(deps.require_api_key)
    seen: list[tuple[bytes, bytes]] = []
    real = server.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(server.hmac, "compare_digest", spy)
    request = type("R", (), {"headers": {"authorization": "Bearer abc"}})()
    server.check_bearer(request, "abc")  # type: ignore[arg-type]
    with pytest.raises(server.Unauthorized):
        server.check_bearer(request, "abd")  # type: ignore[arg-type]
    assert seen == [(b"abc", b"abc"), (b"abc", b"abd")]


def test_the_embedding_key_is_forwarded(stack: Stack) -> None:
    """Ingest worked in the fixture (the embedding service refuses keyless calls); a
    clustering service without the key gets a 502 naming the setting, stores nothing."""
    c = stack.clustering.client
    assert c.get(f"/v1/datasets/{stack.dataset}").json()["count"] == len(stack.images)
    r = httpx.post(f"{stack.embedding.url}/v1/embeddings", json={"images": stack.images[:1]})
    assert r.status_code == 401

    keyless = stack.factory(
        database_url=stack.database_url,
        env={"CLUSTERING_API_KEY": CLUSTERING_KEY, "CLUSTERING_IN_PROCESS_WORKER": "false"},
    )
    keyless.client.headers["Authorization"] = f"Bearer {CLUSTERING_KEY}"
    keyless.start().wait_ready(120)
    before = c.get(f"/v1/datasets/{stack.dataset}").json()
    for path, body in [
        (f"/v1/datasets/{stack.dataset}/items", {"items": [{"id": "k", "image": stack.images[0]}]}),
        (f"/v1/models/{MODEL}/predict", {"images": stack.images[:1]}),
    ]:
        r = keyless.client.post(path, json=body)
        assert r.status_code == 502, r.text
        error = r.json()["error"]
        assert error["type"] == "embedding_service_error", error
        assert "API key" in error["message"] and "CLUSTERING_EMBEDDING_API_KEY" in error["message"]
        assert EMBEDDING_KEY not in r.text
    assert c.get(f"/v1/datasets/{stack.dataset}").json() == before
    keyless.stop()  # its log is read by the last test


HOSTILE_NAMES = [
    "../etc",
    "..",
    "a/b",
    "a\\b",
    "a\x00b",
    "a\nb",
    "prod\n",
    "x" * 129,
    "ｐｒｏｄ",  # fullwidth letters
    "prоd",  # Cyrillic o
    "a\u202eb",  # right-to-left override
    "a\u200bb",  # zero-width space
    ".hidden",
    "-rf",
    " prod",
    "%2e%2e",
]


def test_hostile_names_are_refused_everywhere(stack: Stack) -> None:
    c, ds = stack.clustering.client, stack.dataset
    before = (c.get("/v1/datasets").json(), c.get(f"/v1/models/{MODEL}").json())
    train = {"type": "train", "dataset_id": ds, "algorithm": "kmeans", "model_name": MODEL}
    predict = f"/v1/models/{MODEL}/predict"
    for name in HOSTILE_NAMES:
        segment = quote(name, safe="")
        attempts = [
            c.post("/v1/datasets", json={"name": name}),
            c.post("/v1/jobs", json={**train, "model_name": name}),
            c.post("/v1/jobs", json={**train, "dataset_id": name}),
            c.post(f"/v1/models/{MODEL}/update", json={"dataset_id": name}),
            c.get("/v1/jobs", params={"model_name": name}),
            c.get("/v1/jobs", params={"dataset_id": name}),
            c.put(f"/v1/models/{MODEL}/aliases/{segment}", json={"version": 1}),
            c.get(f"/v1/models/{segment}"),
            c.get(f"/v1/models/{segment}/versions/1/projection"),
            c.post(predict, params={"alias": name}, json={"images": stack.images[:1]}),
            c.get(f"/v1/datasets/{segment}"),
            c.get(f"/v1/jobs/{segment}/events"),
        ]
        for r in attempts:
            where = f"{r.request.method} {r.request.url} ({name!r})"
            if r.json()["error"]["message"] in ("Not Found", "Method Not Allowed"):
                continue  # '/' or '..' in the path: no route matches, nothing looked up
            assert r.status_code == 422, f"{where}: {r.status_code} {r.text[:300]}"
            assert r.json()["error"]["type"] == "invalid_request", where
    assert (c.get("/v1/datasets").json(), c.get(f"/v1/models/{MODEL}").json()) == before
    # what the service wrote to its data directory: caches under names it made itself
    data_dir = stack.clustering.data_dir
    odd = [p for p in data_dir.rglob("*") if not re.fullmatch(r"[A-Za-z0-9._-]+", p.name)]
    assert not odd, odd
    assert c.get("/ready").status_code == 200


def test_logs_hold_no_key_payload_or_vector(stack: Stack) -> None:
    """After everything above (ingest, training, prediction, refused requests with
    almost-right keys), at debug level with access logs."""
    r = httpx.post(
        f"{stack.embedding.url}/v1/embeddings",
        json={"images": stack.images[:2]},
        headers=stack.auth(EMBEDDING_KEY),
    )
    vectors = np.asarray(r.json()["embeddings"], np.float32)
    values = re.findall(r"-?\d\.\d{8,}", r.text)  # float32 values as JSON writes them
    assert len(values) >= vectors.size
    logs = {
        "embedding": stack.embedding.output(),
        "clustering": "".join(p.output() for p in stack.factory.made),
    }
    assert "HTTP/1.1" in logs["embedding"] and "POST /v1/embeddings" in logs["embedding"]
    assert "/v1/datasets" in logs["clustering"]
    for where, text in logs.items():
        for key in (EMBEDDING_KEY, CLUSTERING_KEY, EMBEDDING_KEY[4:20], CLUSTERING_KEY[4:20]):
            assert key not in text, f"an API key in the {where} log"
        for image in stack.images:
            for start in range(0, len(image) - 32, max(1, len(image) // 8)):
                assert image[start : start + 32] not in text, f"image data in the {where} log"
        leaked = [v for v in values if v in text]
        assert not leaked, f"vector values in the {where} log: {leaked[:5]}"
