"""``python -m embedding_service``: serve DINOv2 embeddings over HTTP.

Every option is also an ``EMBEDDING_*`` environment variable (see
``embedding_service/config.py``); flags given here win. The model loads in
the background while ``/health`` already answers; if it cannot be loaded the
server stops and the process exits with status 1 and the reason.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

import uvicorn
from pydantic import ValidationError

from embedding_service.config import Settings

EXIT_MODEL_LOAD_FAILED = 1
EXIT_BAD_SETTINGS = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m embedding_service",
        description="DINOv2 image embedding service. Every setting can also be given as an "
        "EMBEDDING_<NAME> environment variable (e.g. EMBEDDING_MAX_QUEUE_IMAGES); "
        "flags override the environment. The API key is only read from EMBEDDING_API_KEY: "
        "a flag would show it to anyone who can list processes.",
    )
    add = p.add_argument
    add("--host", help="interface to listen on (default 0.0.0.0)")
    add("--port", type=int, help="TCP port (default 8001)")
    add(
        "--model",
        help="hub id, local save_pretrained directory, or random:tiny|small|base|"
        "large|giant (default facebook/dinov2-small)",
    )
    add("--revision", help="hub revision (branch, tag or commit)")
    add("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    add("--precision", help="auto | fp32 | bf16 | fp16 | int8 (default auto)")
    add("--pooling", help="default pooling: cls | mean | cls_mean (default cls)")
    add("--batch-size", type=int, help="images per forward pass (default 8 on CPU, 64 on CUDA)")
    add("--max-images-per-request", type=int, help="default 256")
    add("--max-request-bytes", type=int, help="default 64 MiB")
    add("--max-queue-images", type=int, help="images admitted and not yet answered (default 1024)")
    add(
        "--max-pending-bytes",
        type=int,
        help="request body bytes admitted and not yet answered (default 256 MiB)",
    )
    add("--preprocess-workers", type=int, help="decoding threads (default: CPUs available)")
    add("--num-threads", type=int, help="torch intra-op threads (default: torch's choice)")
    add("--compile", action="store_true", default=None, help="torch.compile the model")
    add("--log-level", help="critical | error | warning | info | debug | trace (default info)")
    add(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        default=None,
        help="do not log every request",
    )
    return p


def settings_from_args(argv: Sequence[str] | None = None) -> Settings:
    """Settings from the environment, overridden by the flags that were given."""
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}
    return Settings(**overrides)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = settings_from_args(argv)
    except ValidationError as exc:
        print(f"invalid settings:\n{exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    logging.basicConfig(
        level=logging.getLevelName(settings.log_level.upper().replace("TRACE", "DEBUG")),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Imported only now: torch and transformers take seconds to import, and
    # --help or a bad setting should answer at once.
    from embedding_service.app import create_app

    failure: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_fatal(exc: BaseException) -> None:
        failure.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=settings.access_log,
            timeout_graceful_shutdown=10,
        )
    )
    server.run()
    if failure:
        print(f"embedding service failed to start:\n{failure[0]}", file=sys.stderr)
        return EXIT_MODEL_LOAD_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
