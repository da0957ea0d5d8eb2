"""HTTP client of the embedding service (sync and asyncio), on httpx.

    with EmbeddingClient("http://localhost:8001") as client:
        vectors = client.embed_images([open("a.jpg", "rb").read(), ...])  # (n, dim) float32

Long lists are split into requests that respect the server's limits (images
per request and bytes per request, read once from ``/info``); 429 (honouring
``Retry-After``), 503 and connection errors are retried with backoff; any
other error raises :class:`EmbeddingServiceError` carrying the server's error
type, message and the failing image's index *in the caller's list*. Vectors
travel as base64 float32 by default: exact, and far cheaper to parse than JSON
numbers.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import httpx
import numpy as np
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from shared.schemas import Encoding, Pooling, decode_embeddings

ImageInput = bytes | str | os.PathLike[str]
"""Raw image bytes, an already base64-encoded string or data: URI, or a file path."""

DEFAULT_URL = "http://localhost:8001"
# Used when /info cannot be read; the server's own default is 256.
FALLBACK_MAX_BATCH = 32
# Leave room for the JSON around the images when packing requests by size.
_BODY_OVERHEAD = 1024


class ApiError(Exception):
    """An error answer of a dinocluster service (or no answer at all: status 0).

    ``type`` is the server's machine-readable error type (``invalid_image``,
    ``overloaded``, ``not_found``...), ``field`` the request field it names,
    ``index`` the failing item's position, ``retry_after`` the server's
    Retry-After in seconds.
    """

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        *,
        index: int | None = None,
        field: str | None = None,
        retry_after: float | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {type}: {message}")
        self.status = status
        self.type = type
        self.message = message
        self.index = index
        self.field = field
        self.retry_after = retry_after
        self.body = body or {}

    @property
    def retryable(self) -> bool:
        return self.status in (429, 503)

    @classmethod
    def from_response(cls, response: httpx.Response) -> Self:
        try:
            body = response.json()
            error = body["error"]
            error_type, message = str(error["type"]), str(error["message"])
        except (ValueError, KeyError, TypeError):
            body, error = {}, {}
            error_type, message = "http_error", response.text[:500] or response.reason_phrase
        retry_after = response.headers.get("retry-after")
        return cls(
            response.status_code,
            error_type,
            message,
            index=error.get("index"),
            field=error.get("field"),
            retry_after=float(retry_after) if retry_after and retry_after.isdigit() else None,
            body=body,
        )


class EmbeddingServiceError(ApiError):
    """An error answer of the embedding service; ``index`` is the failing image's
    position in the list the caller passed."""

    def shifted(self, offset: int) -> EmbeddingServiceError:
        """The same error with ``index`` relative to a list that starts ``offset`` earlier."""
        if self.index is None or offset == 0:
            return self
        index = self.index + offset
        return EmbeddingServiceError(
            self.status,
            self.type,
            f"{self.message} [image {index} of the list given to the client]",
            index=index,
            field=self.field,
            retry_after=self.retry_after,
            body=self.body,
        )


def encode_image(image: ImageInput) -> str:
    """Bytes or a path -> base64; a string is taken to be base64 or a data: URI already."""
    if isinstance(image, str):
        return image
    if isinstance(image, bytes | bytearray | memoryview):
        return base64.b64encode(image).decode("ascii")
    return base64.b64encode(Path(image).read_bytes()).decode("ascii")


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, ApiError):
        return exc.retryable
    return isinstance(exc, httpx.TransportError)


class _Base:
    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_batch: int | None = None,
        retries: int = 5,
        max_wait: float = 30.0,
        encoding: Encoding = "base64",
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.max_batch = max_batch
        self.max_bytes: int | None = None
        self.retries = retries
        self.max_wait = max_wait
        self.encoding = encoding
        self._backoff = wait_exponential_jitter(initial=0.2, max=max_wait)

    def _retry_options(self) -> dict[str, Any]:
        return {
            "stop": stop_after_attempt(self.retries + 1),
            "wait": self._wait,
            "retry": retry_if_exception(_is_retryable),
            "reraise": True,
        }

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, EmbeddingServiceError) and exc.retry_after is not None:
            return min(exc.retry_after, self.max_wait)
        return self._backoff(state)

    def _learn_limits(self, info: dict[str, Any] | None) -> None:
        server_max = int((info or {}).get("max_images_per_request") or FALLBACK_MAX_BATCH)
        self.max_batch = min(self.max_batch or server_max, server_max)
        if info and info.get("max_request_bytes"):
            self.max_bytes = int(info["max_request_bytes"])

    def _chunks(self, encoded: Sequence[str]) -> Iterator[tuple[int, list[str]]]:
        """(offset, images) chunks within the server's count and byte limits."""
        assert self.max_batch is not None
        budget = (self.max_bytes - _BODY_OVERHEAD) if self.max_bytes else None
        start, size = 0, 0
        for i, image in enumerate(encoded):
            # +3: the quotes and comma around each image in the JSON body.
            cost = len(image) + 3
            full = i - start >= self.max_batch or (
                budget is not None and i > start and size + cost > budget
            )
            if full:
                yield start, list(encoded[start:i])
                start, size = i, 0
            size += cost
        if start < len(encoded):
            yield start, list(encoded[start:])

    def _payload(
        self, images: list[str], normalize: bool, pooling: Pooling | None
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "images": images,
            "normalize": normalize,
            "encoding": self.encoding,
        }
        if pooling is not None:
            payload["pooling"] = pooling
        return payload

    @staticmethod
    def _result(response: httpx.Response, n: int) -> np.ndarray:
        if response.status_code != 200:
            raise EmbeddingServiceError.from_response(response)
        body = response.json()
        vectors = decode_embeddings(body["embeddings"], body["encoding"], int(body["dim"]))
        if vectors.shape[0] != n:
            raise EmbeddingServiceError(
                200, "bad_response", f"asked for {n} embeddings, got {vectors.shape[0]}"
            )
        return vectors

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            raise EmbeddingServiceError.from_response(response)
        return response


