"""FastAPI pieces both services use: error mapping, the body-size limit, API keys.

* :func:`register_error_handlers` maps every failure to ``{"error": {...}}``
  with one status per type (:mod:`shared.errors`), FastAPI's validation errors
  to ``invalid_request`` naming the field, anything unexpected to a logged 500.
* :class:`BodyLimitMiddleware` refuses request bodies over a limit without
  reading them.
* :func:`check_bearer` compares an ``Authorization: Bearer`` key in constant time.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import InvalidRequest, PayloadTooLarge, ServiceError, Unauthorized

log = logging.getLogger(__name__)

#: called with the error type of every failed request (for metrics)
ErrorCounter = Callable[[Request, str], None]

# Starlette's own errors (unknown route, wrong method, ...) by status.
_HTTP_ERROR_TYPES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


def _field_name(loc: Sequence[Any]) -> str:
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name


def invalid_request(
    errors: Sequence[Mapping[str, Any]], index_fields: Sequence[str] = ()
) -> InvalidRequest:
    """A pydantic/FastAPI validation error list -> one ``InvalidRequest`` naming the field.

    For a field in ``index_fields`` (a list of images, say) the position of the
    bad element is also given as ``index``.
    """
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [part for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error") or first.get("msg", "")
        return InvalidRequest(f"the request body is not valid JSON ({detail})", field="body")
    if first.get("type") == "model_type" and not loc:
        return InvalidRequest("the request body must be a JSON object", field="body")
    field = _field_name(loc) or "body"
    extra: dict[str, Any] = {"field": field}
    if len(loc) >= 2 and loc[0] in index_fields and isinstance(loc[1], int):
        extra["index"] = loc[1]
    return InvalidRequest(f"{field}: {first.get('msg', 'invalid value')}", **extra)


def error_response(error: ServiceError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


def register_error_handlers(
    app: FastAPI,
    count: ErrorCounter | None = None,
    index_fields: Sequence[str] = (),
    translate: Callable[[Exception], ServiceError | None] | None = None,
    translated_types: Sequence[type[Exception]] = (),
) -> None:
    """Install the handlers on ``app``; ``count(request, type)`` sees every failure.

    ``translate`` turns an exception that is not a :class:`ServiceError` into one
    (a lost database connection into a 503, say) or returns None: a logged 500.
    Name the exception classes it knows in ``translated_types``: those are then
    handled like errors of the service (Starlette re-raises, and so logs with a
    stack trace, whatever reaches the catch-all handler).
    """

    def counted(request: Request, error_type: str) -> None:
        if count is not None:
            count(request, error_type)

    async def service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        if exc.status >= 500:
            log.warning("%s %s failed: %s", request.method, request.url.path, exc.message)
        counted(request, exc.type)
        return error_response(exc)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        error = invalid_request(exc.errors(), index_fields)
        counted(request, error.type)
        return error_response(error)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400:
            # FastAPI's own body parsing failed (bytes that are not UTF-8, say): the same
            # 422 invalid_request as any other body that is not valid JSON
            error = InvalidRequest(
                f"the request body is not valid JSON ({exc.detail})", field="body"
            )
            counted(request, error.type)
            return error_response(error)
        error_type = _HTTP_ERROR_TYPES.get(exc.status_code, "http_error")
        counted(request, error_type)
        body = {"error": {"type": error_type, "message": str(exc.detail)}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    async def client_disconnect(request: Request, exc: Exception) -> JSONResponse:
        # Nobody reads this response; count it and stay out of the error log.
        counted(request, "disconnected")
        return JSONResponse({"error": {"type": "disconnected", "message": "client went away"}}, 499)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        translated = translate(exc) if translate is not None else None
        if translated is not None:
            return await service_error(request, translated)
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        counted(request, "internal_error")
        body = {"error": {"type": "internal_error", "message": f"internal error: {exc!r}"}}
        return JSONResponse(body, status_code=500)

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(ClientDisconnect, client_disconnect)
    app.add_exception_handler(Exception, unexpected)
    for exc_type in translated_types:
        app.add_exception_handler(exc_type, unexpected)


def check_bearer(request: Request, key: str | None) -> None:
    """Raise :class:`Unauthorized` unless ``Authorization: Bearer <key>`` (no-op without a key)."""
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'")


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` without reading them.

    A pure ASGI middleware, so it sees the body as it streams in: a declared
    ``Content-Length`` over the limit is answered with 413 before a single body
    byte is read, and a body without one (chunked) is cut off as soon as the
    bytes received pass the limit. The 413 carries ``Connection: close`` so the
    server drops the connection instead of draining the rest of the upload; the
    application behind sees a client disconnect and its own response is
    discarded.

    A client still uploading when the connection closes may see a connection
    reset instead of the 413 (its unsent bytes make the kernel reset the
    connection). Clients that declare a Content-Length and send ``Expect:
    100-continue`` (curl does for large bodies) always get the 413;
    ``shared.client`` splits requests to fit the server's limit from ``/info``.

    ``hint`` ends the error message (what the client should do instead).
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        on_reject: Callable[[], None] | None = None,
        hint: str = "send a smaller request",
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject
        self.hint = hint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send, f"the request body declares {int(declared)} bytes")
            return

        received = 0
        rejected = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    rejected = True
                    if not response_started:
                        await self._reject(send, f"the request body passed {self.max_bytes} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if rejected:
                return  # the 413 has been sent; whatever the app answers goes nowhere
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not rejected:
                raise

    async def _reject(self, send: Send, what: str) -> None:
        if self.on_reject is not None:
            self.on_reject()
        error = PayloadTooLarge(
            f"{what}; the limit is {self.max_bytes} bytes (setting max_request_bytes): "
            + self.hint,
            limit=self.max_bytes,
        )
        body = json.dumps(error.body()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": error.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
