"""Version files stored in PostgreSQL in chunks, fetched into a verified cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from clustering_service.store import artifacts
from clustering_service.store.artifacts import ArtifactCorrupted, fetch_files, save_files
from clustering_service.store.cache import CacheDir


@pytest.fixture
def version_pk(engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """A bare version row with two files, one spanning several chunks."""
    monkeypatch.setattr(artifacts, "CHUNK_BYTES", 1000)
    files = tmp_path / "files"
    files.mkdir()
    (files / "weights.bin").write_bytes(os.urandom(4500))
    (files / "config.json").write_text('{"a": 1}')
    with engine.begin() as conn:
        name = f"m{os.getpid()}{tmp_path.name[-6:]}"
        conn.execute(text("INSERT INTO models (name) VALUES (:n)"), {"n": name})
        pk = conn.execute(
            text(
                "INSERT INTO model_versions (model_name, version, algorithm, params, n_clusters, "
                "dim, item_count, next_cluster_id, metrics, clusters) VALUES "
                "(:n, 1, 'kmeans', '{}', 2, 2, 2, 2, '{}', '[]') RETURNING pk"
            ),
            {"n": name},
        ).scalar_one()
        save_files(conn, pk, files)
    return pk


def test_round_trip_and_cache(engine: Engine, version_pk: int, tmp_path: Path) -> None:
    cache = CacheDir(tmp_path / "cache", 1 << 30)
    directory = fetch_files(engine, version_pk, cache)
    assert (directory / "weights.bin").read_bytes() == (
        tmp_path / "files" / "weights.bin"
    ).read_bytes()
    assert (directory / "config.json").read_text() == '{"a": 1}'
    # a corrupted cached file is detected and fetched again
    (directory / "weights.bin").write_bytes(b"garbage")
    again = fetch_files(engine, version_pk, cache)
    assert (again / "weights.bin").read_bytes() == (tmp_path / "files" / "weights.bin").read_bytes()


def test_corrupted_database_copy_is_refused(
    engine: Engine, version_pk: int, tmp_path: Path
) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE artifact_chunks SET data = 'x' FROM artifacts WHERE artifacts.pk = "
                "artifact_chunks.artifact_pk AND artifacts.version_pk = :v AND seq = 1"
            ),
            {"v": version_pk},
        )
    with pytest.raises(ArtifactCorrupted, match="checksum"):
        fetch_files(engine, version_pk, CacheDir(tmp_path / "cache", 1 << 30))
    assert not list((tmp_path / "cache").glob("versions/*"))


@pytest.mark.parametrize("lost", ["weights.bin", "checksums.json"])
def test_cached_entry_missing_a_file_is_fetched_again(
    engine: Engine, version_pk: int, tmp_path: Path, lost: str
) -> None:
    """A lost file makes the entry a miss AND removes it: the rebuilt entry can then
    take its place (it used to stay, and the broken directory was served again)."""
    cache = CacheDir(tmp_path / "cache", 1 << 30)
    (fetch_files(engine, version_pk, cache) / lost).unlink()
    again = fetch_files(engine, version_pk, cache)
    assert (again / "weights.bin").read_bytes() == (tmp_path / "files" / "weights.bin").read_bytes()
    assert cache.get(f"versions/{version_pk}") == again
