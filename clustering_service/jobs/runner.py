"""Runs one job in a worker thread: state transitions, errors, cancellation.

``queued -> running -> succeeded | failed | cancelled``. A job that fails on
its input (an empty dataset, a bad parameter, a dimension mismatch) fails at
once with the reason; a job whose worker is shutting down goes back to the
queue (procrastinate retries it); a cancelled job stops at its next progress
report. The version and the ``succeeded`` state are written in one
transaction, so a job never ends ``succeeded`` without its version, and a
cancelled job never leaves one.
"""

from __future__ import annotations

import logging
from typing import Any

from procrastinate.job_context import AbortReason
from sqlalchemy import Engine

from clustering_service.algorithms import ClusteringCancelled, ClusteringInputError
from clustering_service.db import jobs as jobs_db
from clustering_service.db.models import JobNotRunning
from clustering_service.db.retry import through_outage
from clustering_service.errors import ServiceError, from_exception
from clustering_service.jobs import train as train_module
from clustering_service.jobs.progress import ProgressWriter
from clustering_service.jobs.queue import JobInterrupted
from clustering_service.store.cache import CacheDir

log = logging.getLogger(__name__)


class JobRunner:
    """Executes jobs for one worker process (``worker`` names it in the job record)."""

    def __init__(
        self,
        engine: Engine,
        cache: CacheDir,
        *,
        device: str,
        progress_interval: float,
        worker: str,
        max_attempts: int,
    ) -> None:
        self.engine = engine
        self.cache = cache
        self.device = device
        self.progress_interval = progress_interval
        self.worker = worker
        self.max_attempts = max_attempts

    def run(self, job_id: str, context: Any) -> None:
        """Run job ``job_id``; ``context`` is procrastinate's JobContext (abort requests)."""
        row = jobs_db.start(self.engine, job_id, self.worker)
        if row is None:
            log.info("job %s is not queued (cancelled or finished): skipped", job_id)
            return
        spec = row.spec
        ctx = train_module.JobContext(
            engine=self.engine,
            cache=self.cache,
            device=self.device,
            progress=ProgressWriter(self.engine, job_id, self.progress_interval),
            cancel_check=context.should_abort,
        )
        log.info("job %s (%s) started, attempt %d", job_id, spec["type"], row.attempts)
        try:
            work = train_module.train if spec["type"] == "train" else train_module.update
            version = work(ctx, job_id, spec)
            log.info("job %s succeeded: %s version %d", job_id, spec["model_name"], version)
        except ClusteringCancelled:
            if context.abort_reason() == AbortReason.SHUTDOWN:
                if row.attempts >= self.max_attempts:
                    reason = (
                        f"its worker shut down during each of its {row.attempts} runs "
                        f"(limit job_max_attempts={self.max_attempts})"
                    )
                    self._end(job_id, "failed", {"type": "worker_lost", "message": reason})
                    return
                jobs_db.requeue(self.engine, job_id, "its worker shut down")
                raise JobInterrupted(f"job {job_id}: worker shutting down") from None
            self._end(job_id, "cancelled", None)
            log.info("job %s cancelled", job_id)
        except JobNotRunning:
            log.info("job %s was cancelled while saving; its result is discarded", job_id)
        except ServiceError as exc:
            self._end(job_id, "failed", {"type": exc.type, "message": exc.message})
        except ClusteringInputError as exc:
            self._end(job_id, "failed", {"type": "invalid_input", "message": str(exc)})
        except Exception as exc:
            error = from_exception(exc)  # a full disk, the database away: say so
            if error is None:
                log.exception("job %s failed", job_id)
                self._end(job_id, "failed", {"type": "internal_error", "message": repr(exc)})
            else:
                log.warning("job %s failed: %s", job_id, error.message)
                self._end(job_id, "failed", {"type": error.type, "message": error.message})

    def _end(self, job_id: str, state: str, error: dict[str, str] | None) -> None:
        through_outage(self._finish, job_id, state, error)

    def _finish(self, job_id: str, state: str, error: dict[str, str] | None) -> None:
        with self.engine.begin() as conn:
            jobs_db.finish(conn, job_id, state, error=error)
