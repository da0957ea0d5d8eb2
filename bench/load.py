"""Bounded load tests of both services on loopback: concurrency, backpressure, memory.

    python bench/load.py [--quick] [--json PATH] [--model random:small] [--clients 64]
        [--duration S] [--max-requests N] [--levels 16 64 256]
        [--parts embeddings predict ingest pressure]

Real services in subprocesses (``python -m embedding_service --model MODEL``;
``python -m clustering_service`` on an embedded PostgreSQL in a temporary
directory; a second embedding service with a small queue for ``pressure``),
then, each for a fixed duration and at most a fixed number of requests:

* **embeddings**: ``--clients`` concurrent clients on ``POST /v1/embeddings``,
  4 real photographs (640x480 to 2048x1536 JPEGs) per request.
* **predict**: ``--clients`` concurrent clients on ``POST
  /v1/models/{name}/predict`` against the model trained in ``ingest``, with one
  embedding per request, then with one image per request (embedded by the
  embedding service on the way).
* **ingest**: a DEC training job on a seeded dataset; while it runs, 16
  clients add batches of images and vectors to the same dataset. The job must
  succeed, every ingest answer be a 200, and every item sent be stored (the
  dataset's count, every id's ``added``, and a sample of ids read back).
* **pressure**: the small-queue embedding service (``max_queue_images`` 32
  and a 32 MiB budget of request bytes) under 16, 64 and 256 clients sending
  8 camera-size photos per request (3.7 MB bodies) without pausing after a
  429: most requests are refused. The service's peak RSS must not grow with
  the clients beyond what a connection costs while its body streams in
  (1 MiB each): a refused request is refused before its body is parsed or
  any image decoded, and its body is dropped as it arrives.

Every answer must be a 200 or, from the embedding service, a 429
``overloaded`` with a ``Retry-After`` header; anything else (a 5xx, a 503
from the clustering service, a timeout, a dropped connection) is a failure,
counted and shown. Per scenario: requests, status counts, p50/p99 latency
(of the 200s), throughput, and the peak RSS of each service process (psutil,
sampled every 20 ms, and the kernel's VmHWM at the end). The machine's load
average is recorded with the numbers: on a shared machine they move with it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import io
import json
import os
import platform
import shutil
import ssl
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.processes import ServiceProcess, private_dir, stop_postmaster  # noqa: E402

#: Answers a client under load may get: 200, and 429 with Retry-After (embedding service).
ALLOWED = frozenset({200, 429})
#: The pressure scenario's embedding service: queue and request size kept small so
#: that a few clients fill the queue (the default queue is 1024 images).
PRESSURE_QUEUE_IMAGES = 32
PRESSURE_IMAGES_PER_REQUEST = 8
#: ... and bodies of at most 16 MiB, at most 32 MiB of them at once (4 requests of 8
#: camera photos): the byte budget is full at every level, so the peak RSS must not
#: move from level to level.
PRESSURE_REQUEST_BYTES = 16 * 2**20
PRESSURE_PENDING_BYTES = 32 * 2**20
#: Largest allowed growth of the pressure service's peak RSS from the first level to
#: the last, per client added: what a connection may cost while its body streams in
#: (asyncio reads up to 256 KiB per socket per loop turn, h11 buffers it, uvicorn
#: queues up to 64 KiB more for the app). Measured: 0.37-0.55 MiB per added client.
#: A refused request that held its body would cost ~7 MB (3.7 MB of base64, parsed
#: once more), and with its decoded images ~9 MB more per camera photo.
PRESSURE_RSS_PER_CLIENT = 2**20


def pressure_growth_limit(levels: Sequence[int]) -> int:
    """Bytes the pressure service's peak RSS may grow by from ``levels[0]`` to ``levels[-1]``."""
    return (levels[-1] - levels[0]) * PRESSURE_RSS_PER_CLIENT


