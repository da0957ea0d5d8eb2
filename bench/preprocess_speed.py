"""Preprocessing benchmark: speed per core and fidelity to the reference transform.

Compares ``embedding_service.preprocess`` (``preprocess_image`` on JPEG bytes,
``preprocess_base64`` on the same files as base64) with the reference: PIL open
+ ``convert("RGB")`` + transformers' DINOv2 image processor
(``reference_preprocess``: ``BitImageProcessorPil`` configured as
facebook/dinov2-small), on JPEGs (quality 90) built from real photographs
(scikit-learn's china/flower, scikit-image's astronaut/coffee/chelsea/rocket):

* ``small``: each photo resized to 500x375;
* ``phone``: each photo upscaled to 4000x3000 (smooth: little fine detail);
* ``phone-mosaic``: 4000x3000 mosaics of the photos at their native
  resolution (real-photo detail at every pixel: the hard case for
  reduced-scale decoding).

Speed: images/s on one thread (torch.set_num_threads(1)) with the methods
interleaved in rounds so background load hits them alike (median of rounds),
then the same with a 2-thread pool. Ours returns uint8 crops (normalisation
runs on the model's device); the reference returns normalised float32.

Fidelity: for the default (``fast``) and exact (``fast=False``) settings, the
uint8 crop vs the reference's pixels (grey levels, PSNR, cosine of the
normalised tensors), and embeddings of a dinov2-small architecture
(``embedding_service.model.random_config("small")``: hidden 384, 12 layers,
6 heads, MLP ratio 4, patch 14, image 518) with RANDOM weights, as the hub is
not reachable here: cosine of CLS, mean-pooled patch tokens and per-token
patch features to the reference's. Random-weight CLS vectors of different
images are themselves close, so the same numbers are given between different
images, between the reference and itself with the crop shifted by one pixel,
and after centring (subtracting the mean reference embedding of the set).
Gate: minimum CLS cosine >= 0.999 on every image.

    python bench/preprocess_speed.py [--quick] [--json PATH]

Results are recorded in docs/benchmarks/preprocess.md.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from embedding_service.preprocess import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessConfig,
    preprocess_base64,
    preprocess_image,
    reference_preprocess,
    to_model_input,
)

COSINE_GATE = 0.999
SMALL_SIZE = (500, 375)
PHONE_SIZE = (4000, 3000)
QUALITY = 90

_MEAN = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
_STD = np.asarray(IMAGENET_STD, np.float32)[:, None, None]


# ---------------------------------------------------------------------------
# Images


def real_photos() -> list[tuple[str, np.ndarray]]:
    """(name, uint8 RGB array): photographs bundled with scikit-learn and scikit-image."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    sk = load_sample_images()
    photos = [(Path(f).stem, a) for f, a in zip(sk.filenames, sk.images, strict=True)]
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        photos.append((name, np.asarray(getattr(skimage.data, name)())))
    return photos


def jpeg_bytes(image: np.ndarray | Image.Image, quality: int = QUALITY) -> bytes:
    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def mosaic(photos: list[np.ndarray], size: tuple[int, int], offset: int) -> Image.Image:
    """Tile native-resolution photos (rotating through them) into a ``size`` canvas."""
    canvas = Image.new("RGB", size)
    y, k = 0, offset
    while y < size[1]:
        x, row_h = 0, 0
        while x < size[0]:
            tile = photos[k % len(photos)]
            canvas.paste(Image.fromarray(tile), (x, y))
            x += tile.shape[1]
            row_h = max(row_h, tile.shape[0])
            k += 1
        y += row_h
    return canvas


def build_cases(quick: bool) -> dict[str, list[tuple[str, bytes]]]:
    photos = real_photos()
    arrays = [a for _, a in photos]
    small, phone = (photos[:2], photos[:1]) if quick else (photos, photos)
    bicubic = Image.Resampling.BICUBIC
    cases: dict[str, list[tuple[str, bytes]]] = {
        "small": [
            (n, jpeg_bytes(Image.fromarray(a).resize(SMALL_SIZE, bicubic))) for n, a in small
        ],
        "phone": [
            (n, jpeg_bytes(Image.fromarray(a).resize(PHONE_SIZE, bicubic))) for n, a in phone
        ],
        "phone-mosaic": [
            (f"mosaic{i}", jpeg_bytes(mosaic(arrays, PHONE_SIZE, i)))
            for i in range(1 if quick else 2)
        ],
    }
    return cases


