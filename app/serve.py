"""`serve`: run the HTTP service with uvicorn; every setting comes from CELLSEG_* environment variables.

Example:  CELLSEG_PORT=8080 CELLSEG_MODEL_VERSION=sartorius-w16-v2 serve
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.supervisors import Multiprocess

from app.api.metrics import MULTIPROCESS_FOLDER
from app.cli import tune_malloc, tune_malloc_of_children
from app.config import load_settings
from app.main import SHARED_MODELS_VARIABLE, create_app, load_predictor
from app.ml.errors import CheckpointError, InvalidOptionError


class IdleTimeoutProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, which closes a connection idle for keep_alive_seconds after a request; this
    also closes one that sends no request at all, so idle sockets cannot pile up until nothing else gets in."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # The first bytes received cancel it, as they cancel uvicorn's own keep-alive timer.
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", help="listen address (default: CELLSEG_HOST or 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port (default: CELLSEG_PORT or 8000)")
    args = parser.parse_args(argv)
    tune_malloc()
    settings = load_settings()
    # With several workers this process only checks the model folder and the settings, on the CPU: a GPU context
    # here would hold GPU memory for nothing while the workers load their own.
    checked = settings if settings.workers == 1 else settings.model_copy(update={"device": "cpu", "compile": False})
    try:  # quick: reads and checks the model folder; the slow warm-up runs once the server listens
        loaded = load_predictor(checked)
    except (CheckpointError, InvalidOptionError) as exc:
        raise SystemExit(f"cannot load the model: {exc}") from None
    # One worker: this process serves the model it loaded. Several: each worker process loads its own (the factory
    # reads the same CELLSEG_* environment), and this one only supervises them.
    app = create_app(settings, loaded) if settings.workers == 1 else "app.main:create_app"
    config = uvicorn.Config(
        app,
        host=args.host or settings.host,
        port=args.port or settings.port,
        factory=settings.workers > 1,
        workers=settings.workers,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=settings.keep_alive_seconds,
        http=IdleTimeoutProtocol,
        limit_concurrency=settings.max_connections,
    )
    if settings.workers > 1:
        del loaded  # checked; the workers load their own
        tune_malloc_of_children()
        with tempfile.TemporaryDirectory(prefix="cellseg-workers-") as folder:
            os.environ[MULTIPROCESS_FOLDER] = folder  # the workers add their metrics up there (app.api.metrics)
            # and keep the versions loaded beside the default there, so a load answered by one reaches them all
            os.environ[SHARED_MODELS_VARIABLE] = str(Path(folder) / "loaded-models.json")
            Multiprocess(config, sockets=[config.bind_socket()]).run()
        return
    server = uvicorn.Server(config)
    server.run()
    if not server.started:  # startup failed; the lifespan has logged why (e.g. a missing or corrupt model)
        raise SystemExit(3)


if __name__ == "__main__":
    main()
