import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from app.ml.celltypes import image_contrast
from app.ml.checkpoint import load_checkpoint, resolve_model_folder
from app.ml.errors import InvalidOptionError
from app.ml.imageio import read_image
from app.ml.options import Backend, DeviceSteps, InferenceOptions, Mode
from app.ml.postprocess import InstanceConfig, instance_maps
from app.ml.rules import InstanceRules
from app.ml.scoring.metric import image_score
from app.ml.serving.onnx_backend import onnxruntime_available
from app.ml.serving.predictor import Predictor
from app.ml.serving.runner import auto_backend, native_bfloat16, resolve, resolve_device_steps
from app.ml.transforms import PreprocessConfig
from app.ml.unet import UNet, UNetConfig
from tests.conftest import MODEL_STORE


def predictor(config=None, tta=1, **preprocess):
    torch.manual_seed(0)
    config = config or UNetConfig(base_width=4, depth=2)
    defaults = {"input_size": 64, "tile_size": 64, "tile_margin": 16}
    options = replace(InferenceOptions.float32(), tta=tta)
    return Predictor(UNet(config), PreprocessConfig(**{**defaults, **preprocess}), InstanceConfig(), options)


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("shape", [(50, 90), (130, 70), (16, 16)])
def test_instances_always_have_the_input_size(mode, shape):
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    instances = predictor().predict(image, mode)
    assert instances.labels.shape == shape


def test_resize_mode_feeds_the_network_the_model_input_size():
    prepared = predictor(input_size=60).prepare(np.zeros((520, 704), np.float32), Mode.RESIZE)
    assert prepared.tiles.shape == (1, 1, 60, 60)  # 60 mirrored up to the next multiple of the stride (4)
    assert prepared.original_shape == (520, 704)


def test_tile_mode_works_at_the_model_pixel_scale():
    pred = predictor(pixel_scale=(0.5, 0.25))
    assert pred.tiler.working_size((200, 400), Mode.TILE) == (100, 100)
    prepared = pred.prepare(np.zeros((200, 400), np.float32), Mode.TILE)
    assert prepared.tiles.shape == (16, 1, 64, 64)  # centres of 64 - 2 * 16 = 32: 100 / 32 -> 4 x 4 tiles


def test_the_paper_network_uses_overlap_tile_in_both_modes():
    config = UNetConfig(base_width=2, depth=2, num_classes=3, padded=False, batch_norm=False)
    pred = predictor(config, input_size=92)
    prepared = pred.prepare(np.zeros((100, 100), np.float32), Mode.RESIZE)
    assert prepared.tiles.shape[-2:] == (92, 92)
    assert pred.predict(np.zeros((100, 100), np.float32)).labels.shape == (100, 100)


def test_unknown_mode_is_refused():
    with pytest.raises(InvalidOptionError, match="unknown mode 'zoom'; accepted: auto, resize, tile"):
        predictor().prepare(np.zeros((20, 20), np.float32), "zoom")


def test_network_outputs_are_probabilities():
    pred = predictor()
    outputs = pred.run_network(np.random.default_rng(0).random((2, 1, 64, 64), dtype=np.float32))
    assert outputs.shape == (2, 3, 64, 64)
    assert np.allclose(outputs.sum(axis=1), 1.0, atol=1e-5)


def test_a_centre_model_outputs_class_probabilities_then_its_centre_map():
    pred = predictor(UNetConfig(base_width=4, depth=2, centre=True))
    outputs = pred.run_network(np.random.default_rng(0).random((2, 1, 64, 64), dtype=np.float32))
    assert outputs.shape == (2, 4, 64, 64)
    assert np.allclose(outputs[:, :3].sum(axis=1), 1.0, atol=1e-5)
    assert outputs[:, 3].min() > 0 and outputs[:, 3].max() < 1 and outputs[:, 3].std() > 0


