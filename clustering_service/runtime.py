"""The running service: settings, database, queue, embedder, caches, metrics.

``start`` connects to PostgreSQL (starting the embedded one when no URL is
configured), migrates the schema, starts listening for job notifications and,
unless disabled, an in-process job worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from importlib import metadata
from typing import Any

from sqlalchemy import Engine, text

from clustering_service.config import Settings
from clustering_service.db import migrate
from clustering_service.db.engine import database_url, make_engine, watch_embedded
from clustering_service.db.jobs import Deferrer, QueueCanceller
from clustering_service.embedder import Embedder
from clustering_service.errors import NotReady
from clustering_service.events import JobEventHub
from clustering_service.jobs.queue import canceller, deferrer, make_app
from clustering_service.jobs.worker import run_worker_forever
from clustering_service.metrics import ServiceMetrics
from clustering_service.store.cache import CacheDir
from clustering_service.versions import VersionCache
from clustering_service.views import ViewCache

log = logging.getLogger(__name__)


def service_version() -> str:
    try:
        return metadata.version("dinocluster")
    except metadata.PackageNotFoundError:
        return "unknown"


def cache_dir(settings: Settings) -> CacheDir:
    return CacheDir(settings.data_dir / "cache", settings.cache_max_bytes)


class ClusteringRuntime:
    """Everything the routes need, built from one ``Settings``."""

    def __init__(self, settings: Settings, embedding_transport: Any = None) -> None:
        self.settings = settings
        self.embedder = Embedder(settings, transport=embedding_transport)
        self.cache = cache_dir(settings)
        self.metrics = ServiceMetrics()
        self._engine: Engine | None = None
        self.database_url: str | None = None
        self.hub: JobEventHub | None = None
        self.versions: VersionCache | None = None
        self.views = ViewCache()
        self._worker: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self.defer: Deferrer | None = None
        self.cancel: QueueCanceller | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise NotReady("the service is starting: the database is not connected yet")
        return self._engine

    def require_defer(self) -> Deferrer:
        if self.defer is None:
            raise NotReady("the service is starting: the job queue is not connected yet")
        return self.defer

    def require_cancel(self) -> QueueCanceller:
        if self.cancel is None:
            raise NotReady("the service is starting: the job queue is not connected yet")
        return self.cancel

    async def start(self) -> None:
        self.database_url = await asyncio.to_thread(database_url, self.settings)
        engine = make_engine(self.database_url, self.settings.db_pool_size)
        revision = await asyncio.to_thread(migrate.upgrade, engine)
        log.info("database schema at revision %s", revision)
        # never opened: it only defers and cancels inside our own transactions
        queue = make_app(self.database_url, self.settings.job_max_attempts)
        self.defer = deferrer(queue)
        self.cancel = canceller(queue)
        self.metrics.track_jobs(engine)
        self.versions = VersionCache(engine, self.cache, self.settings.model_cache_size)
        self.hub = JobEventHub(self.database_url)
        self.hub.start()
        self._engine = engine
        if self.settings.database_url is None:
            self._watch = asyncio.create_task(watch_embedded(self.settings))
        if self.settings.in_process_worker:
            self._worker = asyncio.create_task(
                run_worker_forever(self.settings, self.database_url, engine, self.cache)
            )
            self._worker.add_done_callback(_log_worker_end)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker
        if self.hub is not None:
            await self.hub.stop()
        await self.embedder.aclose()
        if self._engine is not None:
            self._engine.dispose()

    def not_ready_reason(self) -> str | None:
        """None when ready: database reachable, schema current, a worker alive."""
        if self._engine is None:
            return "starting: connecting to the database"
        try:
            with self._engine.connect() as conn:
                current = migrate.current_revision_on(conn)
                alive = conn.execute(
                    text(
                        "SELECT count(*) FROM procrastinate_workers WHERE last_heartbeat > "
                        "now() - make_interval(secs => :s)"
                    ),
                    {"s": self.settings.worker_stalled_seconds},
                ).scalar()
        except Exception as exc:
            return f"the database is unreachable: {type(exc).__name__}: {exc}"
        if current != migrate.head_revision():
            return f"the database schema is at {current}, this code needs {migrate.head_revision()}"
        if not alive:
            return (
                "no job worker has sent a heartbeat in the last "
                f"{self.settings.worker_stalled_seconds:g} s (start one with "
                "'python -m clustering_service worker' or set CLUSTERING_IN_PROCESS_WORKER=true)"
            )
        return None

    def info(self) -> dict[str, Any]:
        s = self.settings
        return {
            "service": "clustering",
            "version": service_version(),
            "database": "embedded" if s.database_url is None else "external",
            # the dashboard asks for a key before its first call instead of after a 401
            "api_key_required": s.api_key is not None,
            "schema_revision": migrate.head_revision(),
            "embedding_urls": s.embedding_urls,
            "in_process_worker": s.in_process_worker,
            "device": s.device,
            "max_request_bytes": s.max_request_bytes,
            "max_items_per_request": s.max_items_per_request,
            "max_images_per_request": s.max_images_per_request,
            "max_predict_rows": s.max_predict_rows,
            "job_max_attempts": s.job_max_attempts,
        }


def _log_worker_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the in-process job worker stopped", exc_info=task.exception())