# ---------------------------------------------------------------------------
# The two pipelines


def reference_from_bytes(raw: bytes) -> np.ndarray:
    """The reference as a user of transformers writes it: open, RGB, processor."""
    with Image.open(io.BytesIO(raw)) as img:
        return reference_preprocess(img.convert("RGB"))


def reference_uint8(raw: bytes) -> np.ndarray:
    """The reference's crop back in grey levels (H, W, 3) float64 (exact up to float rounding)."""
    return (
        ((reference_from_bytes(raw) * _STD + _MEAN) * 255.0).transpose(1, 2, 0).astype(np.float64)
    )


def reference_shifted(raw: bytes, shift: int = 1) -> np.ndarray:
    """The reference transform with the crop moved by ``shift`` px (a sensitivity yardstick)."""
    img = Image.open(io.BytesIO(raw)).convert("RGB")
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_long = int(256 * long / short)
    new_w, new_h = (256, new_long) if w <= h else (new_long, 256)
    resized = np.asarray(img.resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = (new_h - 224) // 2 + shift, (new_w - 224) // 2 + shift
    crop = resized[top : top + 224, left : left + 224].astype(np.float32) / 255.0
    return ((crop.transpose(2, 0, 1) - _MEAN) / _STD).astype(np.float32)


def normalise(crop: np.ndarray) -> np.ndarray:
    return to_model_input(torch.from_numpy(crop[None].copy()))[0].numpy()


# ---------------------------------------------------------------------------
# Speed


def _rate(fn: Callable[[Any], Any], items: list[Any], min_time: float) -> float:
    """Images/s of ``fn`` over ``items`` (repeated until ``min_time`` has passed)."""
    done, t0 = 0, time.perf_counter()
    while True:
        for item in items:
            fn(item)
        done += len(items)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time:
            return done / elapsed


def _pool_rate(fn: Callable[[Any], Any], items: list[Any], threads: int, min_time: float) -> float:
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, items))  # warm the threads
        done, t0 = 0, time.perf_counter()
        while True:
            list(pool.map(fn, items * threads))
            done += len(items) * threads
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time:
                return done / elapsed


def speed(
    cases: dict[str, list[tuple[str, bytes]]],
    rounds: int,
    min_time: float,
    threads: int,
    variants: bool = True,
) -> dict[str, Any]:
    fast, exact = PreprocessConfig(), PreprocessConfig(fast=False)
    draft2 = replace(fast, draft_min_scale=2.0)
    methods: dict[str, tuple[Callable[[Any], Any], bool]] = {
        "reference": (reference_from_bytes, False),
        "ours_bytes": (lambda raw: preprocess_image(raw, fast), False),
        "ours_base64": (lambda data: preprocess_base64(data, fast), True),
        "ours_exact": (lambda raw: preprocess_image(raw, exact), False),
    }
    if variants:
        methods["ours_draft2"] = (lambda raw: preprocess_image(raw, draft2), False)
    results: dict[str, Any] = {}
    for case, items in cases.items():
        raws = [raw for _, raw in items]
        b64s = [base64.b64encode(raw).decode("ascii") for raw in raws]
        for fn, wants_b64 in methods.values():  # warm-up (imports, caches)
            fn(b64s[0] if wants_b64 else raws[0])
        per_round: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(rounds):
            for name, (fn, wants_b64) in methods.items():
                per_round[name].append(_rate(fn, b64s if wants_b64 else raws, min_time))
        row: dict[str, Any] = {m: statistics.median(v) for m, v in per_round.items()}
        for m in methods:
            if m != "reference":
                ratios = [o / r for o, r in zip(per_round[m], per_round["reference"], strict=True)]
                row[f"{m}_speedup"] = statistics.median(ratios)
        pooled: dict[str, float] = {}
        for name in ("reference", "ours_base64"):
            fn, wants_b64 = methods[name]
            pooled[name] = _pool_rate(fn, b64s if wants_b64 else raws, threads, min_time)
        row[f"pool{threads}"] = pooled
        row["pool_speedup"] = pooled["ours_base64"] / pooled["reference"]
        row["n_images"] = len(items)
        row["mean_jpeg_kib"] = sum(map(len, raws)) / len(raws) / 1024
        results[case] = row
    return results