# -- measurements -------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one scenario's clients saw."""

    requests: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, 200s only
    failures: list[str] = field(default_factory=list)  # the first few, for the report
    missing_retry_after: int = 0
    elapsed: float = 0.0

    def record(self, status: str, seconds: float, detail: str = "") -> None:
        self.requests += 1
        self.statuses[status] += 1
        if status == "200":
            self.latencies.append(seconds)
        elif not (status == "429" and not detail) and len(self.failures) < 5:
            self.failures.append(f"{status}: {detail[:300]}")

    @property
    def bad(self) -> int:
        """Answers that are neither a 200 nor a 429 with Retry-After."""
        allowed = sum(n for s, n in self.statuses.items() if s.isdigit() and int(s) in ALLOWED)
        return self.requests - allowed + self.missing_retry_after

    def summary(self) -> dict[str, Any]:
        ms = np.array(self.latencies) * 1000
        ok = self.statuses.get("200", 0)
        return {
            "requests": self.requests,
            "statuses": dict(sorted(self.statuses.items())),
            "bad": self.bad,
            "missing_retry_after": self.missing_retry_after,
            "failures": self.failures,
            "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None,
            "ok_per_s": round(ok / self.elapsed, 1) if self.elapsed else None,
            "requests_per_s": round(self.requests / self.elapsed, 1) if self.elapsed else None,
            "seconds": round(self.elapsed, 1),
        }


class RssSampler:
    """Samples the RSS of named processes on a thread; ``window()`` gives the peak in a span."""

    def __init__(self, pids: dict[str, int], interval: float = 0.02) -> None:
        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.interval = interval
        self.current = dict.fromkeys(pids, 0)
        self._peaks: list[dict[str, int]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        for name, process in self.processes.items():
            with contextlib.suppress(psutil.Error):
                rss = process.memory_info().rss
                with self._lock:
                    self.current[name] = rss
                    for peaks in self._peaks:
                        peaks[name] = max(peaks[name], rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    @contextlib.contextmanager
    def window(self, into: dict[str, Any]) -> Iterator[None]:
        """Fills ``into`` with each process's RSS before and its peak during the block (MB)."""
        self._sample()
        with self._lock:
            before = dict(self.current)
            peaks = dict(before)
            self._peaks.append(peaks)
        try:
            yield
        finally:
            self._sample()
            with self._lock:
                self._peaks.remove(peaks)
            into.update(
                {
                    name: {"before_mb": _mb(before[name]), "peak_mb": _mb(peaks[name])}
                    for name in before
                }
            )

    def high_water(self) -> dict[str, float]:
        """Each process's peak RSS since it started (the kernel's VmHWM), MB."""
        out = {}
        for name, process in self.processes.items():
            with contextlib.suppress(OSError, psutil.Error):
                for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        out[name] = _mb(int(line.split()[1]) * 1024)
        return out


def _mb(n: int) -> float:
    return round(n / 2**20, 1)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- the client loop ------------------------------------------------------------------------


async def hammer(
    url: str,
    path: str | Callable[[int], str],
    bodies: Sequence[bytes],
    *,
    clients: int,
    duration: float,
    max_requests: int,
    timeout: float = 300.0,
) -> Outcome:
    """``clients`` connections posting ``bodies`` round robin for ``duration`` seconds or
    ``max_requests`` requests, whichever ends first. No pause after a 429: the clients
    behave as badly as they can, so the server's backpressure carries the load."""
    outcome = Outcome()
    issued = 0
    headers = {"content-type": "application/json"}
    # One connection per client, each in its own pool: a request through httpx's pool
    # costs time linear in the pool's connections, which made 64 clients sharing one
    # pool spend 4x the CPU of the server they measured. The clients share one TLS
    # context (httpx builds one per client otherwise, ~40 ms of CPU each; unused here).
    # Idle connections are dropped after 2 s, before the server's keep-alive timeout
    # (uvicorn: 5 s, httpx's default expiry too): an overloaded client reusing a
    # connection just as the server closed it saw ReadError, a race of the client's.
    tls = ssl.create_default_context()
    one = httpx.Limits(max_connections=1, keepalive_expiry=2.0)
    async with contextlib.AsyncExitStack() as stack:
        pool = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=url, timeout=timeout, limits=one, verify=tls)
            )
            for _ in range(clients)
        ]

        async def client(http: httpx.AsyncClient) -> None:
            nonlocal issued
            while time.perf_counter() < deadline and issued < max_requests:
                k = issued
                issued += 1
                target = path(k) if callable(path) else path
                started = time.perf_counter()
                try:
                    r = await http.post(target, content=bodies[k % len(bodies)], headers=headers)
                except httpx.HTTPError as exc:
                    outcome.record(type(exc).__name__, 0.0, str(exc))
                    continue
                seconds = time.perf_counter() - started
                detail = "" if r.status_code in (200, 429) else r.text
                if r.status_code == 429 and not r.headers.get("retry-after", "").isdigit():
                    outcome.missing_retry_after += 1
                    detail = "no Retry-After: " + r.text
                outcome.record(str(r.status_code), seconds, detail)

        start = time.perf_counter()
        deadline = start + duration
        await asyncio.gather(*(client(http) for http in pool))
        outcome.elapsed = time.perf_counter() - start
    return outcome


