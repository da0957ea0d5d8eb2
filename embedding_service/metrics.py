"""Prometheus metrics of one service instance.

Each app owns its own ``CollectorRegistry`` so that several apps (tests,
benchmarks) can live in one process without clashing.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Request latencies from a few ms (one image, idle GPU) to a minute (a full
# request queued behind others on CPU).
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServiceMetrics:
    """The metrics the embedding service exports at ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "embedding_requests",
            "Embedding requests by outcome (success or the error type).",
            ["outcome"],
            registry=r,
        )
        self.images = Counter(
            "embedding_images", "Images embedded and returned to clients.", registry=r
        )
        self.queue_images = Gauge(
            "embedding_queue_images",
            "Images admitted and not yet answered (decoding, queued or in the model).",
            registry=r,
        )
        self.ready = Gauge("embedding_ready", "1 when the model is loaded and warm.", registry=r)
        self.batch_size = Histogram(
            "embedding_batch_size",
            "Images per model forward pass.",
            buckets=_BATCH_SIZES,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "embedding_batch_seconds",
            "Duration of one model forward pass.",
            buckets=_SECONDS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "embedding_queue_seconds",
            "Per request: admission until the model starts on its first image (includes decoding).",
            buckets=_SECONDS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "embedding_inference_seconds",
            "Per request: first image entering the model until the last one leaves it.",
            buckets=_SECONDS,
            registry=r,
        )
        self.total_seconds = Histogram(
            "embedding_total_seconds",
            "Per request: admission until the embeddings are ready.",
            buckets=_SECONDS,
            registry=r,
        )

    def track_queue(self, depth: Callable[[], float]) -> None:
        """Read the queue depth from ``depth()`` at every scrape."""
        self.queue_images.set_function(depth)

    def observe_batch(self, images: int, seconds: float) -> None:
        self.batch_size.observe(images)
        self.batch_seconds.observe(seconds)

    def observe_request(
        self, images: int, queue_seconds: float, inference_seconds: float, total_seconds: float
    ) -> None:
        self.requests.labels("success").inc()
        self.images.inc(images)
        self.queue_seconds.observe(queue_seconds)
        self.inference_seconds.observe(inference_seconds)
        self.total_seconds.observe(total_seconds)

    def observe_failure(self, error_type: str) -> None:
        self.requests.labels(error_type).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
