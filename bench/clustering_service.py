"""The clustering service's performance targets, each a comparison made in one run.

    python bench/clustering_service.py [--quick] [--json PATH] [--parts images vectors jobs predict]
        [--job-cases kmeans_cold kmeans_warm dec_warm]

* **images**: ingest of images through both services (``POST
  /v1/datasets/{id}/items``: the clustering service calls the embedding
  service, stores vectors and thumbnails) against the embedding service alone
  on the same images (``POST /v1/embeddings`` with the same batching and
  concurrency), alternating rounds. Target: ratio >= 0.90.
* **vectors**: ingest of base64 float32 vectors, 384-d, 10,000 per request, from one
  client and from two at once (alternating rounds), into
  one dataset. Target: >= 20,000 vectors/s.
* **jobs**: a 1,000,000 x 384 dataset (ingested over HTTP), then k-means and DEC
  trained as jobs by a standalone worker. A job's overhead is its run time
  minus the fit itself (the version records ``fit_seconds``, the estimator's
  ``fit`` on the in-memory array): loading the vectors from PostgreSQL (cold)
  or the worker's verified local cache (warm), assigning every item, metrics,
  saving the version and its assignments (the worker logs each stage's seconds;
  the result holds that line per job). Targets: <= 15 s cold, <= 3 s warm;
  the worker's peak RSS (VmHWM) <= 3x the data size.
* **predict**: requests/s and p50/p99 latency for 1 and 100 embeddings per
  request against a cached model. Target: p50 for one embedding <= 10 ms.

Services run as subprocesses (``python -m embedding_service --model random:small``,
the real dinov2-small architecture; ``python -m clustering_service``) on the
embedded PostgreSQL in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.e2e_throughput import photo_set  # noqa: E402
from shared.client import AsyncEmbeddingClient  # noqa: E402
from tests.support.processes import ServiceProcess  # noqa: E402

DIM = 384
BATCH = 32
CONCURRENCY = 4


def b64_rows(X: np.ndarray) -> list[str]:
    import pybase64

    X = np.ascontiguousarray(X, dtype="<f4")
    return [pybase64.b64encode(row.tobytes()).decode() for row in X]


def start_services(tmp: Path, model: str, worker: bool) -> tuple[ServiceProcess, ServiceProcess]:
    embedding = ServiceProcess(
        "embedding_service",
        "--model",
        model,
        env_prefix="EMBEDDING_",
        env={"EMBEDDING_ACCESS_LOG": "false"},
    ).start()
    embedding.wait_ready(300)
    env = {
        "CLUSTERING_EMBEDDING_URL": embedding.url,
        "CLUSTERING_DATA_DIR": str(tmp / "data"),
        "CLUSTERING_ACCESS_LOG": "false",
        "CLUSTERING_IN_PROCESS_WORKER": "true" if worker else "false",
        "CLUSTERING_EMBEDDING_BATCH_SIZE": str(BATCH),
        "CLUSTERING_EMBEDDING_CONCURRENCY": str(CONCURRENCY),
        "CLUSTERING_DEVICE": "cpu",
    }
    clustering = ServiceProcess("clustering_service", env=env, env_prefix="CLUSTERING_").start()
    if worker:
        clustering.wait_ready(120)
    return embedding, clustering


# -- images -----------------------------------------------------------------------------


async def _embed_alone(url: str, images: list[str]) -> float:
    async with AsyncEmbeddingClient(url, max_batch=BATCH, concurrency=CONCURRENCY) as client:
        start = time.perf_counter()
        await client.embed_images(images)
        return len(images) / (time.perf_counter() - start)


async def _ingest(url: str, dataset: str, images: list[str], round_: int) -> float:
    sem = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def one(start: int) -> None:
            items = [
                {"id": f"r{round_}-{start + i}", "image": image}
                for i, image in enumerate(images[start : start + BATCH])
            ]
            async with sem:
                r = await client.post(f"/v1/datasets/{dataset}/items", json={"items": items})
            r.raise_for_status()

        t0 = time.perf_counter()
        await asyncio.gather(*(one(s) for s in range(0, len(images), BATCH)))
        return len(images) / (time.perf_counter() - t0)


def bench_images(tmp: Path, quick: bool) -> dict[str, Any]:
    embedding, clustering = start_services(tmp, "random:small", worker=True)
    try:
        photos = [b64 for _, b64 in photo_set()]
        images = (photos * 8)[: 64 if quick else 128]
        dataset = httpx.post(f"{clustering.url}/v1/datasets", json={"name": "images"}).json()["id"]
        asyncio.run(_embed_alone(embedding.url, images[:BATCH]))  # warm-up
        rounds = []
        for r in range(2 if quick else 4):
            alone = asyncio.run(_embed_alone(embedding.url, images))
            both = asyncio.run(_ingest(clustering.url, dataset, images, r))
            rounds.append({"alone_images_s": alone, "ingest_images_s": both, "ratio": both / alone})
            print(
                f"  images round {r}: alone {alone:.2f}/s, ingest {both:.2f}/s, "
                f"ratio {both / alone:.3f}",
                flush=True,
            )
        ratio = statistics.median(r["ratio"] for r in rounds)
        return {"rounds": rounds, "median_ratio": ratio, "target": 0.90, "pass": ratio >= 0.90}
    finally:
        clustering.close()
        embedding.close()


# -- vectors ----------------------------------------------------------------------------


def ingest_vectors(
    url: str, dataset: str, n: int, per_request: int, seed: int, concurrency: int = 1
) -> float:
    """Send n random unit vectors in requests of ``per_request`` from ``concurrency``
    clients at once; returns vectors/s over the wall time of the sending.

    The bodies are encoded before the clock starts (four distinct blocks of vectors,
    each request's ids made unique by rewriting a fixed-width prefix), so the rate is
    the service's, not the client's encoding.
    """
    rng = np.random.default_rng(seed)
    blocks = []
    for _ in range(min(4, -(-n // per_request))):
        X = rng.standard_normal((per_request, DIM)).astype(np.float32)
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        items = [{"id": f"#######-{i}", "embedding": r} for i, r in enumerate(b64_rows(X))]
        blocks.append(json.dumps({"items": items}).encode())
    starts = list(range(0, n, per_request))

    def send(client: httpx.Client, j: int) -> None:
        body = blocks[j % len(blocks)].replace(b"#######", f"{seed % 10}r{j:05d}".encode())
        count = min(per_request, n - starts[j])
        if count < per_request:  # the last, short request: re-encode its items
            items = json.loads(body)["items"][:count]
            body = json.dumps({"items": items}).encode()
        r = client.post(
            f"/v1/datasets/{dataset}/items",
            content=body,
            headers={"content-type": "application/json"},
        )
        r.raise_for_status()

    def lane(k: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as client:
            for j in range(k, len(starts), concurrency):
                send(client, j)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(lane, k) for k in range(concurrency)]:
            future.result()
    return n / (time.perf_counter() - t0)


def bench_vectors(tmp: Path, quick: bool) -> dict[str, Any]:
    """One client sending requests one after another, then two clients at once (the
    second overlaps its request's parsing with the first's write to PostgreSQL),
    alternating, each into its own dataset."""
    embedding, clustering = start_services(tmp, "random:tiny", worker=True)
    n = 50_000 if quick else 100_000
    rates: dict[int, list[float]] = {1: [], 2: []}
    try:
        for round_ in range(3):
            for concurrency in (1, 2):
                dataset = httpx.post(
                    f"{clustering.url}/v1/datasets", json={"name": f"v{round_}-{concurrency}"}
                ).json()["id"]
                rate = ingest_vectors(clustering.url, dataset, n, 10_000, round_, concurrency)
                rates[concurrency].append(rate)
                print(f"  vectors, {concurrency} client(s): {rate:,.0f}/s", flush=True)
        best = max(statistics.median(r) for r in rates.values())
        return {
            "vectors_s_1_client": rates[1],
            "vectors_s_2_clients": rates[2],
            "median_1_client": statistics.median(rates[1]),
            "median_2_clients": statistics.median(rates[2]),
            "target": 20_000,
            "pass": best >= 20_000,
        }
    finally:
        clustering.close()
        embedding.close()


# -- jobs at 1M ---------------------------------------------------------------------------


def _run_job(url: str, body: dict[str, Any], worker: ServiceProcess) -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=600) as client:
        job = client.post("/v1/jobs", json=body).json()
        while True:
            job = client.get(f"/v1/jobs/{job['id']}").json()
            if job["state"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.2)
        assert job["state"] == "succeeded", job
        version = client.get(
            f"/v1/models/{job['result']['model_name']}/versions/{job['result']['version']}"
        ).json()
    from datetime import datetime

    run = (
        datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])
    ).total_seconds()
    # the worker logs where the job's time went: "job <id> stored ...: load 0.41 s, ..."
    stages = [line for line in worker.output().splitlines() if f"job {job['id']} stored" in line]
    return {
        "run_s": run,
        "fit_s": version["fit_seconds"],
        "overhead_s": run - version["fit_seconds"],
        "stages": stages[-1].rsplit(": ", 1)[-1] if stages else None,
    }


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return psutil.Process(pid).memory_info().rss


JOB_CASES = {
    "kmeans_cold": ("kmeans", {"n_init": 1, "max_iter": 20}),
    "kmeans_warm": ("kmeans", {"n_init": 1, "max_iter": 20}),
    "dec_warm": ("dec", {"pretrain_epochs": 1, "cluster_epochs": 1}),
}


def bench_jobs(tmp: Path, quick: bool, cases: list[str] | None = None) -> dict[str, Any]:
    n = 100_000 if quick else 1_000_000
    embedding, clustering = start_services(tmp, "random:tiny", worker=False)
    worker = ServiceProcess(
        "clustering_service",
        "worker",
        listen=False,
        env_prefix="CLUSTERING_",
        env={"CLUSTERING_DATA_DIR": str(tmp / "data"), "CLUSTERING_DEVICE": "cpu"},
    ).start()
    try:
        clustering.wait_ready(120)
        url = clustering.url
        dataset = httpx.post(f"{url}/v1/datasets", json={"name": "big"}).json()["id"]
        rate = ingest_vectors(url, dataset, n, 10_000, 1, concurrency=2)
        print(f"  ingested {n:,} vectors at {rate:,.0f}/s", flush=True)
        data_bytes = n * DIM * 4
        pid = worker.process.pid  # type: ignore[union-attr]
        results: dict[str, Any] = {"n": n, "ingest_vectors_s": rate, "data_bytes": data_bytes}
        for name in cases or list(JOB_CASES):
            algorithm, params = JOB_CASES[name]
            body = {
                "type": "train",
                "dataset_id": dataset,
                "algorithm": algorithm,
                "n_clusters": 100,
                "model_name": f"big-{name}",
                "params": params,
            }
            results[name] = _run_job(url, body, worker)
            print(f"  {name}: {results[name]}", flush=True)
        peak = _peak_rss(pid)
        results["worker_peak_rss_bytes"] = peak
        results["peak_rss_over_data"] = peak / data_bytes
        warm = [results[c]["overhead_s"] for c in ("kmeans_warm", "dec_warm") if c in results]
        results["pass"] = {"peak_rss_le_3x": peak <= 3 * data_bytes}
        if "kmeans_cold" in results:
            results["pass"]["cold_overhead_le_15s"] = results["kmeans_cold"]["overhead_s"] <= 15
        if warm:
            results["pass"]["warm_overhead_le_3s"] = max(warm) <= 3
        return results
    finally:
        worker.close()
        clustering.close()
        embedding.close()


# -- predict ------------------------------------------------------------------------------


def bench_predict(tmp: Path, quick: bool) -> dict[str, Any]:
    embedding, clustering = start_services(tmp, "random:tiny", worker=True)
    try:
        url = clustering.url
        dataset = httpx.post(f"{url}/v1/datasets", json={"name": "p"}).json()["id"]
        ingest_vectors(url, dataset, 20_000, 10_000, 2)
        results: dict[str, Any] = {}
        for algorithm, params in (("kmeans", {}), ("dec", {"pretrain_epochs": 5})):
            body = {
                "type": "train",
                "dataset_id": dataset,
                "algorithm": algorithm,
                "n_clusters": 50,
                "model_name": f"p-{algorithm}",
                "params": params,
            }
            _run_job(url, body, 0)
            rng = np.random.default_rng(3)
            for rows in (1, 100):
                X = rng.standard_normal((rows, DIM)).astype(np.float32)
                payload = json.dumps({"embeddings": b64_rows(X)}).encode()
                latencies = []
                with httpx.Client(base_url=url, timeout=60) as client:
                    path = f"/v1/models/p-{algorithm}/predict"
                    headers = {"content-type": "application/json"}
                    for _ in range(20):  # warm: model loaded and cached
                        client.post(path, content=payload, headers=headers).raise_for_status()
                    count = 200 if quick else 1000
                    t0 = time.perf_counter()
                    for _ in range(count):
                        s = time.perf_counter()
                        client.post(path, content=payload, headers=headers).raise_for_status()
                        latencies.append(time.perf_counter() - s)
                    total = time.perf_counter() - t0
                ms = np.array(latencies) * 1000
                key = f"{algorithm}_{rows}"
                results[key] = {
                    "requests_s": count / total,
                    "p50_ms": float(np.percentile(ms, 50)),
                    "p99_ms": float(np.percentile(ms, 99)),
                }
                print(f"  predict {key}: {results[key]}", flush=True)
        results["pass"] = all(results[f"{a}_1"]["p50_ms"] <= 10 for a in ("kmeans", "dec"))
        return results
    finally:
        clustering.close()
        embedding.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes (100k instead of 1M)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--parts", nargs="+", default=["images", "vectors", "jobs", "predict"])
    p.add_argument(
        "--job-cases",
        nargs="+",
        choices=list(JOB_CASES),
        help="jobs part: only these jobs (default: all, in this order; a warm job needs a "
        "job before it)",
    )
    args = p.parse_args()
    results: dict[str, Any] = {
        "machine": {
            "cpus": psutil.cpu_count(),
            "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(),
        }
    }
    parts = {
        "images": bench_images,
        "vectors": bench_vectors,
        "jobs": functools.partial(bench_jobs, cases=args.job_cases),
        "predict": bench_predict,
    }
    for part in args.parts:
        print(f"{part}:", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            results[part] = parts[part](Path(tmp), args.quick)
            _stop_embedded(Path(tmp) / "data" / "postgres")
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


def _stop_embedded(pgdata: Path) -> None:
    import os
    import signal

    pid_file = pgdata / "postmaster.pid"
    if pid_file.exists():
        os.kill(int(pid_file.read_text().split()[0]), signal.SIGINT)
        time.sleep(1)


if __name__ == "__main__":
    main()
