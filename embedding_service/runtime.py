"""The running service: settings, model backend, batcher, metrics, and its phase.

Start-up happens in the background (``start``) so that ``/health`` answers
while the model loads: ``loading`` -> ``warming`` -> ``ready``. A model that
cannot be loaded or warmed up puts the runtime in ``failed`` and calls
``on_fatal`` (``python -m embedding_service`` then stops the server and exits
non-zero with the error's message).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from importlib import metadata
from typing import Any, Literal

import numpy as np

from embedding_service.admission import ByteBudget
from embedding_service.batcher import Backend, Batcher
from embedding_service.config import Settings
from embedding_service.errors import NotReady
from embedding_service.metrics import ServiceMetrics
from embedding_service.model import POOLINGS, load_backend
from embedding_service.preprocess import PreprocessConfig, preprocess_base64

log = logging.getLogger(__name__)

Phase = Literal["loading", "warming", "ready", "failed", "stopped"]


def service_version() -> str:
    try:
        return metadata.version("dinocluster")
    except metadata.PackageNotFoundError:
        return "unknown"


def _device_kind(device: str) -> str:
    """``cpu`` or ``cuda`` for a device setting (``auto`` asks torch)."""
    if device.strip().lower() != "auto":
        return "cuda" if device.strip().lower().startswith("cuda") else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class EmbeddingRuntime:
    """Everything the routes need, built from one ``Settings``.

    ``backend`` may be given (tests inject a fake or a preloaded model);
    otherwise ``settings.model`` is loaded by ``start``.
    """

    def __init__(
        self,
        settings: Settings,
        backend: Backend | None = None,
        *,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.on_fatal = on_fatal
        self.metrics = ServiceMetrics()
        self.preprocess_config = PreprocessConfig(
            max_image_pixels=settings.max_image_pixels,
            min_image_size=settings.min_image_size,
            fast=settings.fast_preprocess,
        )
        device = getattr(getattr(backend, "info", None), "device", None) or settings.device
        self.batch_size = settings.resolved_batch_size(_device_kind(device))
        self.pending_bytes = ByteBudget(settings.max_pending_bytes)
        self.batcher: Batcher | None = None
        self.phase: Phase = "loading"
        self.error: BaseException | None = None
        self.version = service_version()

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Load (unless injected), warm up with a full batch, then serve."""
        s = self.settings
        try:
            if self.backend is None:
                device = _device_kind(s.device)
                self.backend = await asyncio.to_thread(
                    load_backend,
                    s.model,
                    revision=s.revision,
                    device=s.device,
                    precision=s.precision,
                    pad_to_batch=self.batch_size if s.resolved_pad_batches(device) else None,
                    compile=s.compile,
                    num_threads=s.num_threads,
                )
            self.phase = "warming"
            batcher = Batcher(
                self.backend,
                self._preprocess,
                batch_size=self.batch_size,
                max_queue_images=s.max_queue_images,
                preprocess_workers=s.preprocess_workers,
                retry_after_seconds=s.retry_after_seconds,
                on_batch=self.metrics.observe_batch,
            )
            self.batcher = batcher
            self.metrics.track_queue(lambda: batcher.depth)
            await batcher.start(warmup=True)
        except Exception as exc:
            self.phase = "failed"
            self.error = exc
            log.critical("embedding service start-up failed: %s", exc)
            if self.on_fatal is not None:
                self.on_fatal(exc)
            return
        self.phase = "ready"
        self.metrics.ready.set(1)
        log.info("ready: batch size %d, %s", self.batch_size, self.describe_model())

    async def stop(self) -> None:
        self.phase = "stopped"
        self.metrics.ready.set(0)
        if self.batcher is not None:
            await self.batcher.close()

    # --- state -------------------------------------------------------------------

    def _preprocess(self, image: str, index: int) -> np.ndarray:
        return preprocess_base64(image, self.preprocess_config, index)

    def not_ready_reason(self) -> str | None:
        """Why requests cannot be served now, or None when they can."""
        if self.phase == "ready":
            if self.batcher is not None and self.batcher.alive:
                return None
            death = self.batcher.death if self.batcher is not None else None
            return f"the model worker died: {death!r}"
        if self.phase == "failed":
            return f"the model failed to load: {self.error}"
        return {
            "loading": f"the model {self.settings.model!r} is loading",
            "warming": "the model is warming up",
            "stopped": "the embedding service is shutting down",
        }[self.phase]

    @property
    def worker_died(self) -> bool:
        return self.batcher is not None and self.batcher.death is not None

    def require_ready(self) -> Batcher:
        """The batcher, or ``NotReady`` saying why there is none to use."""
        reason = self.not_ready_reason()
        if reason is not None or self.batcher is None:
            raise NotReady(reason or "not ready")
        return self.batcher

    @property
    def model_id(self) -> str:
        info = getattr(self.backend, "info", None)
        return info.model_id if info is not None else self.settings.model

    def describe_model(self) -> str:
        info = getattr(self.backend, "info", None)
        if info is None:
            return self.settings.model
        return f"{info.model_id} on {info.device} ({info.precision}, dim {info.dim})"

    def info(self) -> dict[str, Any]:
        """What ``GET /info`` reports; model fields are null until the model is loaded."""
        s = self.settings
        model_info = getattr(self.backend, "info", None)
        model: dict[str, Any] = {
            "model": s.model,
            "revision": s.revision,
            "dim": None,
            "device": None,
            "dtype": None,
            "precision": None,
            "random_weights": None,
        }
        if model_info is not None:
            model.update(
                model=model_info.model_id,
                revision=model_info.revision,
                dim=model_info.dim,
                device=model_info.device,
                dtype=model_info.dtype,
                precision=model_info.precision,
                random_weights=model_info.random_weights,
                attn_implementation=getattr(model_info, "attn_implementation", None),
                pad_to_batch=getattr(model_info, "pad_to_batch", None),
                num_threads=getattr(model_info, "num_threads", None),
            )
        return {
            **model,
            "state": "worker_died" if self.worker_died else self.phase,
            "pooling": s.pooling,
            "poolings": list(POOLINGS),
            "batch_size": self.batch_size,
            "max_images_per_request": s.max_images_per_request,
            "max_request_bytes": s.max_request_bytes,
            "max_image_pixels": s.max_image_pixels,
            "min_image_size": s.min_image_size,
            "max_queue_images": s.max_queue_images,
            "max_pending_bytes": s.max_pending_bytes,
            "preprocess_workers": s.preprocess_workers,
            "preprocessing": self.preprocess_config.describe(),
            "auth": s.api_key is not None,
            "version": self.version,
        }
