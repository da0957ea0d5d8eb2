"""Every setting of the embedding service, with its default, in one place.

Read from the environment with the prefix ``EMBEDDING_`` (``EMBEDDING_PORT``,
``EMBEDDING_MAX_QUEUE_IMAGES``, ...); the command line (``python -m
embedding_service --help``) overrides the common ones. Nothing else in the
service reads ``os.environ``.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024

# Batch size when none is configured. On CPU a DINOv2 forward is compute bound
# from a handful of images on (larger batches only add latency); an
# accelerator needs dozens of images per batch to be kept busy.
DEFAULT_BATCH_SIZE = {"cpu": 8, "cuda": 64}


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Settings(BaseSettings):
    """Configuration of one embedding-service process."""

    model_config = SettingsConfigDict(env_prefix="EMBEDDING_", extra="ignore")

    # --- serving -------------------------------------------------------------
    host: str = Field("0.0.0.0", description="Interface to listen on.")
    port: int = Field(8001, ge=0, le=65535, description="TCP port (0 picks a free one).")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    access_log: bool = Field(True, description="Log one line per HTTP request.")
    api_key: SecretStr | None = Field(
        None,
        description="When set, /v1/* require 'Authorization: Bearer <key>'. "
        "/health, /ready, /info and /metrics stay open.",
    )

    # --- model ---------------------------------------------------------------
    model: str = Field(
        "facebook/dinov2-small",
        description="Hugging Face hub id, local directory saved with save_pretrained, "
        "or random:tiny|small|base|large|giant (random weights, for tests and benchmarks).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N.")
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        "auto",
        description="auto = bf16 (fp16 where unsupported) on CUDA, fp32 on CPU; fp16 is "
        "CUDA only, int8 (dynamic quantisation of the Linear layers) CPU only.",
    )
    pooling: Literal["cls", "mean", "cls_mean"] = Field(
        "cls", description="Default pooling when a request names none."
    )
    compile: bool = Field(False, description="torch.compile the model (slower start-up).")
    num_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads (default: torch's own choice)."
    )

    # --- batching and admission ---------------------------------------------
    batch_size: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Images per model forward pass. Default: 8 on CPU, 64 on CUDA.",
    )
    pad_batches: bool | None = Field(
        None,
        description="Pad every batch to batch_size. Fixed shapes make a vector bit-identical "
        "whatever shares its batch (GPU kernels change with the batch size) and suit "
        "torch.compile. Default: on for CUDA, off for CPU where padding is wasted compute.",
    )
    max_queue_images: int = Field(
        1024,
        ge=1,
        description="Images admitted and not yet answered (being decoded, waiting or in the "
        "model). A request that would exceed it is refused at once with 429 and Retry-After.",
    )
    # Bodies are read and parsed before their images can be counted, so without a
    # bound on bytes every waiting client costs its whole body in memory, refused or
    # not (the load test measured +740 MB at 256 clients sending camera photos).
    max_pending_bytes: int = Field(
        256 * MiB,
        ge=1024,
        description="Request body bytes admitted and not yet answered, by Content-Length "
        "(a body without one counts as max_request_bytes). A request that would exceed it, "
        "or any request while the image queue is full, is refused with 429 and Retry-After "
        "before its body is read.",
    )
    retry_after_seconds: int = Field(1, ge=0, description="Retry-After sent with 429.")
    preprocess_workers: int = Field(
        default_factory=lambda: min(32, available_cpus()),
        ge=1,
        description="Threads decoding and resizing images (Pillow releases the GIL).",
    )

    # --- request limits ------------------------------------------------------
    # 256 images: TEI's and infinity's 32 is their users' most common complaint;
    # 256 photos of ~180 KB base64 still fit max_request_bytes.
    max_images_per_request: int = Field(256, ge=1, description="Images in one request.")
    # TEI's 2 MB default is its most complained-about limit; 64 MiB holds a full
    # request of typical camera JPEGs while bounding memory per connection.
    max_request_bytes: int = Field(
        64 * MiB, ge=1024, description="Request body size; larger bodies get 413 unread."
    )
    max_image_pixels: int = Field(
        50_000_000, ge=1, description="Pixels per decoded image (decompression-bomb guard)."
    )
    min_image_size: int = Field(16, ge=1, description="Smallest accepted width/height (px).")
    fast_preprocess: bool = Field(
        True,
        description="Decode JPEGs at reduced scale when far larger than the target "
        "(checked against the reference transform).",
    )

    @model_validator(mode="after")
    def _queue_holds_a_full_request(self) -> Settings:
        if self.max_queue_images < self.max_images_per_request:
            raise ValueError(
                f"max_queue_images ({self.max_queue_images}) must be at least "
                f"max_images_per_request ({self.max_images_per_request}): a full request "
                "could never be admitted"
            )
        if self.max_pending_bytes < self.max_request_bytes:
            raise ValueError(
                f"max_pending_bytes ({self.max_pending_bytes}) must be at least "
                f"max_request_bytes ({self.max_request_bytes}): a full request could never "
                "be admitted"
            )
        return self

    def resolved_batch_size(self, device: str) -> int:
        """``batch_size``, or the default for the device the model landed on."""
        if self.batch_size is not None:
            return self.batch_size
        return DEFAULT_BATCH_SIZE["cuda" if device.startswith("cuda") else "cpu"]

    def resolved_pad_batches(self, device: str) -> bool:
        if self.pad_batches is not None:
            return self.pad_batches
        return device.startswith("cuda")
