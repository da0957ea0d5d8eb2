"""``dinocluster``: the command line of both services (typer + rich).

Every command talks HTTP through :mod:`shared.clustering_client` and
:mod:`shared.client`; ``--json`` prints machine-readable output for scripts;
failures print the service's error and exit non-zero (1: the service refused
or failed, 2: bad usage). Long operations show progress bars.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import httpx
import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shared.client import ApiError, EmbeddingClient
from shared.clustering_client import ClusteringClient
from shared.clustering_schemas import Dataset, Job

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})

app = typer.Typer(
    name="dinocluster",
    help="Embed images with DINOv2, cluster them, and keep the clusters stable.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
dataset_app = typer.Typer(help="Datasets: create, list, show, add items.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")

console = Console(stderr=True)
out = Console()


class State:
    url: str = "http://localhost:8002"
    embedding_url: str = "http://localhost:8001"
    api_key: str | None = None
    as_json: bool = False

    def client(self) -> ClusteringClient:
        return ClusteringClient(self.url, api_key=self.api_key)


state = State()


@app.callback()
def main(
    url: Annotated[
        str, typer.Option(envvar="DINOCLUSTER_URL", help="Clustering service URL.")
    ] = "http://localhost:8002",
    embedding_url: Annotated[
        str, typer.Option(envvar="DINOCLUSTER_EMBEDDING_URL", help="Embedding service URL.")
    ] = "http://localhost:8001",
    api_key: Annotated[
        str | None, typer.Option(envvar="DINOCLUSTER_API_KEY", help="Bearer key of the services.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    state.url, state.embedding_url, state.api_key, state.as_json = (
        url,
        embedding_url,
        api_key,
        as_json,
    )


def fail(message: str, code: int = 1) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def emit(data: Any, table: Callable[[], Table] | None = None) -> None:
    """JSON with ``--json`` (or when there is no table), else the rich table."""
    if state.as_json or table is None:
        if hasattr(data, "model_dump"):
            data = data.model_dump(mode="json")
        elif isinstance(data, list):
            data = [d.model_dump(mode="json") if hasattr(d, "model_dump") else d for d in data]
        out.print_json(json.dumps(data, default=str))
    else:
        out.print(table())


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=state.as_json,
    )


def parse_params(values: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs; values are read as JSON when they parse (numbers, lists...)."""
    params: dict[str, Any] = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            fail(f"--param {item!r}: expected key=value", 2)
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def image_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        fail(f"{directory} is not a directory", 2)
    files = sorted(
        p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        fail(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {directory}", 2)
    return files


def resolve_dataset(client: ClusteringClient, ref: str) -> Dataset:
    """A dataset by id, or else by name."""
    try:
        return client.dataset(ref)
    except ApiError as exc:
        if exc.status != 404:
            raise
    found = client.dataset_by_name(ref)
    if found is None:
        fail(f"no dataset with id or name {ref!r}")
    assert found is not None
    return found


def follow(client: ClusteringClient, job: Job) -> Job:
    """Show the job's progress live (events stream) until it ends; exit 1 unless it succeeded."""
    if not state.as_json:
        console.print(f"job [bold]{job.id}[/] ({job.type}) {job.state}")
    with progress() as bar:
        task = bar.add_task(job.state, total=None)

        def show(update: Job) -> None:
            p = update.progress
            stage = p.stage if p and p.stage else update.state
            text = f"{update.state}: {stage}"
            if p and p.loss is not None:
                text += f" loss {p.loss:.4g}"
            total = p.epochs if p and p.epochs else None
            bar.update(task, description=text, completed=(p.epoch or 0) if p else 0, total=total)

        final = client.wait(job.id, on_update=show)
    if final.state != "succeeded":
        error = final.error.message if final.error else ""
        if state.as_json:
            emit(final)
        fail(f"job {final.id} {final.state}{': ' + error if error else ''}")
    return final


# -- embedding ----------------------------------------------------------------------------


@app.command()
def embed(
    directory: Annotated[Path, typer.Argument(help="Directory of images (searched recursively).")],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="out.npy (ids beside it) or out.parquet.")
    ],
    batch: Annotated[int, typer.Option(help="Images per request.")] = 32,
) -> None:
    """Embed every image under DIRECTORY with the embedding service."""
    files = image_files(directory)
    ids = [str(p.relative_to(directory)) for p in files]
    parts = []
    with EmbeddingClient(state.embedding_url, api_key=state.api_key) as client, progress() as bar:
        task = bar.add_task("embedding", total=len(files))
        for start in range(0, len(files), batch):
            parts.append(client.embed_images(files[start : start + batch]))
            bar.advance(task, len(files[start : start + batch]))
    X = np.concatenate(parts)
    if output.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        vectors = pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), X.shape[1])
        pq.write_table(pa.table({"id": ids, "embedding": vectors}), output)
    elif output.suffix == ".npy":
        np.save(output, X)
        output.with_suffix(".ids.txt").write_text("\n".join(ids) + "\n")
    else:
        fail(f"{output}: the output must end in .npy or .parquet", 2)
    emit({"images": len(ids), "dim": int(X.shape[1]), "output": str(output)})


