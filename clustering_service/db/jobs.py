"""Our ``jobs`` table: what the API shows of each job (state, progress, result,
error). procrastinate carries the job to a worker; this table is the record.

Every change is followed, in the same transaction, by ``NOTIFY`` on
:data:`CHANNEL` with the job id, so event streams (``GET /v1/jobs/{id}/events``)
learn about it at once, in whichever process they run.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Engine, func, select, text
from sqlalchemy.exc import IntegrityError

from clustering_service.db.tables import jobs
from clustering_service.errors import Conflict, NotFound
from shared.clustering_schemas import TERMINAL_STATES

CHANNEL = "dinocluster_jobs"

#: ``defer(raw_psycopg_connection, job_id) -> queue job id``, inside our transaction
Deferrer = Callable[[Any, str], int]
#: ``cancel(raw_psycopg_connection, queue_job_id, abort) -> done``
QueueCanceller = Callable[[Any, int, bool], bool]


def new_id() -> str:
    return "job_" + secrets.token_hex(8)


def _notify(conn: Connection, job_id: str) -> None:
    conn.execute(text("SELECT pg_notify(:channel, :id)"), {"channel": CHANNEL, "id": job_id})


def public(row: Any) -> dict[str, Any]:
    """A jobs row -> the API's job object."""
    m = row._mapping
    return {
        "id": m["id"],
        "type": m["type"],
        "state": m["state"],
        "dataset_id": m["dataset_id"],
        "model_name": m["model_name"],
        "algorithm": m["algorithm"],
        "params": (m["spec"] or {}).get("params", {}),
        "progress": m["progress"],
        "error": m["error"],
        "result": m["result"],
        "attempts": m["attempts"],
        "cancel_requested": m["cancel_requested"],
        "created_at": m["created_at"],
        "started_at": m["started_at"],
        "finished_at": m["finished_at"],
    }


def create(
    engine: Engine,
    spec: dict[str, Any],
    defer: Deferrer,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> tuple[Any, bool]:
    """Record a queued job and hand it to the queue in ONE transaction.

    Returns ``(row, created)``; with an ``idempotency_key`` seen before, the
    earlier job and False (Conflict when that key came with another request).
    """
    for _ in range(2):
        if idempotency_key is not None:
            existing = find_by_key(engine, idempotency_key)
            if existing is not None:
                if existing.request_hash != request_hash:
                    raise Conflict(
                        "this Idempotency-Key was used for a different request "
                        f"(job {existing.id!r})",
                        job_id=existing.id,
                    )
                return existing, False
        job_id = new_id()
        try:
            with engine.begin() as conn:
                conn.execute(
                    jobs.insert().values(
                        id=job_id,
                        type=spec["type"],
                        state="queued",
                        dataset_id=spec.get("dataset_id"),
                        model_name=spec.get("model_name"),
                        algorithm=spec.get("algorithm"),
                        spec=spec,
                        idempotency_key=idempotency_key,
                        request_hash=request_hash,
                    )
                )
                queue_id = defer(conn.connection.driver_connection, job_id)
                row = conn.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id)
                    .values(queue_job_id=queue_id)
                    .returning(*jobs.c)
                ).one()
                _notify(conn, job_id)
            return row, True
        except IntegrityError:
            if idempotency_key is None:
                raise
            # A concurrent request with the same key won the race: answer with its job.
    raise Conflict("could not record the job (Idempotency-Key race); retry the request")


def find_by_key(engine: Engine, key: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(*jobs.c).where(jobs.c.idempotency_key == key)).one_or_none()


def get(engine: Engine, job_id: str) -> Any:
    with engine.connect() as conn:
        row = conn.execute(select(*jobs.c).where(jobs.c.id == job_id)).one_or_none()
    if row is None:
        raise NotFound(f"no job with id {job_id!r}", resource="job")
    return row


