"""procrastinate, the job transport: the task, deferral inside our transaction,
cancellation, and recovery of jobs whose worker died.

procrastinate claims jobs with ``SELECT ... FOR UPDATE SKIP LOCKED`` (two
workers never get the same job), wakes workers with LISTEN/NOTIFY, records a
heartbeat per worker, and delivers abort requests to running jobs. What it
leaves to the application is what to do with the running jobs of a worker
that stopped heartbeating: :func:`recover_stalled` retries them (procrastinate's
``get_stalled_jobs`` + ``retry_job``) up to ``job_max_attempts`` runs, then
fails them with a reason.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from procrastinate import App, JobContext, PsycopgConnector, RetryStrategy
from procrastinate.exceptions import ProcrastinateException
from procrastinate.jobs import Status
from sqlalchemy import Engine

from clustering_service.db import jobs as jobs_db
from shared.clustering_schemas import TERMINAL_STATES

log = logging.getLogger(__name__)

TASK_NAME = "dinocluster.run_job"
QUEUE = "dinocluster"


class JobInterrupted(Exception):
    """A run stopped because its worker shut down; procrastinate retries it."""


def _run_job(context: JobContext, job_id: str) -> None:
    runner = context.additional_context["runner"]
    runner.run(job_id, context)


def make_app(database_url: str, max_attempts: int) -> App:
    """A procrastinate App for ``database_url`` with our one task registered.

    The API uses one only to defer and cancel inside its own transactions (it
    never opens it); a worker opens its own.
    """
    app = App(
        connector=PsycopgConnector(conninfo=database_url, min_size=1, max_size=4),
    )
    app.task(
        name=TASK_NAME,
        queue=QUEUE,
        pass_context=True,
        # a shutdown re-queues the run; the runner fails the job once it used its attempts
        retry=RetryStrategy(max_attempts=max_attempts, retry_exceptions={JobInterrupted}),
    )(_run_job)
    return app


def deferrer(app: App) -> jobs_db.Deferrer:
    """``defer(raw_connection, job_id)`` for :func:`clustering_service.db.jobs.create`."""

    def defer(connection: Any, job_id: str) -> int:
        return app.configure_task(TASK_NAME, connection=connection).defer(job_id=job_id)

    return defer


def canceller(app: App) -> jobs_db.QueueCanceller:
    """``cancel(raw_connection, queue_job_id, abort)`` for ``db.jobs.request_cancel``."""

    def cancel(connection: Any, queue_job_id: int, abort: bool) -> bool:
        return app.job_manager.cancel_job_by_id(queue_job_id, abort=abort, connection=connection)

    return cancel


async def recover_stalled(
    app: App, engine: Engine, stalled_seconds: float, max_attempts: int
) -> int:
    """Retry (or fail, after ``max_attempts`` runs) the jobs of dead workers; returns
    how many were handled. Safe to run in several workers at once."""
    handled = 0
    for job in await app.job_manager.get_stalled_jobs(
        task_name=TASK_NAME, seconds_since_heartbeat=stalled_seconds
    ):
        job_id = job.task_kwargs.get("job_id")
        try:
            row = await asyncio.to_thread(jobs_db.get, engine, str(job_id))
        except Exception:
            row = None
        try:
            if row is None or row.state in TERMINAL_STATES:
                # the run ended (or its record is gone) but the worker died before telling
                # procrastinate
                await app.job_manager.finish_job_by_id_async(
                    job.id, status=Status.SUCCEEDED, delete_job=False
                )
            elif row.attempts >= max_attempts:
                reason = (
                    f"the worker running this job stopped responding, {row.attempts} times "
                    f"(limit job_max_attempts={max_attempts}); giving up"
                )
                await asyncio.to_thread(_fail, engine, row.id, reason)
                await app.job_manager.finish_job_by_id_async(
                    job.id, status=Status.FAILED, delete_job=False
                )
            else:
                await asyncio.to_thread(
                    jobs_db.requeue, engine, row.id, "its worker stopped responding"
                )
                await app.job_manager.retry_job(job)
            handled += 1
            log.warning("recovered job %s of a stalled worker", job_id)
        except ProcrastinateException as exc:  # another worker recovered it first
            log.info("job %s was recovered elsewhere: %s", job_id, exc)
    return handled


def _fail(engine: Engine, job_id: str, reason: str) -> None:
    with engine.begin() as conn:
        jobs_db.finish(conn, job_id, "failed", error={"type": "worker_lost", "message": reason})
