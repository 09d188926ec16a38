"""The loaded service and the dependencies routes ask for.

They are coroutines, though none of them waits on anything: FastAPI runs a plain function dependency in its
thread pool, and three thread hops per request cost more than the work they do.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader

from app.api.metrics import Metrics
from app.config import Settings
from app.ml.serving.batcher import MicroBatcher
from app.ml.serving.pipeline import SegmentationPipeline
from app.ml.serving.predictor import Predictor


@dataclass
class Service:
    """Everything the lifespan loads once: settings, the model card, the predictor and its batcher."""

    settings: Settings
    metrics: Metrics
    card: dict[str, Any] | None = None
    predictor: Predictor | None = None
    batcher: MicroBatcher | None = None
    pipeline: SegmentationPipeline | None = None
    ready: bool = False


async def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


async def get_pipeline(service: ServiceDep) -> SegmentationPipeline:
    if not service.ready or service.pipeline is None:
        raise HTTPException(503, "the model is still loading; retry in a few seconds", headers={"Retry-After": "2"})
    return service.pipeline


PipelineDep = Annotated[SegmentationPipeline, Depends(get_pipeline)]

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="needed when CELLSEG_API_KEY is set")


async def require_api_key(service: ServiceDep, key: Annotated[str | None, Security(_api_key_header)]) -> None:
    """When an API key is configured, compare the X-API-Key header with it in constant time."""
    expected = service.settings.api_key
    if expected is None:
        return
    given = (key or "").encode()
    if not hmac.compare_digest(given, expected.get_secret_value().encode()):
        raise HTTPException(401, "missing or wrong API key: send it in the X-API-Key header",
                            headers={"WWW-Authenticate": "APIKey"})  # fmt: skip