def list_jobs(
    engine: Engine,
    state: str | None = None,
    model_name: str | None = None,
    dataset_id: str | None = None,
    limit: int = 100,
) -> list[Any]:
    query = select(*jobs.c).order_by(jobs.c.created_at.desc()).limit(limit)
    if state is not None:
        query = query.where(jobs.c.state == state)
    if model_name is not None:
        query = query.where(jobs.c.model_name == model_name)
    if dataset_id is not None:
        query = query.where(jobs.c.dataset_id == dataset_id)
    with engine.connect() as conn:
        return list(conn.execute(query).all())


def counts_by_state(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)).all()
    return {state: n for state, n in rows}


def start(engine: Engine, job_id: str, worker: str) -> Any | None:
    """Mark a queued job running (one more attempt); None when it is not queued
    (cancelled meanwhile, or already finished by an earlier run)."""
    with engine.begin() as conn:
        row = conn.execute(
            jobs.update()
            .where(jobs.c.id == job_id, jobs.c.state == "queued")
            .values(
                state="running",
                attempts=jobs.c.attempts + 1,
                started_at=func.coalesce(jobs.c.started_at, func.now()),
                worker=worker,
                progress={"stage": "starting"},
                updated_at=func.now(),
            )
            .returning(*jobs.c)
        ).one_or_none()
        if row is not None:
            _notify(conn, job_id)
    return row


def set_progress(engine: Engine, job_id: str, progress: dict[str, Any]) -> bool:
    """Store the progress of a running job; False when it is no longer running."""
    with engine.begin() as conn:
        done = conn.execute(
            jobs.update()
            .where(jobs.c.id == job_id, jobs.c.state == "running")
            .values(progress=progress, updated_at=func.now())
        ).rowcount
        if done:
            _notify(conn, job_id)
    return bool(done)


def finish(
    conn: Connection,
    job_id: str,
    state: str,
    *,
    error: dict[str, Any] | None = None,
    result: dict[str, Any] | None = None,
) -> bool:
    """End a job (inside the caller's transaction); False when it had ended already."""
    assert state in TERMINAL_STATES
    done = conn.execute(
        jobs.update()
        .where(jobs.c.id == job_id, jobs.c.state.in_(("queued", "running")))
        .values(
            state=state,
            error=error,
            result=result,
            finished_at=func.now(),
            updated_at=func.now(),
        )
    ).rowcount
    if done:
        _notify(conn, job_id)
    return bool(done)


def requeue(engine: Engine, job_id: str, reason: str) -> bool:
    """A running job whose run was interrupted goes back to queued (progress says why)."""
    with engine.begin() as conn:
        done = conn.execute(
            jobs.update()
            .where(jobs.c.id == job_id, jobs.c.state == "running")
            .values(state="queued", progress={"stage": "requeued", "reason": reason})
        ).rowcount
        if done:
            _notify(conn, job_id)
    return bool(done)


def request_cancel(engine: Engine, job_id: str, cancel_queued: QueueCanceller) -> Any:
    """Cancel a queued job at once, or ask a running one to stop (it ends ``cancelled``
    at its next progress check). Conflict for a job that has ended."""
    with engine.begin() as conn:
        row = conn.execute(
            select(*jobs.c).where(jobs.c.id == job_id).with_for_update()
        ).one_or_none()
        if row is None:
            raise NotFound(f"no job with id {job_id!r}", resource="job")
        if row.state in TERMINAL_STATES:
            raise Conflict(f"job {job_id!r} has already ended ({row.state})", state=row.state)
        raw = conn.connection.driver_connection
        if row.state == "queued" and cancel_queued(raw, row.queue_job_id, False):
            finish(conn, job_id, "cancelled", error=None)
        else:
            cancel_queued(raw, row.queue_job_id, True)
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(cancel_requested=True))
            _notify(conn, job_id)
        return conn.execute(select(*jobs.c).where(jobs.c.id == job_id)).one()


def cancel_requested(engine: Engine, job_id: str) -> bool:
    with engine.connect() as conn:
        return bool(
            conn.execute(select(jobs.c.cancel_requested).where(jobs.c.id == job_id)).scalar()
        )
