"""The optional ONNX Runtime backend: the same probabilities and cells as PyTorch, whatever the batch and mode."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from app.ml.celltypes import image_contrast
from app.ml.checkpoint import load_checkpoint, resolve_model_folder
from app.ml.errors import InvalidOptionError
from app.ml.imageio import read_image
from app.ml.options import Backend, InferenceOptions, Mode
from app.ml.scoring.metric import image_score
from app.ml.serving.predictor import Predictor
from app.ml.serving.runner import native_bfloat16
from tests.conftest import MODEL_STORE

BUNDLED = resolve_model_folder(MODEL_STORE)


@pytest.fixture(scope="module")
def pytorch() -> Predictor:
    return Predictor.from_checkpoint(BUNDLED, InferenceOptions.float32())  # float32, as ONNX


@pytest.fixture(scope="module")
def onnxruntime() -> Predictor:
    return Predictor.from_checkpoint(BUNDLED, InferenceOptions(device="cpu", backend="onnxruntime"))


@pytest.mark.parametrize("mode", list(Mode))
def test_onnxruntime_finds_the_cells_pytorch_finds(pytorch, onnxruntime, sartorius, mode):
    image = read_image(sartorius / "test" / "7ae19de7bc2a.png")
    expected, got = pytorch.predict_maps(image, mode), onnxruntime.predict_maps(image, mode)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    cells = pytorch.rules.find(expected, image_contrast(image))
    assert cells.count > 100
    assert image_score(cells.labels, onnxruntime.rules.find(got, image_contrast(image)).labels) > 0.99


def test_onnxruntime_computes_in_float32_even_where_the_model_allows_reduced_precision(onnxruntime):
    assert onnxruntime.precision == "float32"  # the fixture keeps the default half_precision=True


def test_one_export_per_input_size_serves_every_batch_size(pytorch, onnxruntime):
    tiles = np.random.default_rng(0).standard_normal((3, 1, 576, 576), dtype=np.float32)
    np.testing.assert_allclose(onnxruntime.run_network(tiles), pytorch.run_network(tiles), atol=1e-4)
    np.testing.assert_allclose(onnxruntime.run_network(tiles[:1]), pytorch.run_network(tiles[:1]), atol=1e-4)
    assert onnxruntime.runner.onnx.session_for((576, 576)) is onnxruntime.runner.onnx.session_for((576, 576))


def test_auto_picks_onnxruntime_on_the_cpu_unless_it_computes_bfloat16_natively_or_compiles():
    uncompiled = InferenceOptions(device="cpu", backend="auto", compile=False)
    auto = Predictor.from_checkpoint(BUNDLED, uncompiled)
    if native_bfloat16():  # AMX or AVX-512 BF16: PyTorch in bfloat16 is faster still
        assert (auto.options.backend, auto.precision) == (Backend.TORCH, "bfloat16")
    else:
        assert (auto.options.backend, auto.precision) == (Backend.ONNXRUNTIME, "float32")
    full_precision = Predictor.from_checkpoint(BUNDLED, replace(uncompiled, half_precision=False))
    assert full_precision.options.backend is Backend.ONNXRUNTIME
    compiling = Predictor.from_checkpoint(BUNDLED, InferenceOptions(device="cpu"))  # the service's defaults
    assert compiling.options.backend is Backend.TORCH and compiling.options.compile


def test_wrong_backends_are_refused_with_what_is_accepted():
    with pytest.raises(InvalidOptionError, match=r"unknown backend 'tensorrt'; accepted: auto, torch, onnxruntime"):
        InferenceOptions(backend="tensorrt")
    checkpoint = load_checkpoint(BUNDLED)
    with pytest.raises(InvalidOptionError, match="the onnxruntime backend runs on the CPU, not cuda"):
        Predictor(
            checkpoint.build_model(),
            checkpoint.preprocess,
            checkpoint.card.postprocessing,
            InferenceOptions(device="cuda", backend="onnxruntime"),
        )