# -- inputs ---------------------------------------------------------------------------------


@functools.cache
def photos(sizes: tuple[tuple[int, int], ...]) -> list[str]:
    """Base64 JPEGs of real photographs (scikit-learn's and scikit-image's) at ``sizes``."""
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    sources = [
        *load_sample_images().images,
        skimage.data.astronaut(),
        skimage.data.coffee(),
        skimage.data.chelsea(),
    ]
    out = []
    for i, size in enumerate(sizes):
        buffer = io.BytesIO()
        image = Image.fromarray(sources[i % len(sources)]).resize(size, Image.Resampling.BICUBIC)
        image.save(buffer, "JPEG", quality=88)
        out.append(base64.b64encode(buffer.getvalue()).decode())
    return out


WEB_SIZES = ((640, 480), (480, 640), (800, 600), (640, 427), (1024, 768))
CAMERA_SIZES = ((2048, 1536), (1536, 2048), (1600, 1200))


def blobs(n: int, dim: int, k: int, seed: int) -> np.ndarray:
    """``n`` unit vectors around ``k`` random centres, float32 (n, dim)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim))
    X = centres[rng.integers(k, size=n)] + 0.4 * rng.standard_normal((n, dim))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32)


def b64_vector(row: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(row, dtype="<f4").tobytes()).decode()


def _json(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


# -- scenarios ------------------------------------------------------------------------------


@dataclass
class Plan:
    """Sizes of one run."""

    clients: int = 64
    images_per_request: int = 4
    duration: float = 60.0
    max_requests: int = 20_000
    levels: tuple[int, ...] = (16, 64, 256)
    level_duration: float = 20.0
    seed_items: int = 20_000
    ingest_clients: int = 16
    ingest_min_batches: int = 64
    ingest_max_batches: int = 2_000
    train_params: dict[str, Any] = field(
        default_factory=lambda: {"pretrain_epochs": 20, "cluster_epochs": 10}
    )

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            duration=3.0,
            max_requests=2_000,
            level_duration=2.5,
            seed_items=1_500,
            ingest_min_batches=16,
            ingest_max_batches=200,
            train_params={"hidden_dims": [64, 64], "pretrain_epochs": 30, "cluster_epochs": 10},
        )


def scenario_embeddings(url: str, sampler: RssSampler, plan: Plan) -> dict[str, Any]:
    images = photos(WEB_SIZES + CAMERA_SIZES[:1])
    n = plan.images_per_request
    bodies = [
        _json({"images": [images[(i + j) % len(images)] for j in range(n)], "encoding": "base64"})
        for i in range(len(images))
    ]
    result: dict[str, Any] = {"clients": plan.clients, "images_per_request": n}
    with sampler.window(result.setdefault("rss", {})):
        outcome = asyncio.run(
            hammer(
                url,
                "/v1/embeddings",
                bodies,
                clients=plan.clients,
                duration=plan.duration,
                max_requests=plan.max_requests,
            )
        )
    result.update(outcome.summary(), load_average=load_average())
    return result


def scenario_ingest(
    clustering_url: str, dim: int, sampler: RssSampler, plan: Plan, model: str
) -> dict[str, Any]:
    """Train on a dataset while clients add images and vectors to it."""
    http = httpx.Client(base_url=clustering_url, timeout=300)
    r = http.post("/v1/datasets", json={"name": f"load-{int(time.time() * 1000)}"})
    r.raise_for_status()
    dataset = r.json()["id"]
    X = blobs(plan.seed_items, dim, 10, seed=0)
    for start in range(0, len(X), 5_000):
        items = [
            {"id": f"seed-{start + i}", "embedding": b64_vector(row)}
            for i, row in enumerate(X[start : start + 5_000])
        ]
        http.post(f"/v1/datasets/{dataset}/items", json={"items": items}).raise_for_status()
    job = http.post(
        "/v1/jobs",
        json={
            "type": "train",
            "dataset_id": dataset,
            "algorithm": "dec",
            "n_clusters": 10,
            "model_name": model,
            "params": plan.train_params,
        },
    )
    job.raise_for_status()
    job_id = job.json()["id"]
    while (state := http.get(f"/v1/jobs/{job_id}").json()["state"]) == "queued":
        time.sleep(0.05)

    images = photos(WEB_SIZES)
    extra = blobs(plan.ingest_max_batches * 24, dim, 10, seed=1)
    job_done = threading.Event()

    def batch_body(b: int) -> bytes:
        items: list[dict[str, Any]] = [
            {"id": f"b{b}-img{j}", "image": images[(b + j) % len(images)]} for j in range(2)
        ]
        items += [
            {"id": f"b{b}-vec{j}", "embedding": b64_vector(extra[b * 24 + j])} for j in range(24)
        ]
        return _json({"items": items})

    bodies = [batch_body(b) for b in range(plan.ingest_max_batches)]
    added: list[int] = []
    overlap = 0

    async def run() -> Outcome:
        nonlocal overlap
        outcome = Outcome()
        sent = 0
        async with httpx.AsyncClient(base_url=clustering_url, timeout=300) as client:

            async def one_client() -> None:
                nonlocal sent, overlap
                while sent < plan.ingest_max_batches and (
                    not job_done.is_set() or sent < plan.ingest_min_batches
                ):
                    b = sent
                    sent += 1
                    started = time.perf_counter()
                    try:
                        r = await client.post(
                            f"/v1/datasets/{dataset}/items",
                            content=bodies[b],
                            headers={"content-type": "application/json"},
                        )
                    except httpx.HTTPError as exc:
                        outcome.record(type(exc).__name__, 0.0, str(exc))
                        continue
                    outcome.record(
                        str(r.status_code),
                        time.perf_counter() - started,
                        "" if r.status_code == 200 else r.text,
                    )
                    if r.status_code == 200:
                        added.append(r.json()["added"])
                        overlap += not job_done.is_set()

            t0 = time.perf_counter()
            await asyncio.gather(*(one_client() for _ in range(plan.ingest_clients)))
            outcome.elapsed = time.perf_counter() - t0
        return outcome

    def watch_job() -> None:
        while http.get(f"/v1/jobs/{job_id}").json()["state"] in ("queued", "running"):
            time.sleep(0.05)
        job_done.set()

    result: dict[str, Any] = {"clients": plan.ingest_clients, "items_per_request": 26}
    watcher = threading.Thread(target=watch_job, daemon=True)
    watcher.start()
    with sampler.window(result.setdefault("rss", {})):
        outcome = asyncio.run(run())
        watcher.join()
    final = http.get(f"/v1/jobs/{job_id}").json()
    sent = outcome.requests
    count = http.get(f"/v1/datasets/{dataset}").json()["count"]
    expected = plan.seed_items + 26 * outcome.statuses.get("200", 0)
    sample = np.random.default_rng(0).choice(sent, size=min(sent, 20), replace=False)
    unreadable = [
        item_id
        for b in sample
        for item_id in (f"b{b}-img0", f"b{b}-vec{b % 24}")
        if http.get(f"/v1/datasets/{dataset}/items/{item_id}").status_code != 200
    ]
    http.close()
    result.update(
        outcome.summary(),
        job_state_at_start=state,
        job_state=final["state"],
        job_error=final.get("error"),
        batches_while_training=overlap,
        items_added=sum(added),
        items_sent_ok=26 * len(added),
        dataset_count=count,
        dataset_count_expected=expected,
        unreadable_items=unreadable,
        load_average=load_average(),
    )
    result["pass"] = (
        outcome.bad == 0
        and final["state"] == "succeeded"
        and overlap > 0
        and count == expected
        and sum(added) == 26 * len(added)
        and not unreadable
    )
    return result


def scenario_predict(
    clustering_url: str, dim: int, model: str, sampler: RssSampler, plan: Plan
) -> dict[str, Any]:
    X = blobs(256, dim, 10, seed=2)
    images = photos(WEB_SIZES)
    sources = {
        "embeddings": [_json({"embeddings": [b64_vector(row)]}) for row in X],
        "images": [_json({"images": [image]}) for image in images],
    }
    out: dict[str, Any] = {}
    for source, bodies in sources.items():
        result: dict[str, Any] = {"clients": plan.clients, "rows_per_request": 1}
        with sampler.window(result.setdefault("rss", {})):
            outcome = asyncio.run(
                hammer(
                    clustering_url,
                    f"/v1/models/{model}/predict",
                    bodies,
                    clients=plan.clients,
                    duration=plan.duration,
                    max_requests=plan.max_requests,
                )
            )
        result.update(outcome.summary(), load_average=load_average())
        out[source] = result
    return out


def scenario_pressure(url: str, sampler: RssSampler, plan: Plan) -> dict[str, Any]:
    """Growing client counts on a small queue; the service's peak RSS per level."""
    images = photos(CAMERA_SIZES)
    n = PRESSURE_IMAGES_PER_REQUEST
    bodies = [
        _json({"images": [images[(i + j) % len(images)] for j in range(n)]}) for i in range(3)
    ]
    levels: dict[str, Any] = {}
    for clients in plan.levels:
        result: dict[str, Any] = {"clients": clients, "images_per_request": n}
        with sampler.window(result.setdefault("rss", {})):
            outcome = asyncio.run(
                hammer(
                    url,
                    "/v1/embeddings",
                    bodies,
                    clients=clients,
                    duration=plan.level_duration,
                    max_requests=plan.max_requests,
                )
            )
        result.update(outcome.summary(), load_average=load_average())
        levels[str(clients)] = result
    peaks = [levels[str(c)]["rss"]["embedding_pressure"]["peak_mb"] for c in plan.levels]
    growth = peaks[-1] - peaks[0]
    rejected = sum(levels[str(c)]["statuses"].get("429", 0) for c in plan.levels)
    return {
        "max_queue_images": PRESSURE_QUEUE_IMAGES,
        "max_pending_bytes": PRESSURE_PENDING_BYTES,
        "body_bytes": [len(b) for b in bodies],
        "levels": levels,
        "peak_rss_mb": peaks,
        "rss_growth_mb": round(growth, 1),
        "rss_growth_limit_mb": _mb(pressure_growth_limit(plan.levels)),
        "rejected_429": rejected,
        "pass": growth <= _mb(pressure_growth_limit(plan.levels))
        and rejected > 0
        and all(levels[str(c)]["bad"] == 0 for c in plan.levels),
    }