# -- datasets -----------------------------------------------------------------------------


def _datasets_table(datasets: list[Dataset]) -> Table:
    table = Table("id", "name", "items", "dim", "created")
    for d in datasets:
        table.add_row(
            d.id, d.name, str(d.count), str(d.dim or "-"), f"{d.created_at:%Y-%m-%d %H:%M}"
        )
    return table


@dataset_app.command("create")
def dataset_create(name: str) -> None:
    """Create an empty dataset."""
    with state.client() as client:
        dataset = client.create_dataset(name)
    emit(dataset, lambda: _datasets_table([dataset]))


@dataset_app.command("list")
def dataset_list() -> None:
    with state.client() as client:
        datasets = client.datasets()
    emit(datasets, lambda: _datasets_table(datasets))


@dataset_app.command("show")
def dataset_show(dataset: Annotated[str, typer.Argument(help="Id or name.")]) -> None:
    with state.client() as client:
        found = resolve_dataset(client, dataset)
    emit(found, lambda: _datasets_table([found]))


def read_vectors(path: Path) -> tuple[list[str], np.ndarray]:
    """Ids and vectors from ``.npy`` (ids in ``<name>.ids.txt``, else row numbers) or
    ``.parquet`` (columns id and embedding), as ``dinocluster embed`` writes them."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        X = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
        return [str(i) for i in table.column("id").to_pylist()], X
    X = np.load(path)
    ids_file = path.with_suffix(".ids.txt")
    ids = ids_file.read_text().split("\n")[: len(X)] if ids_file.exists() else []
    return ids or [str(i) for i in range(len(X))], X


@dataset_app.command("add")
def dataset_add(
    dataset: Annotated[str, typer.Argument(help="Id or name.")],
    source: Annotated[Path, typer.Argument(help="A directory of images, or a .npy/.parquet.")],
    labels_from_dirs: Annotated[
        bool, typer.Option(help="Label each image with its folder name (for metrics).")
    ] = False,
) -> None:
    """Add images (embedded by the service) or vectors. Resumable: ids already stored
    (relative paths for images) are skipped without being sent again."""
    with state.client() as client:
        target = resolve_dataset(client, dataset)
        if source.is_dir():
            files = image_files(source)
            by_id = {str(p.relative_to(source)): p for p in files}
            todo = client.missing_ids(target.id, list(by_id))
            labels = {i: by_id[i].parent.name for i in todo} if labels_from_dirs else {}
            with progress() as bar:
                task = bar.add_task(
                    "adding images", total=len(by_id), completed=len(by_id) - len(todo)
                )
                result = client.add_images(
                    target.id,
                    {i: by_id[i] for i in todo},
                    labels=labels,
                    on_batch=lambda _r, n: bar.advance(task, n),
                )
        else:
            ids, X = read_vectors(source)
            keep = set(client.missing_ids(target.id, ids))
            rows = [i for i, item_id in enumerate(ids) if item_id in keep]
            with progress() as bar:
                task = bar.add_task(
                    "adding vectors", total=len(ids), completed=len(ids) - len(rows)
                )
                result = client.add_embeddings(
                    target.id,
                    [ids[i] for i in rows],
                    X[rows],
                    on_batch=lambda _r, n: bar.advance(task, n),
                )
        total = client.dataset(target.id)
    emit({"dataset": target.id, "added": result.added, "count": total.count})


# -- jobs ---------------------------------------------------------------------------------


def _jobs_table(jobs: list[Job]) -> Table:
    table = Table("id", "type", "state", "model", "algorithm", "progress", "created")
    for j in jobs:
        stage = (j.progress.stage or "") if j.progress else ""
        result = f" -> v{j.result.version}" if j.result else ""
        table.add_row(
            j.id,
            j.type,
            j.state + result,
            j.model_name or "-",
            j.algorithm or "-",
            stage,
            f"{j.created_at:%Y-%m-%d %H:%M:%S}",
        )
    return table


@app.command()
def train(
    dataset: Annotated[str, typer.Argument(help="Dataset id or name.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model name (versions count up).")],
    algorithm: Annotated[
        str, typer.Option("--algorithm", "-a", help="See `dinocluster algorithms`.")
    ] = "kmeans",
    k: Annotated[
        int | None, typer.Option("--k", "-k", help="Clusters (omit: chosen automatically).")
    ] = None,
    seed: int = 0,
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="key=value, repeatable.")
    ] = None,
    follow_job: Annotated[
        bool, typer.Option("--follow/--no-follow", help="Follow the job live.")
    ] = True,
) -> None:
    """Train a model on a dataset as a job, and follow it."""
    with state.client() as client:
        target = resolve_dataset(client, dataset)
        job = client.train(
            target.id,
            algorithm,
            model_name=model,
            n_clusters=k,
            seed=seed,
            params=parse_params(param),
        )
        if follow_job:
            job = follow(client, job)
            emit(client.version(model, job.result.version) if job.result else job)
        else:
            emit(job)


@app.command()
def update(
    model: str,
    dataset: Annotated[
        str | None, typer.Option(help="Dataset id or name (default: the parent's).")
    ] = None,
    from_version: Annotated[
        int | None, typer.Option(help="Parent version (default: latest).")
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="key=value, repeatable.")
    ] = None,
    follow_job: Annotated[bool, typer.Option("--follow/--no-follow")] = True,
) -> None:
    """Update a model on its dataset's current items (cluster ids kept) as a job."""
    with state.client() as client:
        dataset_id = resolve_dataset(client, dataset).id if dataset else None
        job = client.update(
            model, dataset_id=dataset_id, from_version=from_version, params=parse_params(param)
        )
        if follow_job:
            job = follow(client, job)
            version = client.version(model, job.result.version) if job.result else None
            emit(version.stability if version else job)
        else:
            emit(job)


