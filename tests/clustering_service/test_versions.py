"""The per-process cache of loaded versions under concurrent first use."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from clustering_service import versions
from clustering_service.versions import VersionCache


def test_concurrent_first_requests_load_a_version_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[str] = []

    def fetch(engine: Any, pk: int, cache: Any) -> Path:
        return tmp_path / str(pk)

    def load(path: str, device: str) -> object:
        loads.append(path)
        time.sleep(0.2)  # long enough for every thread to ask meanwhile
        return object()

    monkeypatch.setattr(versions, "fetch_files", fetch)
    monkeypatch.setattr(versions, "load", load)
    cache = VersionCache(engine=None, cache=None, size=2)  # type: ignore[arg-type]
    got: list[Any] = []
    threads = [threading.Thread(target=lambda: got.append(cache.get(7))) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1
    assert len(got) == 16 and all(g is got[0] for g in got)
    cache.get(8)
    cache.get(9)  # evicts 7 (size 2)
    cache.get(7)
    assert len(loads) == 4
