"""Job change notifications, fanned out to the event streams of this process.

One connection per API process LISTENs on the jobs channel (the workers
``NOTIFY`` it with the job id on every change, see :mod:`clustering_service.db.jobs`)
and wakes the streams watching that job. A stream also re-reads its job every
few seconds on its own, so a notification lost while the connection was
re-established delays an event, never loses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict

import psycopg

from clustering_service.db.jobs import CHANNEL

log = logging.getLogger(__name__)


class JobEventHub:
    """``subscribe(job_id)`` gives an Event set whenever the job changes."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self.connected = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.contextmanager
    def subscribe(self, job_id: str):  # type: ignore[no-untyped-def]
        event = asyncio.Event()
        self._waiters[job_id].add(event)
        try:
            yield event
        finally:
            self._waiters[job_id].discard(event)
            if not self._waiters[job_id]:
                del self._waiters[job_id]

    async def _listen(self) -> None:
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self.database_url, autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.connected = True
                    async for note in conn.notifies():
                        for event in self._waiters.get(note.payload, ()):
                            event.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("job notifications interrupted (%s); reconnecting", exc)
            finally:
                self.connected = False
            await asyncio.sleep(1.0)
