"""Throttled progress writes from a running job's algorithm callback."""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import Engine

from clustering_service.algorithms import Progress
from clustering_service.db import jobs as jobs_db

log = logging.getLogger(__name__)


class ProgressWriter:
    """``progress_callback`` for an estimator: stores the latest progress of job
    ``job_id`` at most every ``interval`` seconds (always on a change of stage).

    ``fraction`` is the share of the current stage done, when the stage knows
    its length.
    """

    def __init__(self, engine: Engine, job_id: str, interval: float) -> None:
        self.engine = engine
        self.job_id = job_id
        self.interval = interval
        self._last_write = 0.0
        self._last_stage: str | None = None

    def stage(self, name: str, **extra: Any) -> None:
        """A service-side stage (loading data, saving the version...)."""
        self(Progress(name, extra=extra))

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        if progress.stage == self._last_stage and now - self._last_write < self.interval:
            return
        fraction = None
        if progress.epochs:
            fraction = min(1.0, max(0.0, progress.epoch / progress.epochs))
        payload = {
            "stage": progress.stage,
            "epoch": progress.epoch,
            "epochs": progress.epochs,
            "loss": progress.loss,
            "label_change": progress.label_change,
            "fraction": fraction,
            **{k: v for k, v in progress.extra.items() if isinstance(v, int | float | str)},
        }
        try:
            jobs_db.set_progress(self.engine, self.job_id, payload)
        except Exception as exc:  # progress is best effort: never fail training for it
            log.warning("progress of job %s not stored: %s", self.job_id, exc)
        self._last_write = now
        self._last_stage = progress.stage
