"""A job worker: procrastinate's worker loop plus the stalled-job recovery sweep.

Runs inside the API process (``in_process_worker``, the default) or alone
(``python -m clustering_service worker``), any number on any machine that
reaches the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

from sqlalchemy import Engine

from clustering_service.config import Settings
from clustering_service.jobs.queue import QUEUE, make_app, recover_stalled
from clustering_service.jobs.runner import JobRunner
from clustering_service.jobs.train import preload
from clustering_service.store.cache import CacheDir

log = logging.getLogger(__name__)


#: seconds between restarts of a worker loop that stopped on an error (database restarting)
RESTART_SECONDS = 2.0


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


async def run_worker(
    settings: Settings,
    database_url: str,
    engine: Engine,
    cache: CacheDir,
) -> None:
    """Process jobs until cancelled. On cancellation a running job is aborted and
    re-queued for another worker."""
    app = make_app(database_url, settings.job_max_attempts)
    runner = JobRunner(
        engine,
        cache,
        device=settings.device,
        progress_interval=settings.progress_interval_seconds,
        worker=worker_name(),
        max_attempts=settings.job_max_attempts,
    )
    await asyncio.to_thread(preload)
    async with app.open_async():
        sweeper = asyncio.create_task(_sweep(app, engine, settings))
        try:
            await app.run_worker_async(
                queues=[QUEUE],
                name=worker_name(),
                concurrency=settings.worker_concurrency,
                additional_context={"runner": runner},
                install_signal_handlers=False,  # the caller decides how to stop
                update_heartbeat_interval=settings.worker_heartbeat_seconds,
                stalled_worker_timeout=settings.worker_stalled_seconds,
                # abort a running job at once: it goes back to the queue for another worker
                shutdown_graceful_timeout=0,
                abort_job_polling_interval=min(5.0, settings.worker_heartbeat_seconds),
            )
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper


async def run_worker_forever(
    settings: Settings,
    database_url: str,
    engine: Engine,
    cache: CacheDir,
) -> None:
    """:func:`run_worker`, restarted after any error (a database restart, say) until
    cancelled."""
    while True:
        try:
            await run_worker(settings, database_url, engine, cache)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("job worker stopped (%s: %s); restarting", type(exc).__name__, exc)
        await asyncio.sleep(RESTART_SECONDS)


async def _sweep(app: object, engine: Engine, settings: Settings) -> None:
    """Recover jobs of dead workers at start and then every half stall timeout."""
    while True:
        try:
            await recover_stalled(
                app,  # type: ignore[arg-type]
                engine,
                settings.worker_stalled_seconds,
                settings.job_max_attempts,
            )
        except Exception as exc:  # the database may be restarting: try again later
            log.warning("stalled-job sweep failed: %s", exc)
        await asyncio.sleep(settings.worker_stalled_seconds / 2)
