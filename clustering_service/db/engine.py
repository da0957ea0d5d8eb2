"""Connections to PostgreSQL: the configured server, or an embedded one.

With ``CLUSTERING_DATABASE_URL`` unset, :func:`database_url` starts (or joins)
a PostgreSQL 16 from the ``pgserver`` wheel in ``<data_dir>/postgres``: it
listens on a Unix socket only, survives the processes that use it (so a killed
API finds its data again on restart) and is shared by every process of this
machine pointing at the same directory (an API and standalone workers).
If it stops (killed, crashed, stopped by hand) a running service starts it
again (:func:`watch_embedded`): no manual step.

Everything runs on psycopg 3: SQLAlchemy (``postgresql+psycopg``) for queries,
the raw connection for ``COPY`` and ``LISTEN``, procrastinate for jobs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from sqlalchemy import Engine, create_engine, event

from clustering_service.config import Settings

log = logging.getLogger(__name__)

_embedded: dict[str, Any] = {}
_embedded_lock = threading.Lock()


def database_url(settings: Settings) -> str:
    """A libpq URL (``postgresql://...``) for ``settings``, starting the embedded server
    when no URL is configured."""
    configured = settings.secret("database_url")
    if configured:
        return to_libpq_url(configured)
    pgdata = (settings.data_dir / "postgres").resolve()
    with _embedded_lock:
        server = _embedded.get(str(pgdata))
        if server is None:
            import pgserver

            pgdata.parent.mkdir(parents=True, exist_ok=True)
            log.info("starting the embedded PostgreSQL in %s", pgdata)
            # cleanup_mode=None: the server outlives this process, so a crash or
            # kill -9 of the API never takes the database down with it.
            server = pgserver.get_server(pgdata, cleanup_mode=None)
            _embedded[str(pgdata)] = server
    return server.get_uri()


#: seconds between checks that the embedded PostgreSQL still runs
EMBEDDED_WATCH_SECONDS = 2.0


def restart_embedded_if_stopped(settings: Settings) -> bool:
    """Start this process's embedded PostgreSQL again when it no longer runs (it
    crashed, was killed, or someone stopped it); True when it was started.

    A no-op with a configured database URL: a server of its own is run by others.
    """
    if settings.secret("database_url"):
        return False
    pgdata = (settings.data_dir / "postgres").resolve()
    with _embedded_lock:
        server = _embedded.get(str(pgdata))
    if server is None:
        return False
    from pgserver.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(pgdata)
    if info is not None and info.is_running():
        return False
    log.warning("the embedded PostgreSQL in %s is not running; starting it again", pgdata)
    # under pgserver's inter-process lock: another process of this data directory (a
    # worker, an operator) may be starting it at the same time
    with server._lock:
        server.ensure_postgres_running()
    log.info("the embedded PostgreSQL in %s runs again", pgdata)
    return True


async def watch_embedded(settings: Settings) -> None:
    """:func:`restart_embedded_if_stopped` every few seconds, until cancelled."""
    while True:
        await asyncio.sleep(EMBEDDED_WATCH_SECONDS)
        try:
            await asyncio.to_thread(restart_embedded_if_stopped, settings)
        except Exception as exc:  # e.g. its disk is full: try again at the next tick
            log.warning("could not start the embedded PostgreSQL again: %s", exc)


def to_libpq_url(url: str) -> str:
    """Accept SQLAlchemy-style URLs too (``postgresql+psycopg://``, ``postgres://``)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"database URL {url!r} has no scheme (postgresql://...)")
    base = scheme.split("+", 1)[0]
    if base not in ("postgresql", "postgres"):
        raise ValueError(f"database URL scheme {scheme!r} is not PostgreSQL")
    return f"postgresql://{rest}"


def make_engine(url: str, pool_size: int = 10) -> Engine:
    """A SQLAlchemy engine on psycopg 3 for a libpq URL; every session in UTC."""
    engine = create_engine(
        "postgresql+psycopg://" + url.partition("://")[2],
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
    )

    @event.listens_for(engine, "connect")
    def _utc(dbapi_connection: Any, _record: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET TIME ZONE 'UTC'")
        dbapi_connection.commit()

    return engine
