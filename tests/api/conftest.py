"""A real uvicorn process on 127.0.0.1 serving a checkpoint written by our own `train`."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.bench.localserver import running_server as start_server


@contextlib.contextmanager
def running_server(model_store: Path, **settings: str) -> Iterator[str]:
    """The service on 127.0.0.1 serving `model_store`; yields its base URL. Its log goes beside the store."""
    log = model_store.parent / f"server-{len(list(model_store.parent.glob('server-*.log')))}.log"
    with start_server(log, model_store=str(model_store), torch_threads="2", **settings) as server:
        yield server.url


@pytest.fixture(scope="session")
def server(trained_model: Path) -> Iterator[str]:
    # Micro-batches of up to 8 (the CUDA default; on CPU the service defaults to 1), so batching is exercised.
    with running_server(trained_model.parent, max_upload_bytes=str(8 * 1024 * 1024), max_batch="8") as url:
        yield url


@pytest.fixture
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=120) as http:
        yield http


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
