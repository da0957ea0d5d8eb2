"""Local cache files, verified by checksum before every use.

A cache entry is a directory holding data files and ``checksums.json``
(xxh3-128 of each file, written last). Entries are written to a temporary
directory and renamed into place, so a reader sees a complete entry or none;
a file that fails its checksum (bit rot, a half-copied directory, someone
editing it) makes the entry a miss, it is deleted and rebuilt from the
database. xxh3 runs at memory speed (a 1.5 GB snapshot verifies in a fraction
of a second, sha256 takes 1.4 s here); it guards against corruption, not
against an attacker who can write the data directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import xxhash

log = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"
_READ_BLOCK = 8 * 1024 * 1024


def file_checksum(path: Path) -> str:
    """xxh3-128 hex digest of a file, read in 8 MiB blocks."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


class CacheDir:
    """Checksummed entries under ``root`` (``root/<key>/...``), trimmed to ``max_bytes``."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def path(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str) -> Path | None:
        """The entry's directory when it is complete and every file checks out."""
        entry = self.root / key
        if not entry.is_dir():
            return None
        try:
            expected = json.loads((entry / CHECKSUMS).read_text())
            for name, checksum in expected.items():
                if file_checksum(entry / name) != checksum:
                    raise ValueError(f"{name} fails its checksum")
        except (ValueError, OSError) as exc:
            # a missing file too: the entry must go, or the rebuilt one could never be
            # renamed into its place and this broken one would be served again
            log.warning("cache entry %s is corrupted (%s); rebuilding it", entry, exc)
            shutil.rmtree(entry, ignore_errors=True)
            return None
        os.utime(entry)  # last use, for trimming
        return entry

    def staging(self) -> Path:
        """A fresh temporary directory to write an entry into (then :meth:`commit`)."""
        tmp = self.root / ".tmp" / uuid.uuid4().hex
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, key: str, staged: Path, checksums: dict[str, str] | None = None) -> Path:
        """Seal ``staged`` (checksumming its files unless given) and move it to ``key``."""
        if checksums is None:
            checksums = {p.name: file_checksum(p) for p in staged.iterdir() if p.is_file()}
        (staged / CHECKSUMS).write_text(json.dumps(checksums))
        entry = self.root / key
        entry.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staged, entry)
        except OSError:  # another process committed the same entry first
            shutil.rmtree(staged, ignore_errors=True)
        self.trim(keep={entry})
        return entry

    def discard(self, staged: Path) -> None:
        shutil.rmtree(staged, ignore_errors=True)

    def trim(self, keep: Iterable[Path] = ()) -> None:
        """Delete least recently used entries until the cache fits ``max_bytes``."""
        keep = set(keep)
        entries = []
        for entry in self._entries():
            # Other threads and processes commit, trim and stage concurrently: an
            # entry that vanishes while it is measured is simply no longer there.
            try:
                size = sum(p.stat().st_size for p in entry.iterdir() if p.is_file())
                entries.append((entry.stat().st_mtime, size, entry))
            except FileNotFoundError:
                continue
        total = sum(size for _, size, _ in entries)
        for _, size, entry in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if entry in keep:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            total -= size
        stale = time.time() - 3600
        for tmp in (self.root / ".tmp").glob("*"):
            with contextlib.suppress(FileNotFoundError):
                if tmp.stat().st_mtime < stale:  # left by a killed process
                    shutil.rmtree(tmp, ignore_errors=True)

    def _entries(self) -> list[Path]:
        """Every committed entry (a directory holding ``checksums.json``).

        ``os.walk`` skips directories that disappear under it, where ``Path.glob``
        raised (a staging directory renamed into place by another thread: a 500 on
        a predict that loaded a model, found by the load test); staging directories
        are not entries and are not walked.
        """
        found = []
        for parent, dirs, files in os.walk(self.root):
            if Path(parent) == self.root and ".tmp" in dirs:
                dirs.remove(".tmp")
            if CHECKSUMS in files:
                found.append(Path(parent))
        return found
