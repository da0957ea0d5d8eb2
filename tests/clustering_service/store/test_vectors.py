"""Item vectors in PostgreSQL: idempotent all-or-nothing inserts, snapshots read by
binary rows, and the checksummed snapshot cache."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine

from clustering_service.db import datasets
from clustering_service.errors import DimensionMismatch, NotFound
from clustering_service.store.cache import CacheDir
from clustering_service.store.vectors import NewItems, add_items, delete_items, load_snapshot


def _items(n: int, dim: int, prefix: str = "i", seed: int = 0) -> NewItems:
    X = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return NewItems([f"{prefix}{i}" for i in range(n)], X, labels=[str(i % 3) for i in range(n)])


def test_insert_is_idempotent_and_counted(engine: Engine, dataset_id: str) -> None:
    new = _items(50, 8)
    first = add_items(engine, dataset_id, new)
    assert (first.added, first.duplicates, first.count, first.dim) == (50, 0, 50, 8)
    revision = datasets.get(engine, dataset_id)["revision"]
    again = add_items(engine, dataset_id, NewItems([*new.ids[:10], "new"], new.vectors[:11]))
    assert (again.added, again.duplicates, again.count) == (1, 10, 51)
    assert datasets.get(engine, dataset_id)["revision"] == revision + 1
    same = add_items(engine, dataset_id, NewItems(new.ids[:5], new.vectors[:5]))
    assert same.added == 0 and datasets.get(engine, dataset_id)["revision"] == revision + 1


def test_wrong_dimension_and_unknown_dataset_store_nothing(engine: Engine, dataset_id: str) -> None:
    add_items(engine, dataset_id, _items(5, 8))
    with pytest.raises(DimensionMismatch, match="8-d"):
        add_items(engine, dataset_id, _items(5, 9, prefix="x"))
    with pytest.raises(NotFound):
        add_items(engine, "ds_missing", _items(5, 8))
    assert datasets.get(engine, dataset_id)["count"] == 5


def test_snapshot_round_trip_in_insertion_order(engine: Engine, dataset_id: str) -> None:
    # more rows than one parsing block, so the block boundaries are crossed
    new = _items(40_000, 24)
    add_items(engine, dataset_id, new)
    snap = load_snapshot(engine, dataset_id)
    assert snap.ids == new.ids
    np.testing.assert_array_equal(snap.X, new.vectors)
    assert list(snap.labels[:4]) == ["0", "1", "2", "0"]
    assert np.all(np.diff(snap.pks) > 0)


def test_a_corrupted_vector_fails_the_snapshot_cleanly(engine: Engine, dataset_id: str) -> None:
    """A stored vector of the wrong length is named, the block reader stops (no thread
    left behind on the connection) and the engine's connections stay usable."""
    add_items(engine, dataset_id, _items(40_000, 8))
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE items SET vector = '\\x00' WHERE dataset_id = %(d)s AND item_id = 'i5'",
            {"d": dataset_id},
        )
    with pytest.raises(RuntimeError, match="corrupted"):
        load_snapshot(engine, dataset_id)
    assert not [t for t in threading.enumerate() if t.name == f"read {dataset_id}"]
    assert datasets.get(engine, dataset_id)["count"] == 40_000


def test_deleted_items_leave_the_snapshot(engine: Engine, dataset_id: str) -> None:
    new = _items(20, 4)
    add_items(engine, dataset_id, new)
    assert delete_items(engine, dataset_id, ["i3", "i7", "nope"]) == (2, 18)
    snap = load_snapshot(engine, dataset_id)
    assert "i3" not in snap.ids and len(snap.ids) == 18
    keep = [i for i in range(20) if i not in (3, 7)]
    np.testing.assert_array_equal(snap.X, new.vectors[keep])


def test_snapshot_cache_is_verified(engine: Engine, dataset_id: str, tmp_path: Path) -> None:
    cache = CacheDir(tmp_path / "cache", 1 << 30)
    new = _items(300, 16)
    add_items(engine, dataset_id, new)
    assert not load_snapshot(engine, dataset_id, cache).from_cache
    cached = load_snapshot(engine, dataset_id, cache)
    assert cached.from_cache
    np.testing.assert_array_equal(cached.X, new.vectors)
    # a flipped byte in the cached vectors: detected, rebuilt from the database
    (x_file,) = (tmp_path / "cache").glob("datasets/*/*/X.npy")
    data = bytearray(x_file.read_bytes())
    data[-1] ^= 0xFF
    x_file.write_bytes(bytes(data))
    rebuilt = load_snapshot(engine, dataset_id, cache)
    assert not rebuilt.from_cache
    np.testing.assert_array_equal(rebuilt.X, new.vectors)
    # a change of the dataset is a new revision: never served from the old entry
    add_items(engine, dataset_id, NewItems(["extra"], np.ones((1, 16), np.float32)))
    fresh = load_snapshot(engine, dataset_id, cache)
    assert not fresh.from_cache and len(fresh.ids) == 301


def test_cache_trims_oldest_entries(tmp_path: Path) -> None:
    cache = CacheDir(tmp_path, max_bytes=2500)
    for key in ("a", "b", "c"):
        staged = cache.staging()
        (staged / "data").write_bytes(b"x" * 1000)
        cache.commit(key, staged)
    assert cache.get("a") is None and cache.get("c") is not None
