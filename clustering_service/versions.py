"""Loaded model versions, for prediction and assignments (an LRU per process).

A version is immutable, so a loaded one never goes stale: it is keyed by its
primary key and dropped only to make room. Loading goes through the
checksummed local cache of its files (:mod:`clustering_service.store.artifacts`).
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import Engine

from clustering_service.algorithms import BaseClusterer, load
from clustering_service.db import models as models_db
from clustering_service.jobs.train import ASSIGNMENTS_FILE, Assignments
from clustering_service.store.artifacts import fetch_files
from clustering_service.store.cache import CacheDir


@dataclass
class LoadedVersion:
    """A version's estimator, and its assignments read on first use."""

    pk: int
    estimator: BaseClusterer
    files: Callable[[], Path]
    _assignments: Assignments | None = None
    _by_cluster: tuple[np.ndarray, np.ndarray] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def assignments(self) -> Assignments:
        with self._lock:
            if self._assignments is None:
                # fetched again: the cache may have been trimmed since the model was loaded
                self._assignments = Assignments.read(self.files() / ASSIGNMENTS_FILE)
            return self._assignments

    def members(self, cluster: int | None) -> np.ndarray:
        """Row positions (ascending) of the items in ``cluster`` (all items for None)."""
        a = self.assignments()
        if cluster is None:
            return np.arange(len(a.ids))
        with self._lock:
            if self._by_cluster is None:
                order = np.argsort(a.cluster, kind="stable")
                self._by_cluster = (order, a.cluster[order])
            order, sorted_clusters = self._by_cluster
        lo, hi = np.searchsorted(sorted_clusters, [cluster, cluster + 1])
        return order[lo:hi]


class VersionCache:
    """At most ``size`` loaded versions, least recently used evicted first."""

    def __init__(self, engine: Engine, cache: CacheDir, size: int) -> None:
        self.engine = engine
        self.cache = cache
        self.size = size
        self._loaded: OrderedDict[int, LoadedVersion] = OrderedDict()
        self._numbered: dict[tuple[str, int], tuple[int, int, int]] = {}
        self._lock = threading.Lock()
        self._loading: dict[int, threading.Lock] = {}  # one per version being loaded

    def resolve(self, name: str, version: int | None, alias: str | None) -> tuple[int, int, int]:
        """``(pk, version, dim)``; a numbered version is immutable, so it is looked up in
        the database once, while latest and aliases are read every time (they move)."""
        if version is not None and alias is None:
            known = self._numbered.get((name, version))
            if known is not None:
                return known
        found = models_db.resolve_brief(self.engine, name, version, alias)
        if version is not None and alias is None:
            with self._lock:
                self._numbered[(name, version)] = found
        return found

    def get(self, pk: int) -> LoadedVersion:
        """The loaded version; concurrent first requests for it wait for one load."""
        with self._lock:
            hit = self._hit(pk)
            if hit is not None:
                return hit
            loading = self._loading.setdefault(pk, threading.Lock())
        # Without this, 64 concurrent predicts on a version not yet loaded each
        # fetched its files and built the estimator (the load test's cold start).
        with loading:
            with self._lock:
                hit = self._hit(pk)
            if hit is not None:
                return hit
            try:
                files = functools.partial(fetch_files, self.engine, pk, self.cache)
                loaded = LoadedVersion(pk, load(str(files()), device="cpu"), files)
            except BaseException:
                with self._lock:
                    self._loading.pop(pk, None)
                raise
            with self._lock:
                self._loaded[pk] = loaded
                self._loading.pop(pk, None)
                while len(self._loaded) > self.size:
                    self._loaded.popitem(last=False)
        return loaded

    def _hit(self, pk: int) -> LoadedVersion | None:
        hit = self._loaded.get(pk)
        if hit is not None:
            self._loaded.move_to_end(pk)
        return hit
