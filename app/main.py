"""Assembles the FastAPI app; the lifespan loads the model once, warms it up and starts the micro-batcher."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

import app as package
from app.api.deps import Service
from app.api.errors import install_error_handlers
from app.api.logs import configure_logging
from app.api.metrics import Metrics
from app.api.middleware import (
    AdmissionMiddleware,
    ApiKeyMiddleware,
    BodySizeLimitMiddleware,
    RequestContextMiddleware,
)
from app.api.routes import ops, page, segment
from app.config import Settings, worker_threads
from app.ml.checkpoint import load_checkpoint, resolve_model_folder
from app.ml.errors import CheckpointError, InvalidOptionError
from app.ml.imageio import ImageLimits
from app.ml.serving.batcher import MicroBatcher
from app.ml.serving.budget import PixelBudget
from app.ml.serving.pipeline import SegmentationPipeline
from app.ml.serving.predictor import Predictor

log = logging.getLogger("cellseg.service")

DESCRIPTION = """Finds every single cell in phase-contrast microscopy images with a U-Net
(Ronneberger et al. 2015). Post an image to `/segment`; get each cell as its own non-overlapping mask:
Kaggle-style RLE in JSON, a label image, or the files Fiji, QuPath and pycocotools open. A page at `/` does the
same for a person with a browser."""


def load_predictor(settings: Settings) -> tuple[Predictor, dict]:
    """The model named by the settings (or the store's default), verified and on its device, not yet warmed up.
    Blocking, and quick: what can be wrong with a model folder or a setting shows here, before the server
    listens."""
    checkpoint = load_checkpoint(resolve_model_folder(settings.model_store, settings.model_version))
    options = settings.model_copy(update={"torch_threads": worker_threads(settings)})
    # It compiles while warming up: without a warm-up, compiling is off (and cannot steer the backend's choice).
    predictor = Predictor.from_options(checkpoint, options, compile_network=settings.compile and settings.warmup)
    return predictor, checkpoint.card.without_host_paths().to_dict()


async def warm_up(service: Service) -> None:
    """Warm the model up (compiling it, when on) while the server already answers, then report ready.
    /health answers all along; /ready and /segment answer 503 with what is going on until then."""
    predictor = service.predictor
    try:
        if service.settings.warmup:
            service.status = "warming up the model (compiling it)" if predictor.runner.compiled else "warming up"
            await asyncio.to_thread(predictor.warm_up)
    except Exception as exc:  # a warm-up that fails leaves the service not ready, saying why, and running
        service.status = f"failed while warming up: {exc}"
        log.critical("the model failed while warming up: %s", exc, exc_info=exc)
        return
    service.ready, service.status = True, "ready"
    where = {"model_version": predictor.version, "device": str(predictor.device),
             "backend": predictor.backend.value, "precision": predictor.precision,
             "compiled": predictor.is_compiled}  # fmt: skip
    log.info("serving model %(model_version)s on %(device)s with %(backend)s in %(precision)s (compiled: "
             "%(compiled)s)", where, extra=where)  # fmt: skip


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    service: Service = app.state.service
    settings = service.settings
    try:
        predictor, card = app.state.loaded or await asyncio.to_thread(load_predictor, settings)
    except (CheckpointError, InvalidOptionError) as exc:
        log.critical("cannot load the model: %s", exc)
        raise
    max_batch = settings.max_batch or (8 if predictor.device.type == "cuda" else 1)
    batcher = MicroBatcher(predictor.run_network, max_batch, settings.max_wait_ms / 1000, settings.max_queue,
                           observe_batch=lambda size, seconds: service.metrics.observe_batch(size, seconds,
                                                                                              batcher.depth),
                           observe_skipped=service.metrics.observe_skipped)  # fmt: skip
    batcher.start()
    limits = ImageLimits(max_pixels=settings.max_pixels)
    service.predictor, service.card, service.batcher = predictor, card, batcher
    budget = PixelBudget(settings.max_request_pixels, settings.max_pixels_in_flight)
    service.pipeline = SegmentationPipeline(predictor, batcher, limits, service.metrics.observe_stage, budget)
    warming = None
    if settings.workers > 1:  # warm before taking connections, so no request meets a cold worker beside warm ones
        await warm_up(service)
    else:  # warm while /health already answers
        warming = asyncio.create_task(warm_up(service))
    try:
        yield
    finally:
        service.ready = False
        service.metrics.worker_stopped()
        if warming is not None:
            warming.cancel()  # the thread of a warm-up in progress runs to its end; nothing waits for it
        await batcher.stop()


def create_app(settings: Settings | None = None, loaded: tuple[Predictor, dict] | None = None) -> FastAPI:
    """The service; `loaded` is the model already loaded by load_predictor (serve loads it before it listens, so
    a bad model folder stops it with one line), else the lifespan loads it."""
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_json)
    # Swagger UI from the package's own files, so /docs works on a host without internet. No ReDoc: its page
    # fetches a logo from its makers' CDN.
    app = FastAPIOffline(title="cellseg", version=package.__version__, description=DESCRIPTION, lifespan=lifespan,
                         static_url="/static/docs", redoc_url=None)  # fmt: skip
    metrics = Metrics()
    app.state.service, app.state.loaded = Service(settings=settings, metrics=metrics), loaded
    app.include_router(ops.router)
    app.include_router(segment.router)
    app.include_router(page.router)
    app.mount("/static/page", StaticFiles(directory=page.STATIC), name="page")
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_upload_bytes)
    service = app.state.service
    app.add_middleware(AdmissionMiddleware, max_active=settings.max_active_requests,
                       is_full=lambda: service.pipeline is not None and service.pipeline.is_full)  # fmt: skip
    key = settings.api_key.get_secret_value() if settings.api_key else None
    app.add_middleware(ApiKeyMiddleware, key=key)  # before the body is read, on every route but /health
    app.add_middleware(RequestContextMiddleware, metrics=metrics)  # outermost: sees every answer, 413s too
    return app
