"""Images -> vectors through the embedding service(s), over HTTP.

One :class:`~shared.client.AsyncEmbeddingClient` per configured URL; a call's
images are cut into fixed-size batches (``embedding_batch_size``) dealt round
robin over the URLs, at most ``embedding_concurrency`` requests in flight; a
batch whose service is unreachable moves on to the next URL.
The client retries connection errors, 429 and 503 with backoff (honouring
``Retry-After``) and times out each request; what still fails becomes one of
this service's errors naming the embedding service, with the failing image's
position in the caller's list. Nothing is returned (so nothing is stored)
unless every image was embedded.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np

from clustering_service.config import Settings
from clustering_service.errors import (
    EmbeddingServiceDown,
    EmbeddingServiceError,
    InvalidImage,
    ServiceError,
)
from shared.client import AsyncEmbeddingClient
from shared.client import EmbeddingServiceError as ClientError

# The embedding service names the image by its position in ITS request.
_IMAGE_PREFIX = re.compile(r"^image \d+:? ?")


class Embedder:
    """Embeds base64 images with the embedding service(s) of ``settings``."""

    def __init__(self, settings: Settings, transport: Any = None) -> None:
        self.urls = settings.embedding_urls
        self.batch_size = settings.embedding_batch_size
        self._limit = asyncio.Semaphore(settings.embedding_concurrency)
        self._clients = [
            AsyncEmbeddingClient(
                url,
                api_key=settings.secret("embedding_api_key"),
                timeout=settings.embedding_timeout,
                retries=settings.embedding_retries,
                max_batch=self.batch_size,
                concurrency=1,
                transport=transport,
            )
            for url in self.urls
        ]
        self._next = itertools.cycle(range(len(self._clients)))

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()

    async def ready(self) -> bool:
        """True when at least one embedding service answers /ready."""
        answers = await asyncio.gather(*(c.ready() for c in self._clients))
        return any(answers)

    async def info(self) -> dict[str, Any] | None:
        for client in self._clients:
            try:
                return await client.info()
            except (ClientError, httpx.HTTPError):
                continue
        return None

    async def embed(self, images: Sequence[str]) -> np.ndarray:
        """float32 (len(images), dim), in order; raises a ServiceError naming the problem."""
        starts = range(0, len(images), self.batch_size)
        tasks = [
            asyncio.ensure_future(
                self._one(next(self._next), start, images[start : start + self.batch_size])
            )
            for start in starts
        ]
        try:
            parts = await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # after one failure, send nothing more
                task.cancel()
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    async def _one(self, first: int, offset: int, images: Sequence[str]) -> np.ndarray:
        """One batch, on the client ``first``; when a service is unreachable or stays
        overloaded, on the next one, until every URL was tried."""
        error: ServiceError | None = None
        async with self._limit:
            for k in range(len(self._clients)):
                client = self._clients[(first + k) % len(self._clients)]
                try:
                    return await client.embed_images(list(images))
                except ClientError as exc:
                    error = _translate(exc, client.base_url, offset)
                except httpx.TransportError as exc:
                    error = EmbeddingServiceDown(
                        f"the embedding service at {client.base_url} could not be reached "
                        f"({type(exc).__name__}: {exc}); nothing was stored",
                        url=client.base_url,
                    )
                if not isinstance(error, EmbeddingServiceDown):
                    break  # the request itself is at fault: another service says the same
        assert error is not None
        raise error


def _translate(exc: ClientError, url: str, offset: int) -> ServiceError:
    if exc.type == "invalid_image" and exc.index is not None:
        index = offset + exc.index
        reason = _IMAGE_PREFIX.sub("", exc.message.split(" [image ")[0])
        detail = (exc.body.get("error") or {}).get("reason")
        return InvalidImage(f"image {index}: {reason}", index=index, reason=detail)
    if exc.status in (0, 429, 503):
        return EmbeddingServiceDown(
            f"the embedding service at {url} is unavailable ({exc.status} {exc.type}: "
            f"{exc.message}); nothing was stored",
            url=url,
        )
    if exc.status == 401:
        return EmbeddingServiceError(
            f"the embedding service at {url} refused this service's API key "
            "(setting CLUSTERING_EMBEDDING_API_KEY)",
            url=url,
        )
    return EmbeddingServiceError(
        f"the embedding service at {url} failed: {exc.status} {exc.type}: {exc.message}",
        url=url,
    )