class EmbeddingClient(_Base):
    """Blocking client; thread-safe (one pooled ``httpx.Client``). See the module doc.

    Parameters
    ----------
    base_url : the service, e.g. ``http://localhost:8001``.
    api_key : sent as ``Authorization: Bearer <key>``.
    timeout : seconds per HTTP request.
    max_batch : most images per request (default: the server's
        ``max_images_per_request``).
    retries : extra attempts after 429/503/connection errors.
    encoding : wire encoding of the vectors (``base64`` or ``float``).
    """

    def __init__(self, base_url: str = DEFAULT_URL, **options: Any) -> None:
        transport = options.pop("transport", None)
        super().__init__(base_url, **options)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _get(self, path: str) -> httpx.Response:
        for attempt in Retrying(**self._retry_options()):
            with attempt:
                return self._check(self._http.get(path))
        raise AssertionError("unreachable")

    def info(self) -> dict[str, Any]:
        """``GET /info``: model, dim, limits, preprocessing."""
        return self._get("/info").json()

    def ready(self) -> bool:
        """True when ``/ready`` answers 200 (no retries)."""
        try:
            return self._http.get("/ready").status_code == 200
        except httpx.TransportError:
            return False

    def embed_images(
        self,
        images: Sequence[ImageInput],
        *,
        normalize: bool = True,
        pooling: Pooling | None = None,
    ) -> np.ndarray:
        """Embeddings of ``images`` in order, float32 of shape (len(images), dim)."""
        if not images:
            raise ValueError("no images to embed")
        encoded = [encode_image(image) for image in images]
        if self.max_batch is None or self.max_bytes is None:
            self._learn_limits(self._try_info())
        parts = [
            self._embed_chunk(chunk, offset, normalize, pooling)
            for offset, chunk in self._chunks(encoded)
        ]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _try_info(self) -> dict[str, Any] | None:
        try:
            return self.info()
        except (EmbeddingServiceError, httpx.TransportError):
            return None

    def _embed_chunk(
        self, chunk: list[str], offset: int, normalize: bool, pooling: Pooling | None
    ) -> np.ndarray:
        payload = self._payload(chunk, normalize, pooling)
        try:
            for attempt in Retrying(**self._retry_options()):
                with attempt:
                    response = self._http.post("/v1/embeddings", json=payload)
                    return self._result(response, len(chunk))
        except EmbeddingServiceError as exc:
            raise exc.shifted(offset) from None
        raise AssertionError("unreachable")


class AsyncEmbeddingClient(_Base):
    """asyncio client; ``concurrency`` requests of one call are in flight at once,
    which keeps the server's batcher fed. Same parameters as EmbeddingClient."""

    def __init__(
        self, base_url: str = DEFAULT_URL, *, concurrency: int = 4, **options: Any
    ) -> None:
        transport = options.pop("transport", None)
        super().__init__(base_url, **options)
        self.concurrency = concurrency
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncEmbeddingClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def info(self) -> dict[str, Any]:
        async for attempt in AsyncRetrying(**self._retry_options()):
            with attempt:
                return self._check(await self._http.get("/info")).json()
        raise AssertionError("unreachable")

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/ready")).status_code == 200
        except httpx.TransportError:
            return False

    async def embed_images(
        self,
        images: Sequence[ImageInput],
        *,
        normalize: bool = True,
        pooling: Pooling | None = None,
    ) -> np.ndarray:
        """Embeddings of ``images`` in order, float32 of shape (len(images), dim)."""
        if not images:
            raise ValueError("no images to embed")
        encoded = [encode_image(image) for image in images]
        if self.max_batch is None or self.max_bytes is None:
            try:
                info = await self.info()
            except (EmbeddingServiceError, httpx.TransportError):
                info = None
            self._learn_limits(info)
        chunks = list(self._chunks(encoded))
        limit = asyncio.Semaphore(self.concurrency)

        async def one(offset: int, chunk: list[str]) -> np.ndarray:
            async with limit:
                return await self._embed_chunk(chunk, offset, normalize, pooling)

        tasks = [asyncio.ensure_future(one(offset, chunk)) for offset, chunk in chunks]
        try:
            parts = await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # after a failure, stop sending the rest
                task.cancel()
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    async def _embed_chunk(
        self, chunk: list[str], offset: int, normalize: bool, pooling: Pooling | None
    ) -> np.ndarray:
        payload = self._payload(chunk, normalize, pooling)
        try:
            async for attempt in AsyncRetrying(**self._retry_options()):
                with attempt:
                    response = await self._http.post("/v1/embeddings", json=payload)
                    return self._result(response, len(chunk))
        except EmbeddingServiceError as exc:
            raise exc.shifted(offset) from None
        raise AssertionError("unreachable")
