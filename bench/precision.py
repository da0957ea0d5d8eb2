"""Precision benchmark for the embedding backend on CPU: speed and embedding fidelity.

For each precision mode (fp32, bf16, int8 dynamic quantisation) of the DINOv2
architecture (default ``random:small``: dinov2-small with random weights, as the
hub is not reachable from CI), measure

* throughput in images/s at a fixed batch size (default 8), modes interleaved
  in rounds so that background load hits all of them alike (median batch time);
* fidelity to fp32 on REAL photos (scikit-learn's sample images and
  scikit-image's photos, each whole and its left and right 60 %), preprocessed with the
  service's own ``preprocess_image``: cosine of each embedding to the fp32 one
  (``cls``, ``mean``, ``cls_mean``), the spread between different images under
  fp32 for scale, and nearest-neighbour agreement.

A mode ships when it is >= 1.8x fp32 and its minimum cosine to fp32 is >= 0.99.
Extras (skipped with ``--quick``): torch.compile, torch.set_num_threads 1 vs
default, set_num_interop_threads 1 vs default (in a subprocess: it can only be
set before the first parallel op).

    python bench/precision.py [--quick] [--json PATH] [--model random:small] [--batch 8]

Results are recorded in docs/benchmarks/precision.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from embedding_service.model import POOLINGS, EmbeddingBackend, load_backend, pool  # noqa: E402

SPEEDUP_BAR = 1.8
COSINE_BAR = 0.99


# ---------------------------------------------------------------------------
# Real photos and the reference preprocessing


def load_photos() -> list[tuple[str, Any]]:
    """(name, PIL RGB image) for the photos bundled with scikit-learn and scikit-image."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos: list[tuple[str, Any]] = []
    sk = load_sample_images()
    for fname, arr in zip(sk.filenames, sk.images, strict=True):
        photos.append((f"sklearn:{Path(fname).stem}", Image.fromarray(arr)))
    try:
        import skimage.data as data
    except ImportError:  # pragma: no cover - scikit-image is a dev dependency
        data = None
    names = [
        "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
        "immunohistochemistry", "retina", "colorwheel", "logo", "camera", "coins",
        "grass", "gravel", "page", "moon", "text", "brick",
    ]  # fmt: skip
    for name in names if data is not None else []:
        try:
            arr = np.asarray(getattr(data, name)())
        except Exception:  # missing from this scikit-image, or needs a download
            continue
        if arr.dtype != np.uint8:
            continue
        img = Image.fromarray(arr)
        photos.append((f"skimage:{name}", img.convert("RGB")))
    return photos


