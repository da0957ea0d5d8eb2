"""HTTP client of the clustering service (sync and asyncio), on httpx.

    with ClusteringClient("http://localhost:8002") as client:
        ds = client.create_dataset("photos")
        client.add_images(ds.id, {"cat.jpg": Path("cat.jpg").read_bytes()})
        client.add_embeddings(ds.id, ids, X)             # (n, dim) float32, sent as base64
        job = client.train(ds.id, "dec", model_name="photos")
        job = client.wait(job.id, on_update=print)       # follows the event stream
        for a in client.assignments("photos", job.result.version):
            ...

Every call answers pydantic models of :mod:`shared.clustering_schemas`; an
error answer raises :class:`ClusteringServiceError` (the server's error type,
message, field and item index). Connection errors, 429 and 503 are retried
with backoff (Retry-After honoured) on every call that is safe to repeat:
reads, ingest (idempotent per item id), and job submissions, which carry an
Idempotency-Key so a retried submission never makes a second job.

Each request-building method is written once (``_Calls``); the sync and the
async client only differ in how they send it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import numpy as np
import pybase64
from pydantic import BaseModel
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from shared.client import ApiError, ImageInput, encode_image
from shared.clustering_schemas import (
    TERMINAL_STATES,
    AlgorithmList,
    Alias,
    Assignment,
    Assignments,
    Clusters,
    Dataset,
    DatasetList,
    ItemsAdded,
    ItemsDeleted,
    ItemsFound,
    Job,
    JobList,
    ModelDetail,
    ModelList,
    Predictions,
    Version,
)
from shared.schemas import WIRE_DTYPE

DEFAULT_URL = "http://localhost:8002"
#: vectors per ingest request (about 20 MB of JSON at 384-d)
VECTORS_PER_REQUEST = 10_000
#: images per ingest request
IMAGES_PER_REQUEST = 32

M = TypeVar("M", bound=BaseModel)


class ClusteringServiceError(ApiError):
    """An error answer of the clustering service (see :class:`shared.client.ApiError`)."""


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, ApiError):
        return exc.retryable
    return isinstance(exc, httpx.TransportError)


def encode_vectors(X: np.ndarray) -> list[str]:
    """Rows of ``X`` (n, dim) as base64 little-endian float32 strings."""
    rows = np.ascontiguousarray(X, dtype=WIRE_DTYPE)
    return [pybase64.b64encode(row.tobytes()).decode("ascii") for row in rows]


@dataclass
class Call:
    """One HTTP request and how to read its answer."""

    method: str
    path: str
    json: Any = None
    params: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    model: Any = None  # a pydantic model class, or None for raw JSON
    retry: bool = True


def _drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


class _Calls:
    """The requests of the API, built once for both clients."""

    @staticmethod
    def create_dataset(name: str) -> Call:
        return Call("POST", "/v1/datasets", {"name": name}, model=Dataset, retry=False)

    @staticmethod
    def datasets() -> Call:
        return Call("GET", "/v1/datasets", model=DatasetList)

    @staticmethod
    def dataset(dataset_id: str) -> Call:
        return Call("GET", f"/v1/datasets/{dataset_id}", model=Dataset)

    @staticmethod
    def add_items(dataset_id: str, items: list[dict[str, Any]]) -> Call:
        return Call("POST", f"/v1/datasets/{dataset_id}/items", {"items": items}, model=ItemsAdded)

    @staticmethod
    def lookup(dataset_id: str, ids: list[str]) -> Call:
        return Call(
            "POST", f"/v1/datasets/{dataset_id}/items/lookup", {"ids": ids}, model=ItemsFound
        )

    @staticmethod
    def delete_items(dataset_id: str, ids: list[str]) -> Call:
        return Call("DELETE", f"/v1/datasets/{dataset_id}/items", {"ids": ids}, model=ItemsDeleted)

    @staticmethod
    def algorithms() -> Call:
        return Call("GET", "/v1/algorithms", model=AlgorithmList)

    @staticmethod
    def submit(body: dict[str, Any], idempotency_key: str | None) -> Call:
        key = idempotency_key or uuid.uuid4().hex
        return Call("POST", "/v1/jobs", body, headers={"Idempotency-Key": key}, model=Job)

    @staticmethod
    def train_body(
        dataset_id: str,
        algorithm: str,
        model_name: str,
        n_clusters: int | None,
        seed: int,
        params: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        return _drop_none(
            {
                "type": "train",
                "dataset_id": dataset_id,
                "algorithm": algorithm,
                "model_name": model_name,
                "n_clusters": n_clusters,
                "seed": seed,
                "params": dict(params or {}),
            }
        )

    @staticmethod
    def update_body(
        model_name: str,
        dataset_id: str | None,
        from_version: int | None,
        params: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        return _drop_none(
            {
                "type": "update",
                "model_name": model_name,
                "dataset_id": dataset_id,
                "from_version": from_version,
                "params": dict(params or {}),
            }
        )

    @staticmethod
    def job(job_id: str) -> Call:
        return Call("GET", f"/v1/jobs/{job_id}", model=Job)

    @staticmethod
    def jobs(state: str | None, model_name: str | None, limit: int) -> Call:
        params = _drop_none({"state": state, "model_name": model_name, "limit": limit})
        return Call("GET", "/v1/jobs", params=params, model=JobList)

    @staticmethod
    def cancel(job_id: str) -> Call:
        return Call("POST", f"/v1/jobs/{job_id}/cancel", model=Job)

    @staticmethod
    def models() -> Call:
        return Call("GET", "/v1/models", model=ModelList)

    @staticmethod
    def model(name: str) -> Call:
        return Call("GET", f"/v1/models/{name}", model=ModelDetail)

    @staticmethod
    def version(name: str, version: int) -> Call:
        return Call("GET", f"/v1/models/{name}/versions/{version}", model=Version)

    @staticmethod
    def clusters(name: str, version: int) -> Call:
        return Call("GET", f"/v1/models/{name}/versions/{version}/clusters", model=Clusters)

    @staticmethod
    def assignments_page(
        name: str, version: int, cluster: int | None, limit: int, cursor: str | None
    ) -> Call:
        params = _drop_none({"cluster": cluster, "limit": limit, "cursor": cursor})
        return Call(
            "GET",
            f"/v1/models/{name}/versions/{version}/assignments",
            params=params,
            model=Assignments,
        )

    @staticmethod
    def set_alias(name: str, alias: str, version: int) -> Call:
        return Call("PUT", f"/v1/models/{name}/aliases/{alias}", {"version": version}, model=Alias)

    @staticmethod
    def predict(
        name: str,
        body: dict[str, Any],
        version: int | None,
        alias: str | None,
    ) -> Call:
        params = _drop_none({"version": version, "alias": alias})
        return Call("POST", f"/v1/models/{name}/predict", body, params=params, model=Predictions)


def _item_batches(
    ids: Sequence[str], make: Callable[[int], dict[str, Any]], size: int
) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(ids), size):
        yield [make(i) for i in range(start, min(start + size, len(ids)))]


def _vector_items(
    ids: Sequence[str], X: np.ndarray, labels: Sequence[str | None] | None
) -> Callable[[int], dict[str, Any]]:
    if len(ids) != len(X):
        raise ValueError(f"{len(ids)} ids for {len(X)} vectors")
    rows = encode_vectors(X)

    def make(i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"id": ids[i], "embedding": rows[i]}
        if labels is not None and labels[i] is not None:
            item["label"] = str(labels[i])
        return item

    return make


def _image_items(
    images: Mapping[str, ImageInput], labels: Mapping[str, str] | None
) -> tuple[list[str], Callable[[int], dict]]:
    ids = list(images)

    def make(i: int) -> dict[str, Any]:
        item = {"id": ids[i], "image": encode_image(images[ids[i]])}
        if labels and ids[i] in labels:
            item["label"] = labels[ids[i]]
        return item

    return ids, make


def _sse_jobs(lines: Iterable[str]) -> Iterator[Job]:
    for line in lines:
        if line.startswith("data:"):
            yield Job.model_validate_json(line[5:].strip())


class _Base:
    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        retries: int = 5,
        max_wait: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.retries = retries
        self.max_wait = max_wait
        self._backoff = wait_exponential_jitter(initial=0.2, max=max_wait)

    def _retry_options(self, call: Call) -> dict[str, Any]:
        return {
            "stop": stop_after_attempt(self.retries + 1 if call.retry else 1),
            "wait": self._wait,
            "retry": retry_if_exception(_retryable),
            "reraise": True,
        }

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, ApiError) and exc.retry_after is not None:
            return min(exc.retry_after, self.max_wait)
        return self._backoff(state)

    @staticmethod
    def _read(call: Call, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise ClusteringServiceError.from_response(response)
        if call.model is None:
            return response.json()
        return call.model.model_validate_json(response.content)

    @staticmethod
    def _request_kwargs(call: Call) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"params": call.params, "headers": call.headers}
        if call.json is not None:
            kwargs["content"] = json.dumps(call.json).encode()
            kwargs["headers"] = {**call.headers, "content-type": "application/json"}
        return kwargs


class ClusteringClient(_Base):
    """Blocking client; thread-safe (one pooled ``httpx.Client``). See the module doc."""

    def __init__(self, base_url: str = DEFAULT_URL, **options: Any) -> None:
        transport = options.pop("transport", None)
        super().__init__(base_url, **options)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )

    def __enter__(self) -> ClusteringClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _do(self, call: Call) -> Any:
        for attempt in Retrying(**self._retry_options(call)):
            with attempt:
                response = self._http.request(call.method, call.path, **self._request_kwargs(call))
                return self._read(call, response)
        raise AssertionError("unreachable")

    # -- service --------------------------------------------------------------------
    def ready(self) -> bool:
        try:
            return self._http.get("/ready").status_code == 200
        except httpx.TransportError:
            return False

    def info(self) -> dict[str, Any]:
        return self._do(Call("GET", "/info"))

    # -- datasets -------------------------------------------------------------------
    def create_dataset(self, name: str) -> Dataset:
        return self._do(_Calls.create_dataset(name))

    def datasets(self) -> list[Dataset]:
        return self._do(_Calls.datasets()).datasets

    def dataset(self, dataset_id: str) -> Dataset:
        return self._do(_Calls.dataset(dataset_id))

    def dataset_by_name(self, name: str) -> Dataset | None:
        return next((d for d in self.datasets() if d.name == name), None)

    def missing_ids(self, dataset_id: str, ids: Sequence[str]) -> list[str]:
        """The ids the dataset does not hold yet (to resume an interrupted upload)."""
        missing: list[str] = []
        for start in range(0, len(ids), VECTORS_PER_REQUEST):
            chunk = list(ids[start : start + VECTORS_PER_REQUEST])
            missing += self._do(_Calls.lookup(dataset_id, chunk)).missing
        return missing

    def add_embeddings(
        self,
        dataset_id: str,
        ids: Sequence[str],
        X: np.ndarray,
        labels: Sequence[str | None] | None = None,
        *,
        batch_size: int = VECTORS_PER_REQUEST,
        on_batch: Callable[[ItemsAdded, int], None] | None = None,
    ) -> ItemsAdded:
        """Store vectors ``X`` (n, dim) under ``ids``; ``on_batch(result, n_sent)``."""
        make = _vector_items(ids, X, labels)
        return self._add_batches(dataset_id, ids, make, batch_size, on_batch)

    def add_images(
        self,
        dataset_id: str,
        images: Mapping[str, ImageInput],
        *,
        labels: Mapping[str, str] | None = None,
        batch_size: int = IMAGES_PER_REQUEST,
        on_batch: Callable[[ItemsAdded, int], None] | None = None,
    ) -> ItemsAdded:
        """Store images (``{id: bytes | path | base64}``, optional ``{id: label}``),
        embedded by the embedding service."""
        ids, make = _image_items(images, labels)
        return self._add_batches(dataset_id, ids, make, batch_size, on_batch)

    def _add_batches(
        self,
        dataset_id: str,
        ids: Sequence[str],
        make: Callable[[int], dict[str, Any]],
        batch_size: int,
        on_batch: Callable[[ItemsAdded, int], None] | None,
    ) -> ItemsAdded:
        total = ItemsAdded(added=0, duplicates=0, count=0, dim=0)
        for batch in _item_batches(ids, make, batch_size):
            result = self._do(_Calls.add_items(dataset_id, batch))
            total = ItemsAdded(
                added=total.added + result.added,
                duplicates=total.duplicates + result.duplicates,
                count=result.count,
                dim=result.dim,
            )
            if on_batch is not None:
                on_batch(result, len(batch))
        return total

    def delete_items(self, dataset_id: str, ids: Sequence[str]) -> ItemsDeleted:
        return self._do(_Calls.delete_items(dataset_id, list(ids)))

    # -- jobs -----------------------------------------------------------------------
    def algorithms(self) -> AlgorithmList:
        return self._do(_Calls.algorithms())

    def train(
        self,
        dataset_id: str,
        algorithm: str,
        *,
        model_name: str,
        n_clusters: int | None = None,
        seed: int = 0,
        params: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        body = _Calls.train_body(dataset_id, algorithm, model_name, n_clusters, seed, params)
        return self._do(_Calls.submit(body, idempotency_key))

    def update(
        self,
        model_name: str,
        *,
        dataset_id: str | None = None,
        from_version: int | None = None,
        params: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        body = _Calls.update_body(model_name, dataset_id, from_version, params)
        return self._do(_Calls.submit(body, idempotency_key))

    def job(self, job_id: str) -> Job:
        return self._do(_Calls.job(job_id))

    def jobs(
        self, state: str | None = None, model_name: str | None = None, limit: int = 100
    ) -> list[Job]:
        return self._do(_Calls.jobs(state, model_name, limit)).jobs

    def cancel(self, job_id: str) -> Job:
        return self._do(_Calls.cancel(job_id))

    def events(self, job_id: str) -> Iterator[Job]:
        """The job now and at every change, until its final state (server-sent events)."""
        with self._http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=None) as response:
            if response.status_code >= 400:
                response.read()
                raise ClusteringServiceError.from_response(response)
            yield from _sse_jobs(response.iter_lines())

    def wait(self, job_id: str, on_update: Callable[[Job], None] | None = None) -> Job:
        """Follow the job's events until it ends; the final job. Survives a dropped stream."""
        job = self.job(job_id)
        while job.state not in TERMINAL_STATES:
            try:
                for job in self.events(job_id):
                    if on_update is not None:
                        on_update(job)
            except httpx.TransportError:
                job = self._do(_Calls.job(job_id))
        return job

    # -- models ---------------------------------------------------------------------
    def models(self) -> ModelList:
        return self._do(_Calls.models())

    def model(self, name: str) -> ModelDetail:
        return self._do(_Calls.model(name))

    def version(self, name: str, version: int) -> Version:
        return self._do(_Calls.version(name, version))

    def clusters(self, name: str, version: int) -> Clusters:
        return self._do(_Calls.clusters(name, version))

    def assignments(
        self, name: str, version: int, *, cluster: int | None = None, page_size: int = 10_000
    ) -> Iterator[Assignment]:
        """Every (item id, cluster, probability) of the version, page by page."""
        cursor = None
        while True:
            page = self._do(_Calls.assignments_page(name, version, cluster, page_size, cursor))
            yield from page.items
            cursor = page.next_cursor
            if cursor is None:
                return

    def set_alias(self, name: str, alias: str, version: int) -> Alias:
        return self._do(_Calls.set_alias(name, alias, version))

    def predict(
        self,
        name: str,
        *,
        embeddings: np.ndarray | None = None,
        images: Sequence[ImageInput] | None = None,
        version: int | None = None,
        alias: str | None = None,
        probabilities: bool = False,
    ) -> Predictions:
        """Clusters of vectors (n, dim) or images, with a version, an alias or the latest."""
        body = _predict_body(embeddings, images, probabilities)
        return self._do(_Calls.predict(name, body, version, alias))