@app.command()
def jobs(
    job_state: Annotated[
        str | None, typer.Option("--state", help="queued, running, succeeded...")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Only this model's jobs.")] = None,
) -> None:
    """List jobs, newest first."""
    with state.client() as client:
        found = client.jobs(state=job_state, model_name=model)
    emit(found, lambda: _jobs_table(found))


@app.command()
def cancel(job: str) -> None:
    """Cancel a queued or running job."""
    with state.client() as client:
        result = client.cancel(job)
    emit(result, lambda: _jobs_table([result]))


@app.command()
def algorithms() -> None:
    """Every algorithm with its parameters and defaults."""
    with state.client() as client:
        found = client.algorithms().algorithms

    def table() -> Table:
        t = Table("algorithm", "parameter", "default", "description")
        for a in found:
            t.add_row(f"[bold]{a.name}[/]", "", "", a.description)
            for p in a.parameters:
                t.add_row("", p.name, json.dumps(p.default), "")
        return t

    emit([a.model_dump(mode="json", by_alias=True) for a in found], table)


# -- models -------------------------------------------------------------------------------


@app.command()
def models(
    name: Annotated[str | None, typer.Argument(help="A model: its versions.")] = None,
) -> None:
    """List models, or one model's versions and aliases."""
    with state.client() as client:
        if name is None:
            found = client.models().models

            def table() -> Table:
                t = Table("model", "latest", "aliases", "created")
                for m in found:
                    aliases = ", ".join(f"{a}->v{v}" for a, v in m.aliases.items())
                    t.add_row(
                        m.name, str(m.latest_version), aliases, f"{m.created_at:%Y-%m-%d %H:%M}"
                    )
                return t

            emit(found, table)
            return
        detail = client.model(name)

    def versions() -> Table:
        t = Table("version", "algorithm", "k", "items", "parent", "silhouette", "acc", "kept")
        for v in detail.versions:
            m, s = v.metrics, v.stability or {}
            fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
            t.add_row(
                str(v.version),
                v.algorithm,
                str(v.n_clusters),
                str(v.item_count),
                str(v.parent_version or "-"),
                fmt(m.get("silhouette")),
                fmt(m.get("acc")),
                fmt(s.get("kept_fraction")),
            )
        return t

    emit(detail, versions)


@app.command()
def assignments(
    model: str,
    version: Annotated[int | None, typer.Option(help="Default: latest.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="csv, json or parquet.")] = "csv",
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="File (default: stdout).")
    ] = None,
    cluster: Annotated[int | None, typer.Option(help="Only this cluster.")] = None,
) -> None:
    """Every item's cluster and probability."""
    if fmt not in ("csv", "json", "parquet"):
        fail(f"--format {fmt!r}: choose csv, json or parquet", 2)
    if fmt == "parquet" and output is None:
        fail("--format parquet needs --output FILE", 2)
    with state.client() as client:
        number = version or client.model(model).latest_version
        rows = list(client.assignments(model, number, cluster=cluster))
    records = [r.model_dump() for r in rows]
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), output)  # type: ignore[arg-type]
        console.print(f"{len(records)} assignments of {model} v{number} -> {output}")
        return
    stream = open(output, "w", newline="") if output else sys.stdout  # noqa: SIM115
    try:
        if fmt == "json":
            json.dump(records, stream)
            stream.write("\n")
        else:
            writer = csv.DictWriter(stream, fieldnames=["item_id", "cluster", "probability"])
            writer.writeheader()
            writer.writerows(records)
    finally:
        if output:
            stream.close()