def test_test_time_augmentation_over_the_eight_symmetries_makes_the_output_turn_with_the_input():
    tiles = np.random.default_rng(0).random((2, 1, 64, 64), dtype=np.float32)
    plain, averaged = predictor(), predictor(tta=8)
    turned = np.ascontiguousarray(np.rot90(tiles, 1, axes=(-2, -1)))
    # One network alone answers a turned input differently; the mean over the symmetries does not.
    assert np.abs(np.rot90(plain.run_network(turned), -1, axes=(-2, -1)) - plain.run_network(tiles)).max() > 1e-3
    np.testing.assert_allclose(
        np.rot90(averaged.run_network(turned), -1, axes=(-2, -1)), averaged.run_network(tiles), atol=1e-5
    )
    assert np.allclose(averaged.run_network(tiles).sum(axis=1), 1.0, atol=1e-5)
    flipped = np.ascontiguousarray(tiles[..., ::-1])
    for views in (2, 4):  # the left-right flip is among their views
        flips = predictor(tta=views)
        np.testing.assert_allclose(flips.run_network(flipped)[..., ::-1], flips.run_network(tiles), atol=1e-5)
    upside_down = np.ascontiguousarray(tiles[..., ::-1, :])
    two = predictor(tta=2)  # ... and the up-down one is not among 2
    assert np.abs(two.run_network(upside_down)[..., ::-1, :] - two.run_network(tiles)).max() > 1e-3


def test_test_time_augmentation_takes_one_two_four_or_eight_views():
    with pytest.raises(InvalidOptionError, match="1, 2, 4, 8"):
        predictor(tta=3)


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "native"),
    [(True, False, True), (False, True, True), (False, False, False), (None, None, False)],
)
def test_native_bfloat16_means_amx_or_avx512_bf16(monkeypatch, amx, avx512_bf16, native):
    """Intel AMX (Sapphire Rapids on) and AVX-512 BF16 (AMD Zen 4 on, Intel Cooper Lake) both compute bfloat16 in
    hardware; a torch without the (private) checks counts as neither."""
    for name, present in (("_is_amx_tile_supported", amx), ("_is_avx512_bf16_supported", avx512_bf16)):
        if present is None:
            monkeypatch.delattr(torch.cpu, name, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, name, lambda present=present: present)
    assert native_bfloat16() is native


def test_reduced_precision_on_the_cpu_is_bfloat16_where_the_cpu_computes_it_and_finds_the_same_cells(sartorius):
    folder = resolve_model_folder(MODEL_STORE)
    exact = Predictor.from_checkpoint(folder, InferenceOptions.float32())
    fast = Predictor.from_checkpoint(folder, replace(exact.options, half_precision=True))  # the model card allows it
    assert exact.precision == "float32"
    assert fast.precision == ("bfloat16" if native_bfloat16() else "float32")
    image = read_image(sartorius / "test" / "7ae19de7bc2a.png")
    expected, got = exact.predict_maps(image), fast.predict_maps(image)
    assert np.abs(got - expected).mean() < 0.01
    cells = exact.rules.find(expected, image_contrast(image))
    assert cells.count > 100
    assert image_score(cells.labels, fast.rules.find(got, image_contrast(image)).labels) > 0.9


def test_resizing_the_two_maps_finds_the_cells_of_the_three_resized_classes(sartorius):
    # finish() resizes the foreground and seed maps only: both are linear in the class probabilities, as the
    # resize is, so the cells are those of resizing every class first.
    pred = Predictor.from_checkpoint(resolve_model_folder(MODEL_STORE), InferenceOptions.float32())
    prepared = pred.prepare(read_image(sartorius / "test" / "7ae19de7bc2a.png"), Mode.RESIZE)
    outputs = pred.run_tiles(prepared.tiles)
    classes = pred.tiler.stitch(outputs, prepared.grid, prepared.original_shape)
    from_classes = pred.rules.find(instance_maps(classes), prepared.contrast)
    from_maps = pred.finish(prepared, outputs)
    assert from_maps.count == from_classes.count > 100
    assert (from_maps.labels == from_classes.labels).mean() > 0.9999
    np.testing.assert_allclose(from_maps.scores, from_classes.scores, atol=1e-5)


def compiled_pair(**preprocess):
    """A predictor and the same network through torch.compile, compiled while warming up."""
    eager, compiled = predictor(**preprocess), predictor(**preprocess)
    options = replace(compiled.options, compile=True)
    compiled = Predictor(compiled.runner.model, compiled.preprocess, compiled.rules, options)
    return eager, compiled


def test_the_compiled_network_gives_the_eager_networks_outputs_and_compiles_only_while_warming_up():
    eager, compiled = compiled_pair()
    assert not compiled.compiled  # nothing compiled before warming up
    compiled.warm_up()
    assert compiled.compiled
    # One shape per mode (resize: 64x64, tile: 64x64 tiles), at batch 1, the shapes the service sends.
    assert compiled.runner.compiled_network.shapes == {(1, 1, 64, 64)}
    tiles = np.random.default_rng(0).random((1, 1, 64, 64), dtype=np.float32)
    np.testing.assert_allclose(compiled.run_network(tiles), eager.run_network(tiles), atol=1e-4)
    # Another batch size after warming up runs uncompiled, at once, instead of stalling a request to compile.
    batch = np.random.default_rng(1).random((3, 1, 64, 64), dtype=np.float32)
    np.testing.assert_allclose(compiled.run_network(batch), eager.run_network(batch), atol=1e-6)
    assert compiled.runner.compiled_network.shapes == {(1, 1, 64, 64)}