def _predict_body(
    embeddings: np.ndarray | None, images: Sequence[ImageInput] | None, probabilities: bool
) -> dict[str, Any]:
    if (embeddings is None) == (images is None):
        raise ValueError("give exactly one of embeddings= and images=")
    body: dict[str, Any] = {"return_probabilities": probabilities}
    if embeddings is not None:
        body["embeddings"] = encode_vectors(np.atleast_2d(embeddings))
    else:
        body["images"] = [encode_image(i) for i in images or ()]
    return body


class AsyncClusteringClient(_Base):
    """asyncio client with the same calls as :class:`ClusteringClient` (``await`` them)."""

    def __init__(self, base_url: str = DEFAULT_URL, **options: Any) -> None:
        transport = options.pop("transport", None)
        super().__init__(base_url, **options)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncClusteringClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _do(self, call: Call) -> Any:
        async for attempt in AsyncRetrying(**self._retry_options(call)):
            with attempt:
                response = await self._http.request(
                    call.method, call.path, **self._request_kwargs(call)
                )
                return self._read(call, response)
        raise AssertionError("unreachable")

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/ready")).status_code == 200
        except httpx.TransportError:
            return False

    async def create_dataset(self, name: str) -> Dataset:
        return await self._do(_Calls.create_dataset(name))

    async def datasets(self) -> list[Dataset]:
        return (await self._do(_Calls.datasets())).datasets

    async def dataset(self, dataset_id: str) -> Dataset:
        return await self._do(_Calls.dataset(dataset_id))

    async def add_embeddings(
        self,
        dataset_id: str,
        ids: Sequence[str],
        X: np.ndarray,
        labels: Sequence[str | None] | None = None,
        *,
        batch_size: int = VECTORS_PER_REQUEST,
    ) -> ItemsAdded:
        make = _vector_items(ids, X, labels)
        return await self._add_batches(dataset_id, ids, make, batch_size)

    async def add_images(
        self,
        dataset_id: str,
        images: Mapping[str, ImageInput],
        *,
        labels: Mapping[str, str] | None = None,
        batch_size: int = IMAGES_PER_REQUEST,
    ) -> ItemsAdded:
        ids, make = _image_items(images, labels)
        return await self._add_batches(dataset_id, ids, make, batch_size)

    async def _add_batches(
        self,
        dataset_id: str,
        ids: Sequence[str],
        make: Callable[[int], dict[str, Any]],
        batch_size: int,
    ) -> ItemsAdded:
        added = duplicates = count = dim = 0
        for batch in _item_batches(ids, make, batch_size):
            result = await self._do(_Calls.add_items(dataset_id, batch))
            added, duplicates = added + result.added, duplicates + result.duplicates
            count, dim = result.count, result.dim
        return ItemsAdded(added=added, duplicates=duplicates, count=count, dim=dim)

    async def train(
        self,
        dataset_id: str,
        algorithm: str,
        *,
        model_name: str,
        n_clusters: int | None = None,
        seed: int = 0,
        params: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        body = _Calls.train_body(dataset_id, algorithm, model_name, n_clusters, seed, params)
        return await self._do(_Calls.submit(body, idempotency_key))

    async def update(
        self,
        model_name: str,
        *,
        dataset_id: str | None = None,
        from_version: int | None = None,
        params: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        body = _Calls.update_body(model_name, dataset_id, from_version, params)
        return await self._do(_Calls.submit(body, idempotency_key))

    async def job(self, job_id: str) -> Job:
        return await self._do(_Calls.job(job_id))

    async def cancel(self, job_id: str) -> Job:
        return await self._do(_Calls.cancel(job_id))

    async def events(self, job_id: str) -> AsyncIterator[Job]:
        async with self._http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=None) as response:
            if response.status_code >= 400:
                await response.aread()
                raise ClusteringServiceError.from_response(response)
            async for line in response.aiter_lines():
                for job in _sse_jobs([line]):
                    yield job

    async def wait(self, job_id: str) -> Job:
        job = await self.job(job_id)
        while job.state not in TERMINAL_STATES:
            try:
                async for event in self.events(job_id):
                    job = event
            except httpx.TransportError:
                job = await self.job(job_id)
        return job

    async def version(self, name: str, version: int) -> Version:
        return await self._do(_Calls.version(name, version))

    async def clusters(self, name: str, version: int) -> Clusters:
        return await self._do(_Calls.clusters(name, version))

    async def assignments(
        self, name: str, version: int, *, cluster: int | None = None, page_size: int = 10_000
    ) -> list[Assignment]:
        out: list[Assignment] = []
        cursor = None
        while True:
            page = await self._do(
                _Calls.assignments_page(name, version, cluster, page_size, cursor)
            )
            out += page.items
            cursor = page.next_cursor
            if cursor is None:
                return out

    async def predict(
        self,
        name: str,
        *,
        embeddings: np.ndarray | None = None,
        images: Sequence[ImageInput] | None = None,
        version: int | None = None,
        alias: str | None = None,
        probabilities: bool = False,
    ) -> Predictions:
        body = _predict_body(embeddings, images, probabilities)
        return await self._do(_Calls.predict(name, body, version, alias))
