"""Operations: liveness, readiness, the models, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.api import schemas
from app.api.deps import ServiceDep
from app.ml.checkpoint import default_version, list_versions

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=schemas.Health, summary="Alive (always open, even with an API key)")
def health() -> schemas.Health:
    return schemas.Health(status="ok")


@router.get("/ready", response_model=schemas.Ready, responses={503: {"model": schemas.Ready}},
            summary="Model loaded and warmed up")  # fmt: skip
def ready(service: ServiceDep, response: Response) -> schemas.Ready:
    predictor = service.predictor
    if not service.ready:
        response.status_code = 503
    return schemas.Ready(ready=service.ready, status=service.status,
                         model_version=predictor.version if predictor else None,
                         device=str(predictor.device) if predictor else None,
                         backend=predictor.backend.value if predictor else None,
                         precision=predictor.precision if predictor else None,
                         compiled=predictor.is_compiled if predictor else None,
                         tta=predictor.runner.tta if predictor else None)  # fmt: skip


@router.get("/models", response_model=schemas.Models, summary="The loaded model's model.json and the versions")
def models(service: ServiceDep) -> schemas.Models:
    store = service.settings.model_store
    return schemas.Models(loaded=service.card, available=list_versions(store), default=default_version(store))


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(service: ServiceDep) -> Response:
    if service.batcher is not None:
        service.metrics.queue_depth.set(service.batcher.depth)
    return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
