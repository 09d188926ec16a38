"""A real uvicorn process on 127.0.0.1 serving a checkpoint written by our own `train`."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(model_store: Path, **settings: str) -> Iterator[str]:
    """Start `python -m app.serve` with CELLSEG_* settings; yield its base URL once /ready says so."""
    port = free_port()
    env = {**os.environ, "CELLSEG_MODEL_STORE": str(model_store), "CELLSEG_TORCH_THREADS": "2",
           **{f"CELLSEG_{k.upper()}": v for k, v in settings.items()}}  # fmt: skip
    log = (model_store.parent / f"server-{port}.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "app.serve", "--host", "127.0.0.1", "--port", str(port)],
                               env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    headers = {"X-API-Key": settings["api_key"]} if "api_key" in settings else {}
    try:
        _wait_until_ready(url, process, headers)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _wait_until_ready(url: str, process: subprocess.Popen, headers: dict[str, str]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server exited with {process.returncode}"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", headers=headers, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError("the server did not become ready in 120 s")


@pytest.fixture(scope="session")
def server(trained_model: Path) -> Iterator[str]:
    with running_server(trained_model.parent, max_upload_bytes=str(8 * 1024 * 1024)) as url:
        yield url


@pytest.fixture
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=120) as http:
        yield http


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
