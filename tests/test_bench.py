"""`bench`'s bookkeeping: what it measures must be what the service runs. Its figures are printed, never asserted."""

from __future__ import annotations

import torch

from app.bench.instance_step import tensor_operations
from app.bench.network import ceilings, conv_flops, gemm_as_convolution, network_variants
from app.bench.report import NETWORK_OF_SERVICE
from app.ml.checkpoint import resolve_model_folder
from app.ml.unet import UNetConfig
from tests.conftest import MODEL_STORE


def test_each_network_variant_is_the_one_the_service_would_run_and_has_its_ceiling_measured():
    cpu = torch.device("cpu")
    measured = ceilings(cpu)
    variants = network_variants(resolve_model_folder(MODEL_STORE), cpu, quick=True)
    assert {"network_default", "network_default_compiled"} <= set(variants)
    for name, (predictor, ceiling, batches) in variants.items():
        assert measured[ceiling] > 0
        assert (
            NETWORK_OF_SERVICE[predictor.options.backend.value, predictor.precision, predictor.options.compile] == name
        )
        assert batches[0] == 1


def test_conv_flops_counts_a_small_u_net_as_by_hand():
    config = UNetConfig(in_channels=1, num_classes=3, base_width=2, depth=1, padded=True, batch_norm=False)
    # Multiply-adds of each convolution on an 8x8 input: output pixels x input channels x output channels x taps.
    first_level = 64 * (1 * 2 + 2 * 2) * 9  # 8x8: 1 -> 2 -> 2 channels, 3x3
    second_level = 16 * (2 * 4 + 4 * 4) * 9  # 4x4 after pooling: 2 -> 4 -> 4
    up_convolution = 16 * 4 * 2 * 4  # 2x2, stride 2: each of 16 inputs x 4 channels to 2 channels x 4 taps
    up_level = 64 * (4 * 2 + 2 * 2) * 9  # 8x8, skip and up-path concatenated: 4 -> 2 -> 2
    output_layer = 64 * 2 * 3  # 1x1: 2 -> 3
    by_hand = 2 * (first_level + second_level + up_convolution + up_level + output_layer)  # 2 FLOPs each
    assert conv_flops(config, (1, 1, 8, 8)) == by_hand
    assert conv_flops(config, (2, 1, 8, 8)) == by_hand  # per image, whatever the batch


def test_tensor_operations_counts_each_dispatched_operation_once():
    assert tensor_operations(lambda: torch.ones(3) + 1) == 2  # aten::ones (its fill_ inside not again), aten::add


def test_the_cpu_ceiling_s_convolution_computes_the_matmul_it_stands_for():
    a, b = torch.randn(64, 32), torch.randn(32, 48)
    product = gemm_as_convolution(a, b)()
    assert product.shape == (1, 48, 1, 64)
    torch.testing.assert_close(product[0, :, 0, :].t(), a @ b, rtol=1e-4, atol=1e-4)
