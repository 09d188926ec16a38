"""`serve`: run the HTTP service with uvicorn; every setting comes from CELLSEG_* environment variables.

Example:  CELLSEG_PORT=8080 CELLSEG_MODEL_VERSION=sartorius-w16-v1 serve
"""

from __future__ import annotations

import argparse
import ctypes
import os

import uvicorn

from app.config import Settings
from app.main import create_app


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas, unless MALLOC_ARENA_MAX says otherwise.

    glibc gives threads that allocate at the same time arenas of their own (up to 8 per core) and keeps freed
    memory in each; with the service's worker threads resident memory crept up for hundreds of requests (500 ->
    599 MiB over the first 200). With 2 arenas it stayed between 453 and 526 MiB from 50 to 1100 requests, with no
    trend, at the same throughput. A no-op where the C library is not glibc.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_arena_max = -8  # from glibc's malloc.h
    mallopt(m_arena_max, arenas)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--host", help="listen address (default: CELLSEG_HOST or 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port (default: CELLSEG_PORT or 8000)")
    args = parser.parse_args(argv)
    limit_malloc_arenas()
    settings = Settings()
    # One worker process: the model is loaded once and the micro-batcher sees every request.
    config = uvicorn.Config(create_app(settings), host=args.host or settings.host, port=args.port or settings.port,
                            log_config=None, access_log=False, timeout_graceful_shutdown=10)  # fmt: skip
    server = uvicorn.Server(config)
    server.run()
    if not server.started:  # startup failed; the lifespan has logged why (e.g. a missing or corrupt model)
        raise SystemExit(3)


if __name__ == "__main__":
    main()