@app.command()
def predict(
    model: str,
    files: Annotated[list[Path], typer.Argument(help="Images.")],
    version: int | None = None,
    alias: str | None = None,
) -> None:
    """Cluster of each image, with a model version (default: latest) or alias."""
    for f in files:
        if not f.is_file():
            fail(f"{f} is not a file", 2)
    with state.client() as client:
        result = client.predict(model, images=files, version=version, alias=alias)

    def table() -> Table:
        t = Table("file", "cluster", "probability")
        for f, p in zip(files, result.predictions, strict=True):
            t.add_row(str(f), str(p.cluster), f"{p.probability:.3f}")
        return t

    emit(result, table)


@app.command()
def alias(model: str, name: str, version: int) -> None:
    """Point an alias (e.g. production) at a version."""
    with state.client() as client:
        emit(client.set_alias(model, name, version))


@app.command()
def serve(
    model: Annotated[
        str, typer.Option(help="DINOv2 hub id, local directory or random:<size>.")
    ] = "facebook/dinov2-small",
    data_dir: Annotated[Path, typer.Option(help="Embedded database and caches.")] = Path(
        "data/clustering"
    ),
    embedding_port: int = 8001,
    port: int = 8002,
) -> None:
    """Run both services locally (embedded PostgreSQL) until Ctrl-C."""
    from dinocluster.local import LocalServices

    with LocalServices(model, data_dir, embedding_port, port, console) as services:
        console.print(
            f"embedding service  {services.embedding_url}\nclustering service {services.url}"
        )
        services.wait_forever()


@app.command()
def demo(
    exit_after: Annotated[
        bool, typer.Option("--exit", help="Stop after printing (scripts, tests).")
    ] = False,
    model: Annotated[
        str, typer.Option(help="DINOv2 to use; random:small when it cannot be loaded.")
    ] = "facebook/dinov2-small",
    data_dir: Annotated[Path, typer.Option(help="Embedded database and caches.")] = Path(
        "data/demo"
    ),
    digits: Annotated[int, typer.Option(help="Handwritten digits to render as images.")] = 200,
    embedding_port: int = 8001,
    port: int = 8002,
) -> None:
    """Start both services, ingest real images, train, print the clusters."""
    from dinocluster.demo import run_demo

    run_demo(
        console,
        out,
        model=model,
        data_dir=data_dir,
        n_digits=digits,
        embedding_port=embedding_port,
        port=port,
        keep_serving=not exit_after,
        as_json=state.as_json,
    )


def run() -> None:
    """Entry point: service errors become a message and exit status 1."""
    try:
        app()
    except ApiError as exc:
        field = f" (field {exc.field})" if exc.field else ""
        console.print(f"[bold red]error:[/] {exc.status} {exc.type}: {exc.message}{field}")
        sys.exit(1)
    except httpx.TransportError as exc:
        console.print(f"[bold red]error:[/] cannot reach the service: {exc}")
        sys.exit(1)
    except OSError as exc:  # a file cannot be read or written
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(1)
