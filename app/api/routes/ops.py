"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.api import schemas
from app.api.deps import MetricsDep, RegistryDep

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=schemas.Health, summary="Alive (always open, even with an API key)")
def health() -> schemas.Health:
    return schemas.Health(status="ok")


@router.get(
    "/ready",
    response_model=schemas.Ready,
    responses={503: {"model": schemas.Ready}},
    summary="The default model loaded and warmed up",
)
async def ready(registry: RegistryDep, response: Response) -> schemas.Ready:
    served = registry.default_model
    if not served.ready:
        response.status_code = 503
    return schemas.Ready(
        ready=served.ready,
        status=served.status,
        model_version=served.version,
        **served.predictor.how_it_runs(),
        loaded=[model.version for model in registry.models],
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(registry: RegistryDep, metrics: MetricsDep) -> Response:
    metrics.queue_depth.set(registry.depth)
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