# -- the run --------------------------------------------------------------------------------


@dataclass
class Services:
    """The URLs and process ids a run needs (started here, or given by a test)."""

    embedding_url: str
    clustering_url: str
    pressure_url: str
    pids: dict[str, int]


def run(services: Services, plan: Plan, parts: Sequence[str]) -> dict[str, Any]:
    """Every scenario in ``parts`` against running services; ``pass`` per scenario."""
    dim = httpx.get(f"{services.embedding_url}/info", timeout=30).json()["dim"]
    model = f"load-{int(time.time() * 1000)}"
    results: dict[str, Any] = {"load_average_before": load_average()}
    with RssSampler(services.pids) as sampler:
        if "embeddings" in parts:
            print("embeddings:", flush=True)
            t0 = time.perf_counter()
            results["embeddings"] = r = scenario_embeddings(services.embedding_url, sampler, plan)
            r["wall_s"] = round(time.perf_counter() - t0, 1)
            r["pass"] = r["bad"] == 0 and r["statuses"].get("200", 0) > 0
            print(f"  {_line(r)}", flush=True)
        if "ingest" in parts or "predict" in parts:
            print("ingest while training:", flush=True)
            t0 = time.perf_counter()
            results["ingest"] = r = scenario_ingest(
                services.clustering_url, dim, sampler, plan, model
            )
            r["wall_s"] = round(time.perf_counter() - t0, 1)
            print(f"  {_line(r)}; job {r['job_state']}, "
                  f"{r['batches_while_training']} batches while it ran", flush=True)  # fmt: skip
        if "predict" in parts and results["ingest"]["job_state"] == "succeeded":
            print("predict:", flush=True)
            results["predict"] = p = scenario_predict(
                services.clustering_url, dim, model, sampler, plan
            )
            for source, r in p.items():
                r["pass"] = r["bad"] == 0 and r["statuses"].get("200", 0) > 0
                print(f"  {source}: {_line(r)}", flush=True)
        if "pressure" in parts:
            print("pressure:", flush=True)
            t0 = time.perf_counter()
            results["pressure"] = r = scenario_pressure(services.pressure_url, sampler, plan)
            r["wall_s"] = round(time.perf_counter() - t0, 1)
            for clients, level in r["levels"].items():
                print(f"  {clients} clients: {_line(level)}", flush=True)
            print(f"  peak RSS {r['peak_rss_mb']} MB, growth {r['rss_growth_mb']} MB", flush=True)
        results["peak_rss_mb"] = sampler.high_water()
    results["load_average_after"] = load_average()
    return results


