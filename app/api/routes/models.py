"""The models: which versions are loaded and which are in the store; load and unload them (app.ml.serving.registry
says how)."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter

from app.api import schemas
from app.api.deps import RegistryDep
from app.ml.serving.registry import Change, ModelRegistry, ServedModel

router = APIRouter(prefix="/models", tags=["models"])

CHANGE_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": schemas.Error, "description": "not in the model store (load), or not loaded (unload)"},
    409: {"model": schemas.Error, "description": "the default model: never unloaded, nor evicted to make room"},
    422: {"model": schemas.Error, "description": "not a version name, or a model folder that cannot be loaded"},
    500: {"model": schemas.Error, "description": "the model failed while loading or warming up"},
}


@router.get("", response_model=schemas.Models, summary="The versions loaded, and those in the store")
async def models(registry: RegistryDep) -> schemas.Models:
    registry.follow()  # with several workers: catch up with a load or unload another one answered
    return schemas.Models(
        default=registry.default,
        max_models=registry.max_models,
        loaded=[_state(served) for served in registry.models],
        loading=registry.loading,
        available=registry.available(),
        worker=os.getpid(),
    )


@router.get(
    "/{version}",
    summary="model.json of a version in the store, loaded or not",
    responses={404: CHANGE_ERRORS[404], 422: CHANGE_ERRORS[422]},
)
async def card(version: str, registry: RegistryDep) -> dict[str, Any]:
    return registry.card(version).to_dict()


@router.post(
    "/{version}/load",
    response_model=schemas.ModelChange,
    responses=CHANGE_ERRORS,
    summary="Load a version from the store, warm it up and serve it (a no-op if loaded)",
)
async def load(version: str, registry: RegistryDep) -> schemas.ModelChange:
    """Reads and verifies the version's folder (its weights' sha256), warms the model up (compiling it, when on)
    while the loaded models keep answering, then serves it: `/segment?model={version}`. With CELLSEG_MAX_MODELS
    loaded, it unloads the least recently used one other than the default, and says which (`evicted`). A load that
    fails changes nothing and says why."""
    return _answer(await registry.load(version), registry)


@router.post(
    "/{version}/unload",
    response_model=schemas.ModelChange,
    responses=CHANGE_ERRORS,
    summary="Stop serving a version and free its memory",
)
async def unload(version: str, registry: RegistryDep) -> schemas.ModelChange:
    """New requests for it are refused at once (409); the requests already using it finish on it first
    (`drained`). The default model is never unloaded (409)."""
    return _answer(await registry.unload(version), registry)


def _answer(change: Change, registry: ModelRegistry) -> schemas.ModelChange:
    return schemas.ModelChange(
        version=change.version,
        status=change.status,
        evicted=change.evicted,
        drained=change.drained,
        seconds=round(change.seconds, 3),
        loaded=[served.version for served in registry.models],
    )


def _state(served: ServedModel) -> schemas.ModelState:
    card = served.card
    return schemas.ModelState(
        version=served.version,
        default=served.pinned,
        ready=served.ready,
        status=served.status,
        **served.predictor.how_it_runs(),
        loaded_at=_iso(served.loaded_at),
        last_used_at=_iso(served.last_used_at) if served.last_used_at else None,
        in_flight=served.in_flight,
        card=schemas.CardSummary(
            created_at=card.created_at,
            code_version=card.code_version,
            architecture=card.architecture.to_dict(),
            validation_score=card.validation_score,
            weights_sha256=card.weights.sha256 if card.weights else None,
        ),
    )


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")
