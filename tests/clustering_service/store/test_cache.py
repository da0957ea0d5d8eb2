"""The checksummed local cache under concurrent use (threads of one process)."""

from __future__ import annotations

import threading
from pathlib import Path

from clustering_service.store.cache import CacheDir


def test_concurrent_commits_and_trims_do_not_fail(tmp_path: Path) -> None:
    """Commits trim the cache while other threads stage and rename their entries: the
    trim's walk must skip what vanishes under it (it raised FileNotFoundError, a 500
    on predicts that loaded a model concurrently)."""
    cache = CacheDir(tmp_path / "cache", max_bytes=64 * 1024)
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(30):
                staged = cache.staging()
                (staged / "data.bin").write_bytes(bytes(1024))
                entry = cache.commit(f"versions/{n}-{i}", staged)
                assert (entry / "data.bin").exists() or not entry.exists()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    entries = list((tmp_path / "cache" / "versions").iterdir())
    total = sum(p.stat().st_size for e in entries for p in e.iterdir())
    assert total <= 64 * 1024 + 8 * 2048  # trimmed (each thread may keep its newest)