COMPILE_WITHOUT_COMPILER = """
import logging, numpy as np, torch
from app.ml.options import InferenceOptions
from app.ml.postprocess import InstanceConfig, instance_maps
from app.ml.serving.predictor import Predictor
from app.ml.transforms import PreprocessConfig
from app.ml.unet import UNet, UNetConfig
logging.basicConfig(level=logging.WARNING)
torch.manual_seed(0)
p = Predictor(UNet(UNetConfig(base_width=4, depth=2)), PreprocessConfig(input_size=64, tile_size=64, tile_margin=16),
              InstanceConfig(), InferenceOptions(device="cpu", backend="torch", half_precision=False))
p.warm_up()
labels = p.predict(np.random.default_rng(0).random((50, 90), dtype=np.float32)).labels
print("compiled", p.compiled, "failed", p.runner.compiled_network.failed, "shape", labels.shape)
"""


def test_without_a_cxx_compiler_the_network_runs_eagerly_and_a_warning_says_why(tmp_path):
    # As in an image without g++: inductor cannot build its kernels. A fresh cache, so nothing is reused.
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_WITHOUT_COMPILER],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "compiled False failed True shape (50, 90)" in done.stdout
    assert "torch.compile failed, the network runs eagerly" in done.stderr


def test_auto_backend_is_pytorch_wherever_the_network_is_compiled_else_onnxruntime_on_cpus_without_bfloat16():
    cpu = torch.device("cpu")
    assert auto_backend(cpu, half_precision=False, compile=True) is Backend.TORCH
    uncompiled = Backend.ONNXRUNTIME if onnxruntime_available() else Backend.TORCH
    assert auto_backend(cpu, half_precision=False, compile=False) is uncompiled
    assert auto_backend(cpu, half_precision=True, compile=False) is (Backend.TORCH if native_bfloat16() else uncompiled)


@pytest.mark.parametrize(
    ("asked", "device", "backend", "resolved"),
    [
        ("auto", "cuda", Backend.TORCH, DeviceSteps.RESIZE),  # the instance step stays on the CPU's cores
        ("auto", "cpu", Backend.TORCH, DeviceSteps.NONE),
        ("all", "cuda", Backend.TORCH, DeviceSteps.ALL),
        ("all", "cpu", Backend.ONNXRUNTIME, DeviceSteps.NONE),  # ONNX Runtime takes numpy arrays
    ],
)
def test_which_steps_run_on_the_device(asked, device, backend, resolved):
    assert resolve_device_steps(asked, torch.device(device), backend) is resolved


def test_an_unknown_steps_on_device_names_the_accepted_values():
    with pytest.raises(InvalidOptionError, match="all"):
        resolve_device_steps("gpu", torch.device("cpu"), Backend.TORCH)


def test_a_predictor_with_tta_takes_the_instance_step_chosen_for_it_or_says_it_has_none(trained_model, caplog):
    checkpoint = load_checkpoint(trained_model)
    chosen_for_4 = InstanceRules(InstanceConfig(foreground_threshold=0.55))
    checkpoint = replace(checkpoint, card=replace(checkpoint.card, postprocessing_by_tta={4: chosen_for_4}))
    views = {tta: replace(InferenceOptions.float32(), tta=tta) for tta in (4, 8)}
    assert Predictor.from_checkpoint(checkpoint, views[4]).rules == chosen_for_4
    assert not caplog.records
    assert Predictor.from_checkpoint(checkpoint, views[8]).rules == checkpoint.card.postprocessing
    assert "no instance step chosen for 8 test-time augmentation views" in caplog.text


def test_resolved_options_say_what_runs_here_and_resolving_them_again_changes_nothing():
    resolved = resolve(InferenceOptions(device="auto", backend="auto", steps_on_device="auto"))
    assert resolved.device in ("cpu", "cuda") and resolved.backend is not Backend.AUTO
    assert resolved.steps_on_device is not DeviceSteps.AUTO
    assert resolve(resolved) == resolved
    exact = resolve(InferenceOptions.float32())
    assert (exact.device, exact.backend, exact.half_precision, exact.compile) == ("cpu", Backend.TORCH, False, False)
