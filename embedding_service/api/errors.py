"""Map every failure to ``{"error": {"type", "message", ...}}`` with one status per type."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from embedding_service.errors import InvalidRequest, Overloaded, ServiceError

log = logging.getLogger(__name__)

# Starlette's own errors (unknown route, wrong method, ...) by status.
_HTTP_ERROR_TYPES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}

_IMAGE_FIELDS = ("images", "base64_images")


def _field_name(loc: Sequence[Any]) -> str:
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name


def invalid_request(errors: Sequence[Mapping[str, Any]]) -> InvalidRequest:
    """A pydantic/FastAPI validation error list -> one ``InvalidRequest`` naming the field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [part for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error") or first.get("msg", "")
        return InvalidRequest(f"the request body is not valid JSON ({detail})", field="body")
    if first.get("type") == "model_type" and not loc:
        return InvalidRequest("the request body must be a JSON object", field="body")
    field = _field_name(loc) or "body"
    extra: dict[str, Any] = {"field": field}
    if len(loc) >= 2 and loc[0] in _IMAGE_FIELDS and isinstance(loc[1], int):
        extra["index"] = loc[1]
    return InvalidRequest(f"{field}: {first.get('msg', 'invalid value')}", **extra)


def error_response(error: ServiceError) -> JSONResponse:
    headers = {}
    if isinstance(error, Overloaded):
        headers["Retry-After"] = str(error.extra.get("retry_after", 1))
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _count(request: Request, error_type: str) -> None:
    if request.url.path.startswith("/v1/"):
        request.app.state.runtime.metrics.observe_failure(error_type)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    if exc.status >= 500:
        log.warning("%s %s failed: %s", request.method, request.url.path, exc.message)
    _count(request, exc.type)
    return error_response(exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    error = invalid_request(exc.errors())
    _count(request, error.type)
    return error_response(error)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    error_type = _HTTP_ERROR_TYPES.get(exc.status_code, "http_error")
    _count(request, error_type)
    body = {"error": {"type": error_type, "message": str(exc.detail)}}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _client_disconnect(request: Request, exc: Exception) -> JSONResponse:
    # Nobody reads this response; count it and stay out of the error log.
    _count(request, "disconnected")
    return JSONResponse({"error": {"type": "disconnected", "message": "client went away"}}, 499)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    _count(request, "internal_error")
    body = {"error": {"type": "internal_error", "message": f"internal error: {exc!r}"}}
    return JSONResponse(body, status_code=500)


def register_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_disconnect)
    app.add_exception_handler(Exception, _unexpected)
