"""The service's path on the network's device (torch_steps and the torch instance step, as on CUDA) against the
CPU path, the reference: both run here on CPU tensors and must find the same cells."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from app.ml.checkpoint import resolve_model_folder
from app.ml.imageio import read_image
from app.ml.options import DeviceSteps, InferenceOptions
from app.ml.scoring.metric import score_per_threshold
from app.ml.serving import torch_steps
from app.ml.serving.predictor import Predictor
from app.ml.serving.steps import NumpySteps, TorchSteps
from app.ml.serving.tiler import extract_tiles
from tests.conftest import MODEL_STORE
from tests.ml.test_gpu_instances import foreground_agreement
from tests.test_bundled_model import validation_samples

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def reference() -> Predictor:
    return Predictor.from_checkpoint(resolve_model_folder(MODEL_STORE), InferenceOptions.float32())


@pytest.fixture(scope="module")
def on_device() -> Predictor:
    folder = resolve_model_folder(MODEL_STORE)
    return Predictor.from_checkpoint(folder, replace(InferenceOptions.float32(), steps_on_device="all"))


def test_the_steps_are_chosen_once_when_the_predictor_is_built(reference, on_device):
    assert isinstance(reference.steps, NumpySteps) and reference.options.steps_on_device is DeviceSteps.NONE
    assert isinstance(on_device.steps, TorchSteps) and on_device.options.steps_on_device is DeviceSteps.ALL
    assert on_device.runner.steps is on_device.steps and reference.runner.steps is reference.steps


@pytest.mark.parametrize(("shape", "mode"), [((520, 704), "resize"), ((300, 900), "tile"), ((50, 70), "tile")])
def test_the_cut_in_torch_gives_the_tilers_tiles(reference, shape, mode):
    """Resize, normalization and the mirrored overlap-tile, also where the mirror is wider than the image."""
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    tiles, grid, ran = reference.tiler.cut(image, mode)

    on_device, device_grid, device_ran = torch_steps.cut(reference.tiler, image, mode, CPU)

    assert (device_grid, device_ran) == (grid, ran)
    np.testing.assert_allclose(on_device.numpy(), tiles, atol=1e-4)


def test_the_maps_in_torch_are_the_tilers(reference):
    image = np.random.default_rng(1).random((300, 900), dtype=np.float32)
    prepared = reference.prepare(image, "tile")
    outputs = torch.softmax(torch.randn(len(prepared.tiles), 3, *prepared.tiles.shape[-2:]), dim=1)

    on_device = torch_steps.maps(outputs, prepared.grid, prepared.original_shape)

    np.testing.assert_allclose(on_device.numpy(), reference.maps(prepared, outputs.numpy()), atol=1e-5)


def test_the_path_on_the_device_finds_the_cells_of_the_cpu_path(reference, on_device, sartorius):
    for path in [sartorius / "train" / "0030fd0e6378.png", *sorted((sartorius / "test").glob("*.png"))]:
        image = read_image(path)
        expected, found = reference.predict(image, "auto"), on_device.predict(image, "auto")

        assert foreground_agreement(expected.labels, found.labels) >= 0.98, path.name
        assert abs(found.count - expected.count) <= max(2, 0.02 * expected.count), path.name
        assert (found.cell_type, found.labels.dtype) == (expected.cell_type, np.int32)


@pytest.mark.slow
def test_the_path_on_the_device_scores_the_validation_images_as_the_cpu_path(
    reference, on_device, reconstructed, sartorius
):
    scores = {"cpu": [], "device": []}
    for sample in validation_samples(reconstructed, sartorius):
        for name, predictor in (("cpu", reference), ("device", on_device)):
            labels = predictor.predict(sample.image, "auto").labels
            scores[name].append(score_per_threshold(sample.labels, labels).mean())

    assert np.mean(scores["device"]) == pytest.approx(np.mean(scores["cpu"]), abs=0.005)


def test_tiles_are_mirrored_as_numpy_pads_even_beyond_the_image(reference):
    """The tiles' mirror is an index map made by np.pad: on arrays and tensors alike it must be np.pad's mirror,
    also where the margin (112) is wider than the image (50x70)."""
    image = np.random.default_rng(2).random((50, 70), dtype=np.float32)
    _, grid, _ = reference.tiler.cut(image, "tile")
    pads = ((grid.margin, grid.tile_in[0] - grid.margin - 50), (grid.margin, grid.tile_in[1] - grid.margin - 70))
    mirrored = np.pad(image, pads, mode="reflect")

    for tiles in (extract_tiles(image, grid), torch_steps.extract_tiles(torch.from_numpy(image), grid).numpy()):
        np.testing.assert_array_equal(tiles[0], mirrored)


def test_test_time_augmentation_on_the_device_averages_the_same_views():
    folder = resolve_model_folder(MODEL_STORE)
    image = np.random.default_rng(3).random((130, 170), dtype=np.float32)
    cpu = Predictor.from_checkpoint(folder, replace(InferenceOptions.float32(), tta=8))
    on_device = Predictor.from_checkpoint(folder, replace(InferenceOptions.float32(), tta=8, steps_on_device="resize"))

    np.testing.assert_allclose(on_device.predict_maps(image), cpu.predict_maps(image), atol=1e-5)
