"""``python -m clustering_service``: the clustering API (with an in-process job
worker by default); ``python -m clustering_service worker``: a standalone job
worker (run any number, anywhere the database is reachable); ``python -m
clustering_service migrate``: bring the database schema up to date and exit.

Every option is also a ``CLUSTERING_*`` environment variable (see
``clustering_service/config.py``); flags given here win. Secrets (API keys,
the database URL's password) are read from the environment only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from clustering_service.config import Settings

EXIT_FAILED = 1
EXIT_BAD_SETTINGS = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m clustering_service",
        description="dinocluster clustering service. Every setting can also be given as a "
        "CLUSTERING_<NAME> environment variable (e.g. CLUSTERING_DATABASE_URL); flags "
        "override the environment.",
    )
    p.add_argument(
        "command",
        nargs="?",
        default="serve",
        choices=("serve", "worker", "migrate"),
        help="serve (default): the HTTP API; worker: a standalone job worker; migrate: "
        "upgrade the database schema and exit",
    )
    add = p.add_argument
    add("--host", help="interface to listen on (default 0.0.0.0)")
    add("--port", type=int, help="TCP port (default 8002)")
    add("--data-dir", help="embedded database and caches (default data/clustering)")
    add("--embedding-url", help="embedding service URL(s), comma-separated")
    add("--device", help="training device: auto | cpu | cuda | cuda:N (default auto)")
    add("--worker-concurrency", type=int, help="jobs one worker runs at once (default 1)")
    add(
        "--no-worker",
        dest="in_process_worker",
        action="store_false",
        default=None,
        help="serve without an in-process job worker (standalone workers do the jobs)",
    )
    add("--log-level", help="critical | error | warning | info | debug | trace (default info)")
    add(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        default=None,
        help="do not log every request",
    )
    return p


def parse(argv: Sequence[str] | None = None) -> tuple[str, Settings]:
    args = vars(_parser().parse_args(argv))
    command = args.pop("command")
    overrides: dict[str, Any] = {k: v for k, v in args.items() if v is not None}
    return command, Settings(**overrides)


def _serve(settings: Settings) -> int:
    import uvicorn

    from clustering_service.app import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=10,
        # the loop every test runs on (uvloop, where installed, is not tested with the
        # in-process worker's procrastinate and psycopg connections)
        loop="asyncio",
    )
    return 0


def _worker(settings: Settings) -> int:
    from clustering_service.db import migrate
    from clustering_service.db.engine import database_url, make_engine
    from clustering_service.jobs.worker import run_worker_forever
    from clustering_service.runtime import cache_dir

    url = database_url(settings)
    engine = make_engine(url, settings.db_pool_size)
    migrate.upgrade(engine)

    async def work() -> None:
        # SIGINT/SIGTERM cancel the worker: its running job is aborted and re-queued.
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await run_worker_forever(settings, url, engine, cache_dir(settings))

    asyncio.run(work())
    return 0


def _migrate(settings: Settings) -> int:
    from clustering_service.db import migrate
    from clustering_service.db.engine import database_url, make_engine

    revision = migrate.upgrade(make_engine(database_url(settings), 1))
    print(f"database schema at revision {revision}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        command, settings = parse(argv)
    except ValidationError as exc:
        print(f"invalid settings:\n{exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    logging.basicConfig(
        level=logging.getLevelName(settings.log_level.upper().replace("TRACE", "DEBUG")),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    run = {"serve": _serve, "worker": _worker, "migrate": _migrate}[command]
    try:
        return run(settings)
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        logging.getLogger("clustering_service").exception("failed")
        print(f"clustering service {command} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
