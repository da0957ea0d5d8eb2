"""Files of a model version (weights, assignments) stored in PostgreSQL.

Each file is split into chunks of :data:`CHUNK_BYTES` in ``artifact_chunks``
with its size and checksum in ``artifacts``; :func:`save_files` runs inside the
caller's transaction, the one that also creates the version row, so a version
is visible with all its files or not at all. :func:`fetch_files` gives a local
directory holding the files, from the checksummed cache when it has them,
otherwise read from the database, checked against the stored checksum and
cached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clustering_service.store.cache import CacheDir, file_checksum

CHUNK_BYTES = 8 * 1024 * 1024


class ArtifactCorrupted(RuntimeError):
    """A file read from the database does not match its stored checksum."""


def save_files(connection: Any, version_pk: int, directory: Path) -> dict[str, str]:
    """Store every file of ``directory`` for the version; returns ``{name: checksum}``.

    ``connection`` is a SQLAlchemy connection inside the caller's transaction.
    """
    raw = connection.connection.driver_connection
    checksums: dict[str, str] = {}
    with raw.cursor() as cur:
        for path in sorted(p for p in directory.iterdir() if p.is_file()):
            checksum = file_checksum(path)
            cur.execute(
                "INSERT INTO artifacts (version_pk, name, size, sha256) VALUES (%s, %s, %s, %s) "
                "RETURNING pk",
                (version_pk, path.name, path.stat().st_size, checksum),
            )
            artifact_pk = cur.fetchone()[0]
            with (
                open(path, "rb") as f,
                cur.copy(
                    "COPY artifact_chunks (artifact_pk, seq, data) FROM STDIN (FORMAT BINARY)"
                ) as copy,
            ):
                copy.set_types(["int8", "int4", "bytea"])
                seq = 0
                while chunk := f.read(CHUNK_BYTES):
                    copy.write_row((artifact_pk, seq, chunk))
                    seq += 1
            checksums[path.name] = checksum
    return checksums


def fetch_files(engine: Any, version_pk: int, cache: CacheDir) -> Path:
    """A local directory with the version's files (cached, verified)."""
    key = f"versions/{version_pk}"
    entry = cache.get(key)
    if entry is not None:
        return entry
    staged = cache.staging()
    checksums: dict[str, str] = {}
    try:
        with engine.connect() as connection:
            raw = connection.connection.driver_connection
            with raw.cursor() as cur:
                cur.execute(
                    "SELECT pk, name, size, sha256 FROM artifacts WHERE version_pk = %s",
                    (version_pk,),
                )
                for artifact_pk, name, size, checksum in cur.fetchall():
                    cur.execute(
                        "SELECT data FROM artifact_chunks WHERE artifact_pk = %s ORDER BY seq",
                        (artifact_pk,),
                    )
                    with open(staged / name, "wb") as f:
                        for (data,) in cur:
                            f.write(data)
                    got = file_checksum(staged / name)
                    if got != checksum or (staged / name).stat().st_size != size:
                        raise ArtifactCorrupted(
                            f"artifact {name!r} of version {version_pk} does not match its "
                            "stored checksum"
                        )
                    checksums[name] = checksum
            connection.rollback()
        if not checksums:
            raise ArtifactCorrupted(f"version {version_pk} has no stored files")
    except BaseException:
        cache.discard(staged)
        raise
    return cache.commit(key, staged, checksums)
