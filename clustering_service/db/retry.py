"""Writes a worker must not lose to a short database outage.

A job that trains through a PostgreSQL restart ends while the database may still
be away: storing its version, or recording its failure, then raises. Given up
at once, the job stayed ``running`` for good (its worker alive, so never found
stalled). These writes are retried until the database is back, for up to
``OUTAGE_SECONDS``; each is one transaction that checks the job is still
running, so a retry after a commit whose answer was lost stores nothing twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

from clustering_service.errors import DatabaseUnavailable, from_exception

log = logging.getLogger(__name__)

#: how long a worker keeps trying one write while PostgreSQL is away
OUTAGE_SECONDS = 120.0

T = TypeVar("T")


def _database_away(exc: BaseException) -> bool:
    return isinstance(from_exception(exc), DatabaseUnavailable)


def through_outage(fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """``fn(*args, **kwargs)``, called again (backing off up to 5 s) while it fails
    because the database is unreachable; any other error, or an outage longer than
    ``OUTAGE_SECONDS``, is raised."""
    for attempt in Retrying(
        retry=retry_if_exception(_database_away),
        stop=stop_after_delay(OUTAGE_SECONDS),
        wait=wait_exponential(multiplier=0.25, max=5),
        before_sleep=before_sleep_log(log, logging.WARNING),
        reraise=True,
    ):
        with attempt:
            return fn(*args, **kwargs)
    raise AssertionError("unreachable")  # Retrying either returns or raises
