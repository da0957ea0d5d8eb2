"""End-to-end throughput of the embedding service against the bare model.

    python bench/e2e_throughput.py [--quick] [--json PATH] [--model random:small]
        [--batch-size 8] [--clients 4] [--images-per-request 8] [--num-threads N]
        [--preprocess-workers N] [--duration S] [--rounds R]

In one run, alternating so both see the same machine load:

* **bare**: ``backend.forward`` on ready-made uint8 crops, batches of
  ``--batch-size``, in this process with ``--num-threads`` torch threads;
* **http**: ``python -m embedding_service`` in a subprocess with the same
  model, batch size and torch threads, fed by ``--clients`` concurrent
  clients sending base64 JPEG photos (real photographs at 640x480-ish and
  larger camera sizes) and reading base64 vectors back. The service decodes,
  resizes and crops every image, batches and runs the model.

The figure of merit is http images/s divided by bare images/s (target >= 0.90):
what the serving layer (HTTP, JSON, base64, decoding, resizing, batching)
costs on top of the model. Request bodies are serialised once up front so the
clients spend as little CPU as possible; on a small machine they still share
the CPU with the server.

On a machine shared with other work, wall-clock figures swing with the load
from one window to the next. Each round therefore also reports images per CPU
second (bare: this process; http: server and clients together), which depends
far less on what else runs: its ratio is the CPU the serving layer adds.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embedding_service.config import available_cpus  # noqa: E402
from embedding_service.model import load_backend  # noqa: E402
from embedding_service.preprocess import PreprocessConfig, preprocess_base64  # noqa: E402


def photo_set() -> list[tuple[str, str]]:
    """(description, base64 JPEG) of real photographs at realistic camera sizes."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    sources = {
        "china": load_sample_images().images[0],
        "flower": load_sample_images().images[1],
        "astronaut": skimage.data.astronaut(),
        "coffee": skimage.data.coffee(),
        "chelsea": skimage.data.chelsea(),
        "rocket": skimage.data.rocket(),
    }
    # Mostly 640x480-class web photos, some phone/camera sized ones.
    sizes = [(640, 480), (480, 640), (800, 600), (640, 427), (1600, 1200), (2048, 1536)]
    out = []
    for i, (name, array) in enumerate(sources.items()):
        image = Image.fromarray(array)
        for j, size in enumerate(sizes):
            if (i + j) % 2:  # 18 of the 36 combinations, every size and every photo
                continue
            buffer = io.BytesIO()
            image.resize(size, Image.Resampling.LANCZOS).save(buffer, "JPEG", quality=88)
            out.append(
                (f"{name}@{size[0]}x{size[1]}", base64.b64encode(buffer.getvalue()).decode())
            )
    return out


# --- bare model ----------------------------------------------------------------------


def bare_throughput(
    backend: Any, crops: np.ndarray, batch_size: int, duration: float
) -> dict[str, float]:
    """Images/s of ``backend.forward`` on full batches over about ``duration`` seconds,
    and images per CPU second of this process (nothing else runs in it meanwhile).

    Runs on its own thread, as the service's model worker does: torch's
    intra-op thread team belongs to the calling thread, and on a loaded small
    machine the main thread's team ran the same forward up to 2.7x slower than
    a worker thread's (see docs/benchmarks/e2e.md), which would flatter the service.
    """
    with ThreadPoolExecutor(1) as worker:
        return worker.submit(_bare, backend, crops, batch_size, duration).result()


def _bare(backend: Any, crops: np.ndarray, batch_size: int, duration: float) -> dict[str, float]:
    batches = [crops[i : i + batch_size] for i in range(0, len(crops) - batch_size + 1, batch_size)]
    backend.forward(batches[0])
    done, started, cpu, i = 0, time.perf_counter(), process_cpu(), 0
    while True:
        backend.forward(batches[i % len(batches)])
        done += batch_size
        i += 1
        elapsed = time.perf_counter() - started
        if elapsed >= duration:
            return {
                "images_per_s": done / elapsed,
                "images_per_cpu_s": done / (process_cpu() - cpu),
            }


