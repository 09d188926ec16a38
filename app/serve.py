"""`serve`: run the HTTP service with uvicorn; every setting comes from CELLSEG_* environment variables.

Example:  CELLSEG_PORT=8080 CELLSEG_MODEL_VERSION=sartorius-w16-v2 serve
"""

from __future__ import annotations

import argparse

import uvicorn

from app.cli import tune_malloc
from app.config import Settings
from app.main import create_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--host", help="listen address (default: CELLSEG_HOST or 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port (default: CELLSEG_PORT or 8000)")
    args = parser.parse_args(argv)
    tune_malloc()
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