# ---------------------------------------------------------------------------
# Fidelity


def dinov2_small_random(seed: int = 0) -> torch.nn.Module:
    from transformers import Dinov2Model

    from embedding_service.model import random_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(random_config("small"))
    return model.eval()


@torch.inference_mode()
def features(model: torch.nn.Module, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """CLS, mean-pooled patch tokens, patch tokens; each L2-normalised (float32)."""
    hidden = model(pixel_values=torch.from_numpy(np.ascontiguousarray(pixels))).last_hidden_state
    out = {"cls": hidden[:, 0], "mean": hidden[:, 1:].mean(1), "patch": hidden[:, 1:]}
    return {k: torch.nn.functional.normalize(v.float(), dim=-1).numpy() for k, v in out.items()}


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


def compare(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], centre: dict[str, np.ndarray]):
    """Per-image cosines of ours to ref: cls, mean, patch (mean over tokens), centred cls/mean."""
    return {
        "cls": _cos(ours["cls"], ref["cls"]),
        "mean": _cos(ours["mean"], ref["mean"]),
        "patch": _cos(ours["patch"], ref["patch"]).mean(-1),
        "cls_centred": _cos(ours["cls"] - centre["cls"], ref["cls"] - centre["cls"]),
        "mean_centred": _cos(ours["mean"] - centre["mean"], ref["mean"] - centre["mean"]),
    }


def fidelity(
    cases: dict[str, list[tuple[str, bytes]]], variants: dict[str, PreprocessConfig]
) -> dict[str, Any]:
    model = dinov2_small_random()
    raws = {case: [raw for _, raw in items] for case, items in cases.items()}
    ref_px = {case: np.stack([reference_from_bytes(r) for r in rs]) for case, rs in raws.items()}
    ref = {case: features(model, px) for case, px in ref_px.items()}
    # Centre: the mean reference embedding over every image of every case.
    centre = {
        k: np.concatenate([f[k] for f in ref.values()]).mean(0, keepdims=True)
        for k in ("cls", "mean")
    }
    names = {case: [name for name, _ in items] for case, items in cases.items()}
    results: dict[str, Any] = {}
    for case, rs in raws.items():
        n = len(rs)
        # Yardsticks: a different photo (the next one in the case; for a one-image case
        # the first image of another case showing another photo), and the reference
        # crop moved by one pixel.
        if n > 1:
            other = {k: np.roll(v, 1, axis=0) for k, v in ref[case].items()}
        else:
            elsewhere = next(
                (c, i)
                for c in cases
                if c != case
                for i, name in enumerate(names[c])
                if name != names[case][0]
            )
            other = {k: v[elsewhere[1] : elsewhere[1] + 1] for k, v in ref[elsewhere[0]].items()}
        shifted = features(model, np.stack([reference_shifted(r) for r in rs]))
        row: dict[str, Any] = {
            "n_images": n,
            "different_image": _summary(compare(other, ref[case], centre)),
            "reference_shifted_1px": _summary(compare(shifted, ref[case], centre)),
        }
        ref_u8 = [reference_uint8(r) for r in rs]
        for name, cfg in variants.items():
            crops = [preprocess_image(r, cfg) for r in rs]
            ours_px = np.stack([normalise(c) for c in crops])
            diff = np.stack([np.abs(c - u) for c, u in zip(crops, ref_u8, strict=True)])
            mse = float(np.mean(diff**2))
            emb = compare(features(model, ours_px), ref[case], centre)
            row[name] = {
                "pixel_max_abs": float(diff.max()),
                "pixel_mean_abs": float(diff.mean()),
                "pixel_mean_abs_worst_image": float(diff.reshape(n, -1).mean(1).max()),
                "pixel_frac_gt1": float((diff > 1.5).mean()),
                "psnr_db": float(10 * np.log10(255.0**2 / mse)) if mse > 0 else None,
                "pixel_cos_min": float(
                    _cos(ours_px.reshape(n, -1), ref_px[case].reshape(n, -1)).min()
                ),
                **_summary(emb),
                "gate": bool(emb["cls"].min() >= COSINE_GATE),
            }
        results[case] = row
    return results


