"""Every setting of the clustering service, with its default, in one place.

Read from the environment with the prefix ``CLUSTERING_`` (``CLUSTERING_DATABASE_URL``,
``CLUSTERING_EMBEDDING_URL``, ...); ``python -m clustering_service --help``
overrides the common ones with flags. Nothing else in the service reads
``os.environ``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    """Configuration of one clustering-service process (API, worker, or both)."""

    model_config = SettingsConfigDict(env_prefix="CLUSTERING_", extra="ignore")

    # --- serving -------------------------------------------------------------
    host: str = Field("0.0.0.0", description="Interface to listen on.")
    port: int = Field(8002, ge=0, le=65535, description="TCP port (0 picks a free one).")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    access_log: bool = Field(True, description="Log one line per HTTP request.")
    api_key: SecretStr | None = Field(
        None,
        description="When set, /v1/* require 'Authorization: Bearer <key>'. "
        "/health, /ready, /info and /metrics stay open.",
    )

    # --- storage -------------------------------------------------------------
    database_url: SecretStr | None = Field(
        None,
        description="PostgreSQL URL (postgresql://user:pass@host:5432/db), the system of "
        "record. Unset: an embedded PostgreSQL 16 (pgserver) in <data_dir>/postgres.",
    )
    data_dir: Path = Field(
        Path("data/clustering"),
        description="Local directory: the embedded database (when no URL is given) and "
        "caches of vectors and model artifacts (always verified by checksum before use; "
        "safe to delete).",
    )
    cache_max_bytes: int = Field(
        20 * 1024 * MiB,
        ge=0,
        description="Size the local cache is trimmed to (oldest first) after each write.",
    )
    db_pool_size: int = Field(10, ge=1, description="Database connections per process.")

    # --- embedding service ---------------------------------------------------
    embedding_url: str = Field(
        "http://localhost:8001",
        description="Embedding service base URL, or several comma-separated (used round robin).",
    )
    embedding_api_key: SecretStr | None = Field(
        None, description="Sent to the embedding service as 'Authorization: Bearer <key>'."
    )
    embedding_timeout: float = Field(
        120.0, gt=0, description="Seconds per request to the embedding service."
    )
    embedding_retries: int = Field(
        4,
        ge=0,
        description="Extra attempts after connection errors, 429 and 503 (Retry-After "
        "honoured), with exponential backoff.",
    )
    embedding_batch_size: int = Field(
        32, ge=1, description="Images per request to the embedding service."
    )
    embedding_concurrency: int = Field(
        4, ge=1, description="Requests in flight to the embedding service per ingest call."
    )

    # --- workers -------------------------------------------------------------
    in_process_worker: bool = Field(
        True,
        description="Run a job worker inside the API process. Turn off when standalone "
        "workers (python -m clustering_service worker) do the training.",
    )
    worker_concurrency: int = Field(
        1, ge=1, description="Jobs one worker runs at once (training is CPU/GPU bound)."
    )
    worker_heartbeat_seconds: float = Field(
        10.0, gt=0, description="How often a worker reports that it is alive."
    )
    worker_stalled_seconds: float = Field(
        30.0,
        gt=0,
        description="A worker silent this long is dead: its running job is retried "
        "(or failed after job_max_attempts).",
    )
    job_max_attempts: int = Field(
        3, ge=1, description="Runs of a job whose worker died before it is failed."
    )
    device: str = Field("auto", description="Training device: auto | cpu | cuda | cuda:N.")
    progress_interval_seconds: float = Field(
        0.5, ge=0, description="Least time between two progress writes of a running job."
    )

    # --- limits --------------------------------------------------------------
    max_request_bytes: int = Field(
        256 * MiB, ge=1024, description="Request body size; larger bodies get 413 unread."
    )
    max_items_per_request: int = Field(
        100_000, ge=1, description="Items (vectors or images) in one ingest request."
    )
    max_images_per_request: int = Field(
        1024, ge=1, description="Images in one ingest or predict request."
    )
    max_predict_rows: int = Field(10_000, ge=1, description="Embeddings in one predict request.")
    max_dim: int = Field(16_384, ge=1, description="Largest accepted embedding dimension.")
    model_cache_size: int = Field(
        8, ge=1, description="Loaded model versions kept in memory for prediction (LRU)."
    )
    thumbnail_size: int = Field(
        96, ge=0, description="Longest side (px) of the WebP thumbnail kept per image (0: none)."
    )

    @field_validator("embedding_url")
    @classmethod
    def _urls(cls, value: str) -> str:
        urls = [u.strip() for u in value.split(",") if u.strip()]
        if not urls:
            raise ValueError("at least one embedding service URL is needed")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not an http(s) URL")
        return ",".join(urls)

    @property
    def embedding_urls(self) -> list[str]:
        return self.embedding_url.split(",")

    def secret(self, name: str) -> str | None:
        """The value of a SecretStr setting, or None."""
        value = getattr(self, name)
        return None if value is None else value.get_secret_value()
