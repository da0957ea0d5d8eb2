"""Refuse request bodies over ``max_request_bytes`` without reading them.

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
``shared.client`` splits requests to fit ``max_request_bytes`` from ``/info``
and never sends one that is too large.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedding_service.errors import PayloadTooLarge


class BodyLimitMiddleware:
    def __init__(
        self, app: ASGIApp, max_bytes: int, on_reject: Callable[[], None] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject

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
            "send fewer or smaller images per request",
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