def process_cpu(pid: int | None = None) -> float:
    """CPU seconds (user + system, all threads) used so far by a process."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


# --- through HTTP ----------------------------------------------------------------------


class Server:
    def __init__(self, args: argparse.Namespace, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log")  # noqa: SIM115
        cmd = [
            sys.executable, "-m", "embedding_service", "--host", "127.0.0.1", "--port", str(port),
            "--model", args.model, "--batch-size", str(args.batch_size),
            "--num-threads", str(args.num_threads),
            "--preprocess-workers", str(args.preprocess_workers),
            "--log-level", "warning", "--no-access-log",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDDING_")}
        self.process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=self.log)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{Path(self.log.name).read_text()}")
            try:
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server not ready")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def http_throughput(
    server: Server,
    bodies: list[bytes],
    per_request: int,
    clients: int,
    warmup: float,
    duration: float,
) -> dict[str, float]:
    """Images/s answered to ``clients`` concurrent clients over a ``duration`` s window,
    and images per CPU second of the server and the clients together."""
    url = server.url
    start = time.perf_counter() + warmup
    stop = start + duration
    counted = [0] * clients
    latencies: list[float] = []
    errors: list[str] = []

    def client(c: int) -> None:
        headers = {"content-type": "application/json"}
        with httpx.Client(base_url=url, timeout=600) as http:
            i = c
            while True:
                sent = time.perf_counter()
                if sent >= stop:
                    return
                response = http.post(
                    "/v1/embeddings", content=bodies[i % len(bodies)], headers=headers
                )
                done = time.perf_counter()
                if response.status_code != 200:
                    errors.append(response.text[:200])
                    return
                i += clients
                # Only answers that fall inside the window count (images finished in it).
                if start <= done <= stop:
                    counted[c] += per_request
                    latencies.append(done - sent)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    # Images through the model in the same window, read from the service's own
    # metrics: not quantised by whole requests like the answered count.
    time.sleep(max(0.0, start - time.perf_counter()))
    modelled = -server_metrics(url).get("embedding_batch_size_sum", 0.0)
    cpu = -process_cpu(server.process.pid) - process_cpu()
    time.sleep(max(0.0, stop - time.perf_counter()))
    cpu += process_cpu(server.process.pid) + process_cpu()
    modelled += server_metrics(url).get("embedding_batch_size_sum", 0.0)
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"requests failed: {errors[:3]}")
    return {
        "images_per_s": sum(counted) / duration,
        "model_images_per_s": modelled / duration,
        "images_per_cpu_s": modelled / cpu,
        "request_latency_p50_s": statistics.median(latencies) if latencies else float("nan"),
    }


def server_metrics(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("embedding_") and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one 20 s round (default: 5 x 30 s)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--model", default="random:small", help="default: dinov2-small arch")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--images-per-request", type=int, default=8)
    parser.add_argument("--num-threads", type=int, default=available_cpus())
    parser.add_argument("--preprocess-workers", type=int, default=available_cpus())
    parser.add_argument("--duration", type=float, help="seconds per measurement window")
    parser.add_argument("--rounds", type=int, help="bare/http pairs (the median is reported)")
    parser.add_argument("--port", type=int, default=18461)
    args = parser.parse_args()
    duration = args.duration or (20.0 if args.quick else 30.0)
    rounds = args.rounds or (1 if args.quick else 5)

    load_before = os.getloadavg()
    photos = photo_set()
    encoded = [b64 for _, b64 in photos]
    k = args.images_per_request
    bodies = [
        json.dumps({"images": [encoded[(i + j) % len(encoded)] for j in range(k)],
                    "encoding": "base64"}).encode()
        for i in range(len(encoded))
    ]  # fmt: skip
    cfg = PreprocessConfig()
    crops = np.stack([preprocess_base64(b64, cfg, i) for i, b64 in enumerate(encoded)])
    crops = np.concatenate([crops] * max(1, -(-4 * args.batch_size // len(crops))))

    backend = load_backend(args.model, device="cpu", num_threads=args.num_threads)
    server = Server(args, args.port)
    try:
        server.wait_ready()
        # One untimed pass each, so caches and thread pools are warm.
        bare_throughput(backend, crops, args.batch_size, 2.0)
        http_throughput(server, bodies, k, args.clients, 0.0, 2.0 * (2 if args.quick else 4))
        pairs = []
        for r in range(rounds):
            bare = bare_throughput(backend, crops, args.batch_size, duration)
            http = http_throughput(server, bodies, k, args.clients, 3.0, duration)
            pairs.append(
                {
                    "bare_images_per_s": bare["images_per_s"],
                    "bare_images_per_cpu_s": bare["images_per_cpu_s"],
                    **http,
                    "ratio": http["images_per_s"] / bare["images_per_s"],
                    "cpu_ratio": http["images_per_cpu_s"] / bare["images_per_cpu_s"],
                }
            )
            print(
                f"round {r + 1}: bare {bare['images_per_s']:.2f} img/s, "
                f"http {http['images_per_s']:.2f} img/s "
                f"(through the model {http['model_images_per_s']:.2f}), "
                f"ratio {pairs[-1]['ratio']:.3f}; per CPU second: bare "
                f"{bare['images_per_cpu_s']:.2f}, http {http['images_per_cpu_s']:.2f}, "
                f"ratio {pairs[-1]['cpu_ratio']:.3f}; p50 request "
                f"{http['request_latency_p50_s']:.2f}s",
                flush=True,
            )
        metrics = server_metrics(server.url)
    finally:
        server.stop()

    batches = metrics.get("embedding_batch_size_count", 0)
    result = {
        "model": args.model,
        "batch_size": args.batch_size,
        "clients": args.clients,
        "images_per_request": k,
        "torch_threads": args.num_threads,
        "preprocess_workers": args.preprocess_workers,
        "cpus": available_cpus(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "photos": [name for name, _ in photos],
        "mean_photo_kb": round(np.mean([len(b) * 3 / 4 for b in encoded]) / 1024, 1),
        "window_s": duration,
        # Other work on the machine skews both figures; the ratio, measured in
        # alternation, much less so.
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "rounds": pairs,
        "median_ratio": statistics.median(p["ratio"] for p in pairs),
        "median_cpu_ratio": statistics.median(p["cpu_ratio"] for p in pairs),
        "median_bare_images_per_s": statistics.median(p["bare_images_per_s"] for p in pairs),
        "median_http_images_per_s": statistics.median(p["images_per_s"] for p in pairs),
        "server_mean_batch_size": (metrics["embedding_batch_size_sum"] / batches) if batches else 0,
        "server_mean_queue_s": metrics.get("embedding_queue_seconds_sum", 0)
        / max(1, metrics.get("embedding_queue_seconds_count", 0)),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "photos"}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
