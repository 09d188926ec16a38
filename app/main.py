"""Assembles the FastAPI app; the lifespan starts the model registry with the default model, warms it up and
starts its micro-batcher."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

import app as package
from app.api.errors import install_error_handlers
from app.api.logs import configure_logging
from app.api.metrics import Metrics
from app.api.middleware import (
    AdmissionMiddleware,
    ApiKeyMiddleware,
    BodySizeLimitMiddleware,
    RequestContextMiddleware,
)
from app.api.routes import models, ops, page, segment
from app.config import Settings
from app.ml.errors import CheckpointError, InvalidOptionError
from app.ml.imageio import ImageLimits
from app.ml.serving.budget import PixelBudget
from app.ml.serving.registry import LoadedModel, ModelRegistry, SharedModels, load_model

log = logging.getLogger("cellseg.service")

# Set by `serve` for its worker processes: the file where they keep the versions loaded beside the default.
SHARED_MODELS_VARIABLE = "CELLSEG_SHARED_MODELS_FILE"

DESCRIPTION = """Finds every single cell in phase-contrast microscopy images with a U-Net
(Ronneberger et al. 2015). Post an image to `/segment`; get each cell as its own non-overlapping mask:
Kaggle-style RLE in JSON, a label image, or the files Fiji, QuPath and pycocotools open. A page at `/` does the
same for a person with a browser. Several model versions can be served at once: `GET /models`,
`POST /models/{version}/load`, then `/segment?model={version}`."""


def load_predictor(settings: Settings) -> LoadedModel:
    """The default model named by the settings (or the store's default), verified and on its device, not yet warmed
    up. Blocking, and quick: what can be wrong with a model folder or a setting shows here, before the server
    listens."""
    return load_model(settings, settings.model_version)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    try:
        default = app.state.preloaded or await asyncio.to_thread(load_predictor, settings)
    except (CheckpointError, InvalidOptionError) as exc:
        log.critical("cannot load the model: %s", exc)
        raise
    shared = SharedModels(Path(os.environ[SHARED_MODELS_VARIABLE])) if SHARED_MODELS_VARIABLE in os.environ else None
    budget = PixelBudget(settings.max_request_pixels, settings.max_pixels_in_flight)  # one for every model
    limits = ImageLimits(max_pixels=settings.max_pixels)
    registry = app.state.registry = ModelRegistry(settings, default, budget, limits, metrics, shared)
    registry.start()
    warming = None
    if settings.workers > 1:  # warm before taking connections, so no request meets a cold worker beside warm ones
        await registry.warm_up_default()
    else:  # warm while /health already answers
        warming = asyncio.create_task(registry.warm_up_default())
    try:
        yield
    finally:
        metrics.worker_stopped()
        if warming is not None:
            warming.cancel()  # the thread of a warm-up in progress runs to its end; nothing waits for it
        await registry.close()


def create_app(settings: Settings | None = None, loaded: LoadedModel | None = None) -> FastAPI:
    """The service; `loaded` is the default model already loaded by load_predictor (serve loads it before it
    listens, so a bad model folder stops it with one line), else the lifespan loads it."""
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_json)
    # Swagger UI from the package's own files, so /docs works on a host without internet. No ReDoc: its page
    # fetches a logo from its makers' CDN.
    app = FastAPIOffline(
        title="cellseg",
        version=package.__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        static_url="/static/docs",
        redoc_url=None,
    )
    metrics = Metrics()
    app.state.settings, app.state.metrics, app.state.preloaded = settings, metrics, loaded
    app.include_router(ops.router)
    app.include_router(models.router)
    app.include_router(segment.router)
    app.include_router(page.router)
    app.mount("/static/page", StaticFiles(directory=page.STATIC), name="page")
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_upload_bytes)

    def is_full(model: str | None) -> bool:  # the registry is there once the lifespan has started
        return app.state.registry.is_full(model)

    app.add_middleware(AdmissionMiddleware, max_active=settings.max_active_requests, is_full=is_full)
    key = settings.api_key.get_secret_value() if settings.api_key else None
    app.add_middleware(ApiKeyMiddleware, key=key)  # before the body is read, on every route but /health
    app.add_middleware(RequestContextMiddleware, metrics=metrics)  # outermost: sees every answer, 413s too
    return app