def _summary(cosines: dict[str, np.ndarray]) -> dict[str, float]:
    out = {f"{k}_min": float(v.min()) for k, v in cosines.items()}
    out.update({f"{k}_max": float(v.max()) for k, v in cosines.items()})
    return out


# ---------------------------------------------------------------------------
# Report


def print_report(report: dict[str, Any]) -> None:
    print(f"\n{report['machine']}")
    print("\nSpeed (images/s, one thread; speed-up = median over rounds of ours/reference)")
    header = f"{'case':<13}{'reference':>10}{'ours b64':>10}{'x':>7}{'ours bytes':>11}{'x':>7}"
    header += f"{'exact':>9}{'x':>7}{'dms 2':>9}{'x':>7}{'pool ref':>10}{'pool ours':>10}{'x':>7}"
    print(header)
    for case, r in report["speed"].items():
        pool = r[f"pool{report['threads']}"]
        draft2 = (
            f"{r['ours_draft2']:>9.1f}{r['ours_draft2_speedup']:>7.2f}"
            if "ours_draft2" in r
            else f"{'-':>9}{'-':>7}"
        )
        print(
            f"{case:<13}{r['reference']:>10.1f}{r['ours_base64']:>10.1f}"
            f"{r['ours_base64_speedup']:>7.2f}{r['ours_bytes']:>11.1f}{r['ours_bytes_speedup']:>7.2f}"
            f"{r['ours_exact']:>9.1f}{r['ours_exact_speedup']:>7.2f}{draft2}"
            f"{pool['reference']:>10.1f}{pool['ours_base64']:>10.1f}{r['pool_speedup']:>7.2f}"
        )
    if "fidelity" not in report:
        return
    print(
        "\nFidelity to the reference (min over images; different_image: max; "
        "random-weight dinov2-small; ctr = centred)"
    )
    cols = ["pixel_max_abs", "pixel_mean_abs", "psnr_db", "pixel_cos_min", "cls_min", "mean_min"]
    cols += ["patch_min", "cls_centred_min", "mean_centred_min"]
    short = ["px max", "px mean", "PSNR", "px cos", "CLS", "mean", "patch", "CLS ctr", "mean ctr"]
    print(f"{'case':<13}{'variant':<22}" + "".join(f"{s:>10}" for s in short))
    for case, r in report["fidelity"].items():
        for name, v in r.items():
            if not isinstance(v, dict):
                continue
            # For a different image the closest pair (max) is the telling number.
            keys = [c.replace("_min", "_max") if name == "different_image" else c for c in cols]
            cells = "".join(
                f"{v[c]:>10.4f}" if isinstance(v.get(c), float) else f"{'':>10}" for c in keys
            )
            mark = "" if "gate" not in v else ("  PASS" if v["gate"] else "  FAIL")
            print(f"{case:<13}{name:<22}{cells}{mark}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few images, short timings")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=2, help="thread-pool size")
    parser.add_argument("--no-fidelity", action="store_true", help="speed only")
    args = parser.parse_args(argv)

    rounds = args.rounds or (1 if args.quick else 5)
    min_time = 0.2 if args.quick else 1.5
    cases = build_cases(args.quick)
    torch.set_num_threads(1)
    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}, Python {platform.python_version()}, "
        f"Pillow {Image.__version__}, torch {torch.__version__}",
        "threads": args.threads,
        "rounds": rounds,
        "speed": speed(cases, rounds, min_time, args.threads, variants=not args.quick),
    }
    if not args.no_fidelity:
        torch.set_num_threads(os.cpu_count() or 1)
        fast = PreprocessConfig()
        variants = {
            "fast (default)": fast,
            "exact (fast=False)": PreprocessConfig(fast=False),
        }
        if not args.quick:
            variants["fast, draft_min_scale 2"] = replace(fast, draft_min_scale=2.0)
        report["fidelity"] = fidelity(cases, variants)
        report["gate"] = all(
            v["gate"]
            for r in report["fidelity"].values()
            for v in r.values()
            if isinstance(v, dict) and "gate" in v
        )
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
