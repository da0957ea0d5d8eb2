"""A stand-in embedding service in a thread, for faults the real one does not make
(answering too slowly, always busy)."""

from __future__ import annotations

import asyncio
import threading
import time

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from tests.support.processes import free_port, wait_ready


def slow_embedding_app(delay: float, dim: int = 32) -> FastAPI:
    """Answers ``/v1/embeddings`` correctly, but only after ``delay`` seconds."""
    app = FastAPI()

    @app.get("/ready")
    def ready() -> dict:
        return {"status": "ready"}

    @app.get("/info")
    def info() -> dict:
        return {"max_images_per_request": 64, "max_request_bytes": 1 << 26}

    @app.post("/v1/embeddings")
    async def embeddings(body: dict) -> JSONResponse:
        await asyncio.sleep(delay)
        n = len(body["images"])
        return JSONResponse(
            {
                "model": "stub",
                "dim": dim,
                "pooling": "cls",
                "normalized": True,
                "encoding": "float",
                "embeddings": [[1.0] + [0.0] * (dim - 1)] * n,
            }
        )

    return app


class ThreadedServer:
    """uvicorn serving ``app`` from a thread of this process, on a free port."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        wait_ready(self.url, timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        time.sleep(0)