def failures(results: dict[str, Any]) -> list[str]:
    """The scenarios that did not pass (empty: every invariant held)."""
    bad = []
    for name in ("embeddings", "ingest", "pressure"):
        if name in results and not results[name]["pass"]:
            bad.append(name)
    for source, r in results.get("predict", {}).items():
        if not r["pass"]:
            bad.append(f"predict/{source}")
    return bad


def _line(r: dict[str, Any]) -> str:
    return (
        f"{r['requests']} requests {r['statuses']} in {r['seconds']} s, "
        f"p50 {r['p50_ms']} ms p99 {r['p99_ms']} ms, {r['ok_per_s']} ok/s, peak rss "
        + ", ".join(f"{k} {v['peak_mb']} MB" for k, v in r["rss"].items())
    )


def pressure_service(model: str) -> ServiceProcess:
    """The embedding service of the pressure scenario (small queue and byte budget), unstarted."""
    return ServiceProcess(
        "embedding_service",
        "--model",
        model,
        env_prefix="EMBEDDING_",
        env={
            "EMBEDDING_ACCESS_LOG": "false",
            "EMBEDDING_LOG_LEVEL": "warning",
            "EMBEDDING_MAX_QUEUE_IMAGES": str(PRESSURE_QUEUE_IMAGES),
            "EMBEDDING_MAX_IMAGES_PER_REQUEST": str(PRESSURE_IMAGES_PER_REQUEST),
            "EMBEDDING_MAX_REQUEST_BYTES": str(PRESSURE_REQUEST_BYTES),
            "EMBEDDING_MAX_PENDING_BYTES": str(PRESSURE_PENDING_BYTES),
        },
    )


