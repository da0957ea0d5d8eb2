"""``/v1/jobs``: submit, list, show, follow (server-sent events), cancel."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import TypeAdapter

from clustering_service.api.deps import EngineDep, IdPath, RuntimeDep, parse_body, require_api_key
from clustering_service.api.errors_doc import errors
from clustering_service.db import jobs as jobs_db
from clustering_service.jobs.submit import submit
from clustering_service.runtime import ClusteringRuntime
from shared.clustering_schemas import (
    ID_PATTERN,
    NAME_PATTERN,
    TERMINAL_STATES,
    Job,
    JobCreate,
    JobList,
    JobState,
    TrainJobCreate,
    UpdateJobCreate,
)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_api_key)])

#: a stream re-reads its job this often even without a notification
_POLL_SECONDS = 2.0
#: comment lines keep idle connections (and proxies) alive
_KEEPALIVE_SECONDS = 15.0

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=200,
        description="Repeat a POST with the same key and body to get the same job back.",
    ),
]


#: the headers of a job submission's 202 (and of the 200 of a repeated Idempotency-Key)
JOB_HEADERS = {
    "Location": {
        "description": "The job's URL.",
        "required": True,
        "schema": {"type": "string", "pattern": "^/v1/jobs/"},
    }
}


#: the documented answers of a job submission (``POST /v1/jobs`` and a model's update)
JOB_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": Job,
        "description": "the job of an earlier request with the same Idempotency-Key",
        "headers": JOB_HEADERS,
    },
    202: {"headers": JOB_HEADERS},
    **errors(401, 404, 409, 413, 422, 503),
}


def job_response(row: Any, created: bool) -> JSONResponse:
    """202 + Location for a new job; 200 with the earlier job for a repeated key."""
    body = Job.model_validate(jobs_db.public(row)).model_dump(mode="json")
    return JSONResponse(
        body,
        status_code=202 if created else 200,
        headers={"Location": f"/v1/jobs/{row.id}"},
    )


_JOB_CREATE: TypeAdapter[TrainJobCreate | UpdateJobCreate] = TypeAdapter(JobCreate)


@router.post(
    "",
    status_code=202,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _JOB_CREATE.json_schema()}},
        }
    },
    response_model=Job,
    responses=JOB_RESPONSES,
)
async def create_job(
    request: Request,
    runtime: RuntimeDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Queue a train or update job (validated first: 4xx naming the field)."""
    body = await parse_body(request, _JOB_CREATE)
    row, created = await asyncio.to_thread(
        submit, runtime.engine, runtime.require_defer(), body, idempotency_key
    )
    return job_response(row, created)


@router.get("", response_model=JobList, responses=errors(401, 422))
def list_jobs(
    engine: EngineDep,
    state: JobState | None = None,
    model_name: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    dataset_id: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict:
    """Newest first, filtered by state, model and dataset."""
    rows = jobs_db.list_jobs(engine, state, model_name, dataset_id, limit)
    return {"jobs": [jobs_db.public(r) for r in rows]}


@router.get("/{job_id}", response_model=Job, responses=errors(401, 404))
def get_job(job_id: IdPath, engine: EngineDep) -> dict:
    return jobs_db.public(jobs_db.get(engine, job_id))


@router.post(
    "/{job_id}/cancel", status_code=202, response_model=Job, responses=errors(401, 404, 409, 503)
)
def cancel_job(job_id: IdPath, runtime: RuntimeDep) -> dict:
    """A queued job is cancelled at once; a running one stops at its next progress report
    (``cancel_requested`` is true until then). 409 for a job that has ended."""
    return jobs_db.public(jobs_db.request_cancel(runtime.engine, job_id, runtime.require_cancel()))


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **errors(401, 404)},
)
async def job_events(job_id: IdPath, request: Request, runtime: RuntimeDep) -> Response:
    """Server-sent events: ``event: job`` with the job object now and at every change of
    state or progress; the stream ends after the final state."""
    first = await asyncio.to_thread(jobs_db.get, runtime.engine, job_id)  # 404 before streaming
    return StreamingResponse(
        _stream(runtime, job_id, first, request),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _event(job: dict[str, Any], seq: int) -> bytes:
    data = Job.model_validate(job).model_dump_json()
    return f"id: {seq}\nevent: job\ndata: {data}\n\n".encode()


async def _stream(
    runtime: ClusteringRuntime, job_id: str, row: Any, request: Request
) -> AsyncIterator[bytes]:
    assert runtime.hub is not None
    with runtime.hub.subscribe(job_id) as changed:
        seq = 0
        last: str | None = None
        idle = 0.0
        while True:
            job = jobs_db.public(row)
            snapshot = json.dumps(job, default=str, sort_keys=True)
            if snapshot != last:
                seq += 1
                last = snapshot
                idle = 0.0
                yield _event(job, seq)
            if job["state"] in TERMINAL_STATES:
                return
            try:
                await asyncio.wait_for(changed.wait(), _POLL_SECONDS)
            except TimeoutError:
                idle += _POLL_SECONDS
                if await request.is_disconnected():
                    return
                if idle >= _KEEPALIVE_SECONDS:
                    idle = 0.0
                    yield b": keep-alive\n\n"
            changed.clear()
            row = await asyncio.to_thread(jobs_db.get, runtime.engine, job_id)