def _reference_crops(images: list[Any]) -> tuple[np.ndarray, str]:
    """uint8 (N, 224, 224, 3) crops through the service's own preprocessing
    (``preprocess_image`` on lossless PNG bytes, reference settings); should that
    fail, the same transform through transformers' DINOv2 image processor."""
    import io

    from embedding_service.preprocess import PreprocessConfig, preprocess_image

    cfg = PreprocessConfig()
    try:
        crops = []
        for i, img in enumerate(images):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            crops.append(preprocess_image(buf.getvalue(), cfg, i))
        return np.stack(crops), "embedding_service.preprocess.preprocess_image (PNG bytes)"
    except Exception as e:
        print(f"note: preprocess_image failed ({type(e).__name__}: {e}); using transformers")
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    proc = BitImageProcessorPil(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        resample=3,  # bicubic
        do_center_crop=True,
        do_convert_rgb=True,
        do_rescale=False,
        do_normalize=False,
    )
    out = proc(images, return_tensors="np")["pixel_values"]  # (N, 3, 224, 224)
    crops_arr = np.clip(np.round(out), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(crops_arr), "transformers BitImageProcessorPil (uint8, no rescale)"


def photo_crops() -> tuple[np.ndarray, list[str], str]:
    """Each photo whole, plus its left and right 60 % (other framings of the scene;
    mirror images are useless here: random-weight DINOv2 is nearly flip invariant)."""
    views: list[tuple[str, Any]] = []
    for name, img in load_photos():
        w, h = img.size
        views.append((name, img))
        views.append((f"{name}:left", img.crop((0, 0, int(w * 0.6), h))))
        views.append((f"{name}:right", img.crop((w - int(w * 0.6), 0, w, h))))
    crops, how = _reference_crops([img for _, img in views])
    return np.ascontiguousarray(crops), [n for n, _ in views], how


# ---------------------------------------------------------------------------
# Measurements


def embed_all(backend: EmbeddingBackend, crops: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    cls_parts, mean_parts = [], []
    for i in range(0, len(crops), batch):
        c, m = backend.forward(crops[i : i + batch])
        cls_parts.append(c)
        mean_parts.append(m)
    cls, mean = np.concatenate(cls_parts), np.concatenate(mean_parts)
    return {p: pool(cls, mean, p, True) for p in POOLINGS}


def time_batches(
    backend: EmbeddingBackend, crops: np.ndarray, iters: int
) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds of ``iters`` forward passes."""
    wall, cpu = [], []
    for _ in range(iters):
        c0, t0 = time.process_time(), time.perf_counter()
        backend.forward(crops)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def fidelity(emb: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in POOLINGS:
        cos = (emb[p] * ref[p]).sum(1)
        out[f"cos_min_{p}"] = float(cos.min())
        out[f"cos_mean_{p}"] = float(cos.mean())
    # nearest other image (cls): does the mode agree with fp32?
    agree = []
    for e, r in ((emb["cls"], ref["cls"]),):
        se, sr = e @ e.T, r @ r.T
        np.fill_diagonal(se, -np.inf)
        np.fill_diagonal(sr, -np.inf)
        agree.append(float((se.argmax(1) == sr.argmax(1)).mean()))
    out["nn_agreement_cls"] = agree[0]
    return out


def spread(ref: dict[str, np.ndarray]) -> dict[str, float]:
    """Cosine between DIFFERENT images under fp32: the scale the fidelity numbers live on."""
    out = {}
    for p in POOLINGS:
        s = ref[p] @ ref[p].T
        off = s[~np.eye(len(s), dtype=bool)]
        out[f"between_images_cos_mean_{p}"] = float(off.mean())
        out[f"between_images_cos_max_{p}"] = float(off.max())
    return out


def _median_ips(times: list[float], batch: int) -> float:
    return batch / statistics.median(times)


def run_interop_subprocess(args: argparse.Namespace, interop: int | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker-timing",
            "--model", args.model,
            "--batch", str(args.batch),
            "--iters", str(args.iters),
            "--json", str(out),
        ]  # fmt: skip
        if interop is not None:
            cmd += ["--interop", str(interop)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            return {"error": proc.stderr[-2000:]}
        return json.loads(out.read_text())


def worker_timing(args: argparse.Namespace) -> None:
    """Time fp32 alone (used in a subprocess for the interop-thread setting)."""
    if args.interop is not None:
        torch.set_num_interop_threads(args.interop)
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (args.batch, 224, 224, 3), dtype=np.uint8)
    b = load_backend(args.model, device="cpu", precision="fp32")
    b.forward(crops)
    times, _ = time_batches(b, crops, args.iters)
    res = {
        "interop_threads": torch.get_num_interop_threads(),
        "threads": torch.get_num_threads(),
        "images_per_s": _median_ips(times, args.batch),
        "batch_times_s": times,
    }
    Path(args.json).write_text(json.dumps(res))


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer iterations, no extras")
    ap.add_argument("--json", type=str, default=None, help="write results to this JSON file")
    ap.add_argument("--model", default="random:small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--modes", default="fp32,bf16,int8")
    ap.add_argument("--iters", type=int, default=None, help="timed batches per mode per round")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    ap.add_argument("--no-extras", action="store_true", help="skip compile/thread experiments")
    ap.add_argument("--compile-modes", default="fp32,int8")
    ap.add_argument("--interop", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-timing", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.iters = args.iters or (2 if args.quick else 4)
    args.rounds = args.rounds or (1 if args.quick else 3)
    logging.basicConfig(level=logging.ERROR)  # keep the random-weights banner out of the table
    if args.worker_timing:
        worker_timing(args)
        return 0

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "fp32" not in modes:
        modes.insert(0, "fp32")
    default_threads = torch.get_num_threads()
    crops, names, how = photo_crops()
    print(f"{len(crops)} crops of {len(names) // 3} real photos (whole, left, right), by {how}")
    batch_crops = crops[: args.batch]
    if len(batch_crops) < args.batch:
        batch_crops = np.resize(crops, (args.batch, *crops.shape[1:]))

    backends: dict[str, EmbeddingBackend] = {}
    for m in modes:
        backends[m] = load_backend(args.model, device="cpu", precision=m)
    print(f"model {args.model}: dim {backends['fp32'].info.dim}, threads {default_threads}")

    # fidelity on real photos
    embs = {m: embed_all(b, crops, args.batch) for m, b in backends.items()}
    ref = embs["fp32"]

    # speed: for each thread count, warm up, then modes interleaved in rounds
    thread_counts = [default_threads]
    if default_threads > 1 and not args.quick:
        thread_counts.append(1)
    timing: dict[tuple[str, int], dict[str, list[float]]] = {}
    try:
        for th in thread_counts:
            torch.set_num_threads(th)
            for m, b in backends.items():
                b.forward(batch_crops)
                timing[(m, th)] = {"wall": [], "cpu": []}
            for _ in range(args.rounds):
                for m, b in backends.items():
                    wall, cpu = time_batches(b, batch_crops, args.iters)
                    timing[(m, th)]["wall"] += wall
                    timing[(m, th)]["cpu"] += cpu
    finally:
        torch.set_num_threads(default_threads)

    rows: list[dict[str, Any]] = []
    for th in thread_counts:
        fp32_ips = _median_ips(timing[("fp32", th)]["wall"], args.batch)
        fp32_cpu = _median_ips(timing[("fp32", th)]["cpu"], args.batch)
        for m in modes:
            t = timing[(m, th)]
            ips = _median_ips(t["wall"], args.batch)
            row = {
                "mode": m,
                "threads": th,
                "compiled": False,
                "images_per_s": ips,
                "images_per_s_best": args.batch / min(t["wall"]),
                "speedup": ips / fp32_ips,
                "images_per_cpu_s": _median_ips(t["cpu"], args.batch),
                "speedup_cpu_time": _median_ips(t["cpu"], args.batch) / fp32_cpu,
                "batch_times_s": t["wall"],
                "batch_cpu_s": t["cpu"],
                **fidelity(embs[m], ref),
            }
            worst_cos = min(row[f"cos_min_{p}"] for p in POOLINGS)
            row["ships"] = m == "fp32" or (
                row["speedup"] >= SPEEDUP_BAR and worst_cos >= COSINE_BAR
            )
            rows.append(row)

    extras: list[dict[str, Any]] = []
    if not args.quick and not args.no_extras:
        # torch.compile (inductor), fixed batch shape
        for m in [x.strip() for x in args.compile_modes.split(",") if x.strip()]:
            rec: dict[str, Any] = {"experiment": "torch.compile", "mode": m}
            try:
                t0 = time.perf_counter()
                cb = load_backend(
                    args.model, device="cpu", precision=m, compile=True, pad_to_batch=args.batch
                )
                cb.warmup(args.batch)
                rec["compile_and_warmup_s"] = time.perf_counter() - t0
                ct = []
                eager = []
                for _ in range(args.rounds):
                    ct += time_batches(cb, batch_crops, args.iters)[0]
                    eager += time_batches(backends.get(m) or backends["fp32"], batch_crops, 1)[0]
                rec["images_per_s"] = _median_ips(ct, args.batch)
                rec["eager_images_per_s_same_window"] = _median_ips(eager, args.batch)
                rec["speedup_vs_eager_same_mode"] = (
                    rec["images_per_s"] / rec["eager_images_per_s_same_window"]
                )
                rec.update(fidelity(embed_all(cb, crops, args.batch), ref))
            except Exception as e:  # record the failure, keep going
                rec["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            extras.append(rec)
        # inter-op threads: only settable before any parallel work -> subprocesses
        for interop in (None, 1):
            r = run_interop_subprocess(args, interop)
            r.update({"experiment": "set_num_interop_threads", "requested": interop or "default"})
            extras.append(r)

    result = {
        "benchmark": "precision",
        "model": args.model,
        "random_weights": args.model.startswith("random:"),
        "batch": args.batch,
        "photos": len(crops),
        "preprocessing": how,
        "iters_per_round": args.iters,
        "rounds": args.rounds,
        "bars": {"speedup": SPEEDUP_BAR, "cosine": COSINE_BAR},
        "fp32_spread": spread(ref),
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "loadavg_end": list(os.getloadavg()),
        },
        "results": rows,
        "extras": extras,
    }
    _print_table(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _print_table(r: dict[str, Any]) -> None:
    print()
    print(
        f"{r['model']} batch {r['batch']} on {r['machine']['cpu']} ({r['machine']['cores']} cores)"
    )
    hdr = (
        f"{'mode':<6} {'thr':>3} {'img/s':>7} {'x fp32':>7} {'img/cpu-s':>9} {'x fp32':>7} "
        f"{'cos min cls':>12} {'cos min mean':>13} {'cos min cls_mean':>17} "
        f"{'NN agree':>9}  verdict"
    )
    print(hdr)
    print("-" * len(hdr))
    for row in r["results"]:
        verdict = "reference" if row["mode"] == "fp32" else ("SHIP" if row["ships"] else "no")
        print(
            f"{row['mode']:<6} {row['threads']:>3} "
            f"{row['images_per_s']:7.2f} {row['speedup']:7.2f} "
            f"{row['images_per_cpu_s']:9.2f} {row['speedup_cpu_time']:7.2f} "
            f"{row['cos_min_cls']:12.5f} {row['cos_min_mean']:13.5f} "
            f"{row['cos_min_cls_mean']:17.5f} {row['nn_agreement_cls']:9.2f}  {verdict}"
        )
    s = r["fp32_spread"]
    print(
        f"fp32 cosine between different images: cls mean {s['between_images_cos_mean_cls']:.3f} "
        f"max {s['between_images_cos_max_cls']:.3f}; "
        f"mean pooling mean {s['between_images_cos_mean_mean']:.3f}"
    )
    for e in r["extras"]:
        print(
            "extra:", json.dumps({k: v for k, v in e.items() if k != "batch_times_s"}, default=str)
        )


if __name__ == "__main__":
    raise SystemExit(main())