@contextlib.contextmanager
def start_services(model: str) -> Iterator[Services]:
    """Both services and the small-queue embedding service, stopped afterwards."""
    data = private_dir("dinocluster-load-")
    quiet = {"EMBEDDING_ACCESS_LOG": "false", "EMBEDDING_LOG_LEVEL": "warning"}
    embedding = ServiceProcess(
        "embedding_service", "--model", model, env_prefix="EMBEDDING_", env=quiet
    )
    pressure = pressure_service(model)
    clustering = ServiceProcess(
        "clustering_service",
        env_prefix="CLUSTERING_",
        env={
            "CLUSTERING_EMBEDDING_URL": embedding.url,
            "CLUSTERING_DATA_DIR": str(data),
            "CLUSTERING_ACCESS_LOG": "false",
            "CLUSTERING_DEVICE": "cpu",
        },
    )
    try:
        for process in (embedding, pressure, clustering):
            process.start()
        for process in (embedding, pressure, clustering):
            process.wait_ready(300)
        pids = {
            "embedding": embedding.process.pid,  # type: ignore[union-attr]
            "clustering": clustering.process.pid,  # type: ignore[union-attr]
            "embedding_pressure": pressure.process.pid,  # type: ignore[union-attr]
        }
        yield Services(embedding.url, clustering.url, pressure.url, pids)
    finally:
        for process in (clustering, pressure, embedding):
            process.close()
        stop_postmaster(data / "postgres")
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few seconds per scenario")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--model", default="random:small", help="the embedding services' model")
    p.add_argument("--clients", type=int, help="concurrent clients (default 64)")
    p.add_argument("--duration", type=float, help="seconds per scenario")
    p.add_argument("--max-requests", type=int, help="most requests per scenario")
    p.add_argument("--levels", type=int, nargs="+", help="client counts of the pressure test")
    p.add_argument("--parts", nargs="+", default=["embeddings", "ingest", "predict", "pressure"])
    args = p.parse_args()
    plan = Plan.quick() if args.quick else Plan()
    for name in ("clients", "duration", "max_requests"):
        if getattr(args, name) is not None:
            setattr(plan, name, getattr(args, name))
    if args.levels:
        plan.levels = tuple(args.levels)
    machine = {
        "cpus": psutil.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
    }
    with start_services(args.model) as services:
        results = {"machine": machine, "model": args.model, **run(services, plan, args.parts)}
    results["failures"] = failures(results)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    sys.exit(1 if results["failures"] else 0)


if __name__ == "__main__":
    main()
