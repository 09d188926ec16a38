"""The model registry in one process, with the store's real models: an unloaded model leaves no reference behind,
and two registries sharing one SharedModels file (as two server workers do) load and unload together."""

from __future__ import annotations

import asyncio
import gc
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest

from app.config import Settings
from app.ml.imageio import ImageLimits
from app.ml.options import Mode
from app.ml.serving.budget import PixelBudget
from app.ml.serving.registry import ModelNotLoadedError, ModelRegistry, SharedModels, load_model
from tests.api.conftest import png
from tests.conftest import MODEL_STORE

DEFAULT, OTHER = "sartorius-w16-v3", "sartorius-w16-v1"
IMAGE = png(np.random.default_rng(0).integers(0, 256, (96, 128)).astype(np.uint8))


@pytest.fixture(scope="module")
def options(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    store = tmp_path_factory.mktemp("store")
    for version in (DEFAULT, OTHER):
        shutil.copytree(MODEL_STORE / version, store / version)
    (store / "DEFAULT").write_text(DEFAULT)
    return Settings(model_store=store, compile=False, warmup=False, torch_threads=1, device="cpu")


def registry(options: Settings, shared: SharedModels | None = None) -> ModelRegistry:
    started = ModelRegistry(options, load_model(options), PixelBudget(10**8, 10**8), ImageLimits(), shared=shared)
    started.start()
    return started


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, timeout=120))


async def cells(served_registry: ModelRegistry, version: str) -> int:
    served = await served_registry.acquire(version)
    with served.in_use():
        result = await served.pipeline.segment(IMAGE, Mode.RESIZE, served.pipeline.rules())
    return result.cell_count


def test_an_unloaded_model_leaves_no_reference_behind(options):
    async def scenario() -> list[weakref.ref]:
        models = registry(options)
        await models.warm_up_default()
        await models.load(OTHER)
        await cells(models, OTHER)
        served = await models.acquire(OTHER)
        refs = [weakref.ref(served), weakref.ref(served.predictor), weakref.ref(served.predictor.runner.model)]
        del served
        change = await models.unload(OTHER)
        assert (change.status, change.drained) == ("unloaded", 0)
        await models.close()
        return refs

    refs = run(scenario())
    gc.collect()
    assert [ref() for ref in refs] == [None, None, None]


def test_two_workers_sharing_the_file_load_and_unload_together(options, tmp_path: Path):
    async def scenario() -> None:
        first, second = (registry(options, SharedModels(tmp_path / "loaded-models.json")) for _ in range(2))
        for worker in (first, second):
            await worker.warm_up_default()
        await first.load(OTHER)
        assert [m.version for m in second.models] == [DEFAULT], "not yet: it follows at its next request"
        assert await cells(second, OTHER) >= 0  # waits for the second to load it, then answers
        assert [m.version for m in second.models] == [DEFAULT, OTHER]
        await second.unload(OTHER)  # answered by the other worker this time
        with pytest.raises(ModelNotLoadedError):
            await first.acquire(OTHER)  # the first catches up before it answers
        assert [m.version for m in first.models] == [DEFAULT]
        for worker in (first, second):
            await worker.close()

    run(scenario())
