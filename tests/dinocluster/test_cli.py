"""``dinocluster`` commands against running services: output, --json, exit codes,
progress, resumable uploads, every assignments format."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.clustering import Clustering
from tests.support.processes import ROOT


def cli(service: Clustering, embedding: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "dinocluster",
            "--url",
            service.url,
            "--embedding-url",
            embedding.url,
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def ok(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr + result.stdout
    return json.loads(result.stdout) if result.stdout.lstrip().startswith(("{", "[")) else None


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory, photo_jpegs: dict[str, bytes]) -> Path:
    root = tmp_path_factory.mktemp("images")
    for i, (name, data) in enumerate(photo_jpegs.items()):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        (folder / f"{name}.jpg").write_bytes(data)
    (root / "notes.txt").write_text("not an image")
    return root


def test_dataset_from_images_is_resumable(
    service: Clustering, embedding_service: Any, image_dir: Path, tmp_path: Path
) -> None:
    created = ok(cli(service, embedding_service, "--json", "dataset", "create", "cli-images"))
    assert created["name"] == "cli-images" and created["count"] == 0
    first = cli(
        service,
        embedding_service,
        "--json",
        "dataset",
        "add",
        "cli-images",
        str(image_dir),
        "--labels-from-dirs",
    )
    assert ok(first)["added"] == 7
    again = ok(
        cli(service, embedding_service, "--json", "dataset", "add", "cli-images", str(image_dir))
    )
    assert again == {"dataset": created["id"], "added": 0, "count": 7}
    shown = cli(service, embedding_service, "dataset", "show", "cli-images")
    assert shown.returncode == 0 and "cli-images" in shown.stdout and "7" in shown.stdout
    listed = ok(cli(service, embedding_service, "--json", "dataset", "list"))
    assert created["id"] in {d["id"] for d in listed}


def test_embed_to_npy_and_parquet(
    service: Clustering, embedding_service: Any, image_dir: Path, tmp_path: Path
) -> None:
    ok(
        cli(
            service,
            embedding_service,
            "--json",
            "embed",
            str(image_dir),
            "-o",
            str(tmp_path / "x.npy"),
        )
    )
    X = np.load(tmp_path / "x.npy")
    ids = (tmp_path / "x.ids.txt").read_text().split()
    assert X.shape == (7, 32) and len(ids) == 7 and ids[0].startswith(("a/", "b/"))
    ok(cli(service, embedding_service, "embed", str(image_dir), "-o", str(tmp_path / "x.parquet")))
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "x.parquet")
    assert table.column("id").to_pylist() == ids
    np.testing.assert_allclose(np.asarray(table.column("embedding").to_pylist()), X, rtol=1e-6)


def test_train_predict_assignments_update_alias(
    service: Clustering,
    embedding_service: Any,
    digits_vectors: tuple[np.ndarray, np.ndarray],
    image_dir: Path,
    tmp_path: Path,
) -> None:
    X, _ = digits_vectors
    np.save(tmp_path / "v.npy", X[:200])
    (tmp_path / "v.ids.txt").write_text("\n".join(f"v{i}" for i in range(200)))
    ok(cli(service, embedding_service, "dataset", "create", "cli-vectors"))
    added = ok(
        cli(
            service,
            embedding_service,
            "--json",
            "dataset",
            "add",
            "cli-vectors",
            str(tmp_path / "v.npy"),
        )
    )
    assert added["added"] == 200

    trained = cli(
        service,
        embedding_service,
        "--json",
        "train",
        "cli-vectors",
        "-m",
        "cli-model",
        "-k",
        "4",
        "-p",
        "n_init=2",
    )
    version = ok(trained)
    assert (
        version["version"] == 1 and version["n_clusters"] == 4 and version["params"]["n_init"] == 2
    )

    text = cli(service, embedding_service, "assignments", "cli-model")
    rows = list(csv.DictReader(io.StringIO(ok(text) or text.stdout)))
    assert len(rows) == 200 and set(rows[0]) == {"item_id", "cluster", "probability"}
    as_json = json.loads(
        cli(service, embedding_service, "assignments", "cli-model", "--format", "json").stdout
    )
    assert [r["item_id"] for r in as_json] == [r["item_id"] for r in rows]
    ok(
        cli(
            service,
            embedding_service,
            "assignments",
            "cli-model",
            "--format",
            "parquet",
            "-o",
            str(tmp_path / "a.parquet"),
        )
    )
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "a.parquet").num_rows == 200

    updated = ok(
        cli(service, embedding_service, "--json", "update", "cli-model", "-p", "max_epochs=2")
    )
    assert updated["kept_fraction"] >= 0.9
    moved = ok(cli(service, embedding_service, "--json", "alias", "cli-model", "production", "2"))
    assert moved["version"] == 2
    jobs = ok(cli(service, embedding_service, "--json", "jobs", "--model", "cli-model"))
    assert [j["type"] for j in jobs] == ["update", "train"]
    models = cli(service, embedding_service, "models", "cli-model")
    assert models.returncode == 0 and "kmeans" in models.stdout

    # prediction from image files needs a model on the images' dimension
    ok(cli(service, embedding_service, "dataset", "create", "cli-photos"))
    ok(cli(service, embedding_service, "dataset", "add", "cli-photos", str(image_dir)))
    ok(cli(service, embedding_service, "train", "cli-photos", "-m", "cli-photo-model", "-k", "2"))
    files = sorted(str(p) for p in image_dir.rglob("*.jpg"))[:2]
    predicted = ok(cli(service, embedding_service, "--json", "predict", "cli-photo-model", *files))
    assert len(predicted["predictions"]) == 2


def test_failures_exit_non_zero_with_the_reason(
    service: Clustering, embedding_service: Any, tmp_path: Path
) -> None:
    missing = cli(service, embedding_service, "dataset", "show", "no-such-dataset")
    assert missing.returncode == 1 and "no dataset" in missing.stderr
    ok(cli(service, embedding_service, "dataset", "create", "cli-empty"))
    empty = cli(service, embedding_service, "train", "cli-empty", "-m", "x")
    assert empty.returncode == 1 and "empty_dataset" in empty.stderr
    bad_param = cli(service, embedding_service, "train", "cli-empty", "-m", "x", "-p", "oops")
    assert bad_param.returncode == 2 and "key=value" in bad_param.stderr
    usage = cli(service, embedding_service, "assignments", "x", "--format", "xml")
    assert usage.returncode == 2
    down = subprocess.run(
        [sys.executable, "-m", "dinocluster", "--url", "http://127.0.0.1:9", "jobs"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert down.returncode == 1 and "cannot reach" in down.stderr
    assert cli(service, embedding_service, "embed", str(tmp_path), "-o", "x.npy").returncode == 2


@pytest.mark.slow
def test_demo_end_to_end() -> None:
    """The README's main-job command, in its script form."""
    from tests.support.processes import free_port, private_dir

    data_dir = private_dir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dinocluster",
            "--json",
            "demo",
            "--exit",
            "--model",
            "random:tiny",
            "--digits",
            "30",
            "--data-dir",
            str(data_dir),
            "--embedding-port",
            str(free_port()),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    try:
        summary = ok(result)
        assert summary["items"] == 30 + 24
        assert len(summary["assignments"]) == 54
        assert sum(c["size"] for c in summary["clusters"]) == 54
        assert summary["dashboard"].endswith("/dashboard")
    finally:
        from tests.support.processes import stop_postmaster

        stop_postmaster(data_dir / "postgres")
