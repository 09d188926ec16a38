"""The loaded service and the dependencies routes ask for.

They are coroutines, though none of them waits on anything: FastAPI runs a plain function dependency in its
thread pool, and three thread hops per request cost more than the work they do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request

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
    status: str = "loading the model"


async def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


async def get_pipeline(service: ServiceDep) -> SegmentationPipeline:
    if not service.ready or service.pipeline is None:
        raise HTTPException(503, f"not ready yet ({service.status}); retry in a few seconds",
                            headers={"Retry-After": "2"})  # fmt: skip
    return service.pipeline


PipelineDep = Annotated[SegmentationPipeline, Depends(get_pipeline)]
