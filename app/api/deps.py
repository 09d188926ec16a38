"""The dependencies routes ask for: the settings, the metrics, the model registry, and the model a request names.

They are coroutines, though none of them waits on anything: FastAPI runs a plain function dependency in its
thread pool, and three thread hops per request cost more than the work they do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, HTTPException, Query, Request

from app.api.metrics import Metrics
from app.config import Settings
from app.ml.serving.registry import ModelNotLoadedError, ModelRegistry, ServedModel


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]


async def get_model(
    registry: RegistryDep,
    model: Annotated[
        str | None,
        Query(
            max_length=200,
            description="the model version to run (GET /models lists those loaded); default: the default model",
        ),
    ] = None,
) -> AsyncIterator[ServedModel]:
    """The loaded model the request names (`model=`), held for the request: unloading it waits for the request to
    finish. 404 for a version not in the store, 409 for one not loaded, 503 while it warms up."""
    try:
        served = await registry.acquire(model)
    except ModelNotLoadedError as exc:
        raise HTTPException(409, f"{exc}; load it first: POST /models/{model}/load") from exc
    with served.in_use():
        yield served


ModelDep = Annotated[ServedModel, Depends(get_model)]
