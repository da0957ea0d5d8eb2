"""The one-command demo: both services, real images, a trained model, its clusters.

Images: scikit-learn's handwritten digits rendered as 112 px PNGs (labelled
with their digit) and crops of the real photographs shipped with
scikit-learn and scikit-image (labelled with the photo). Everything runs on
this machine with the embedded PostgreSQL; where the DINOv2 weights cannot be
downloaded the demo says how to provide them and, for the demo only, runs the
same architecture with random weights, saying so loudly.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from dinocluster.local import LocalServices, ModelUnavailable
from shared.clustering_client import ClusteringClient

DATASET = "demo-images"
MODEL = "demo"
FALLBACK_MODEL = "random:small"


def demo_images(n_digits: int) -> tuple[dict[str, bytes], dict[str, str]]:
    """``({id: image bytes}, {id: label})``: digits (balanced over 0-9) and photo crops."""
    import skimage.data
    from sklearn.datasets import load_digits, load_sample_images

    images: dict[str, bytes] = {}
    labels: dict[str, str] = {}
    digits = load_digits()
    per_class = max(1, n_digits // 10)
    for digit in range(10):
        for j, row in enumerate(np.flatnonzero(digits.target == digit)[:per_class]):
            pixels = (digits.images[row] / 16 * 255).astype(np.uint8)
            image = Image.fromarray(255 - pixels).resize((112, 112), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            image.convert("RGB").save(buf, "PNG")
            key = f"digits/{digit}/{j:03d}.png"
            images[key], labels[key] = buf.getvalue(), f"digit {digit}"
    sample = load_sample_images().images
    photos = {"china": sample[0], "flower": sample[1]}
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        photos[name] = np.asarray(getattr(skimage.data, name)())
    for name, array in photos.items():
        h, w = array.shape[:2]
        side = min(h, w) * 3 // 4
        for j, (y, x) in enumerate([(0, 0), (h - side, w - side), (0, w - side), (h - side, 0)]):
            crop = Image.fromarray(array[y : y + side, x : x + side]).convert("RGB")
            buf = io.BytesIO()
            crop.save(buf, "JPEG", quality=90)
            key = f"photos/{name}-{j}.jpg"
            images[key], labels[key] = buf.getvalue(), f"photo {name}"
    return images, labels


def _start(
    console: Console, model: str, data_dir: Path, embedding_port: int, port: int
) -> LocalServices:
    try:
        return LocalServices(model, data_dir, embedding_port, port, console).__enter__()
    except ModelUnavailable as exc:
        if model.startswith("random:"):
            raise
        console.print(
            Panel(
                f"The embedding model [bold]{model}[/] could not be loaded:\n\n"
                f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}\n\n"
                "To use the real DINOv2 weights, download them where there is network access\n"
                f"  huggingface-cli download {model} --local-dir models/dinov2-small\n"
                "and run the demo with --model models/dinov2-small (or EMBEDDING_MODEL for the "
                "service).\n\n"
                f"[bold]For this demo only, the service now runs {FALLBACK_MODEL}: the real "
                "dinov2-small architecture with RANDOM weights. Its clusters are meaningless.[/]",
                title="[bold red]WARNING: no DINOv2 weights",
                border_style="red",
            )
        )
        return LocalServices(FALLBACK_MODEL, data_dir, embedding_port, port, console).__enter__()


def run_demo(
    console: Console,
    out: Console,
    *,
    model: str,
    data_dir: Path,
    n_digits: int,
    embedding_port: int,
    port: int,
    keep_serving: bool,
    as_json: bool = False,
) -> dict[str, Any]:
    services = _start(console, model, data_dir, embedding_port, port)
    try:
        with ClusteringClient(services.url) as client:
            summary = _run(console, client, n_digits)
        summary["embedding_model"] = services.model
        summary["dashboard"] = f"{services.url}/dashboard"
        summary["api_docs"] = f"{services.url}/docs"
        if as_json:
            import json

            out.print_json(json.dumps(summary))
        else:
            _print(out, summary)
        if keep_serving:
            console.print(f"serving until Ctrl-C (logs in {services.logs})")
            services.wait_forever()
        return summary
    finally:
        services.__exit__(None, None, None)


def _run(console: Console, client: ClusteringClient, n_digits: int) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    images, labels = demo_images(n_digits)
    dataset = client.dataset_by_name(DATASET) or client.create_dataset(DATASET)
    todo = client.missing_ids(dataset.id, list(images))
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console
    ) as bar:
        task = bar.add_task("embedding and storing images", total=len(images))
        bar.advance(task, len(images) - len(todo))
        client.add_images(
            dataset.id,
            {i: images[i] for i in todo},
            labels={i: labels[i] for i in todo},
            on_batch=lambda _r, n: bar.advance(task, n),
        )
        k = 10 + 6  # ten digits, six photographs
        job = client.train(dataset.id, "kmeans", model_name=MODEL, n_clusters=k)
        train = bar.add_task(f"training kmeans (job {job.id})", total=None)

        def show(update: Any) -> None:
            p = update.progress
            bar.update(train, completed=(p.epoch or 0) if p else 0, total=(p.epochs if p else None))

        job = client.wait(job.id, on_update=show)
    if job.state != "succeeded" or job.result is None:
        raise RuntimeError(f"the demo's training job {job.state}: {job.error}")
    version = client.version(MODEL, job.result.version)
    assigned = list(client.assignments(MODEL, version.version))
    clusters = []
    by_cluster: dict[int, list[str]] = {}
    for a in assigned:
        by_cluster.setdefault(a.cluster, []).append(a.item_id)
    for c in sorted(by_cluster):
        members = by_cluster[c]
        composition = Counter(labels[m] for m in members if m in labels).most_common(3)
        clusters.append(
            {"cluster": c, "size": len(members), "labels": composition, "examples": members[:3]}
        )
    return {
        "dataset": dataset.id,
        "items": len(images),
        "model": MODEL,
        "version": version.version,
        "metrics": {k: version.metrics.get(k) for k in ("acc", "nmi", "ari", "silhouette")},
        "clusters": clusters,
        "assignments": [a.model_dump() for a in assigned],
    }


def _print(out: Console, summary: dict[str, Any]) -> None:
    table = Table(title=f"model {summary['model']} v{summary['version']}: clusters")
    for column in ("cluster", "size", "mostly", "closest to the centre"):
        table.add_column(column)
    for c in summary["clusters"]:
        mostly = ", ".join(f"{label} ({n})" for label, n in c["labels"])
        table.add_row(str(c["cluster"]), str(c["size"]), mostly, "\n".join(c["exemplars"]))
    out.print(table)
    m = summary["metrics"]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    out.print(
        f"{summary['items']} images, embedded with {summary['embedding_model']}; against the "
        f"known labels: ACC {fmt(m['acc'])}, NMI {fmt(m['nmi'])}, ARI {fmt(m['ari'])}; "
        f"silhouette {fmt(m['silhouette'])}"
    )
    out.print(f"every assignment: dinocluster assignments {summary['model']} --format csv")
    out.print(f"dashboard: [bold]{summary['dashboard']}[/]   API: {summary['api_docs']}")
