"""ONNX Runtime as an optional CPU backend for the network (pip install 'cellseg[onnx]').

The trained PyTorch model is exported in memory with torch.export, once per input size (the exporter cannot
make height and width symbolic through the U-Net's crops), with the batch left free, and run by ONNX
Runtime's CPU kernels: faster than uncompiled PyTorch in float32 on the CPU (docs/performance.md). Nothing is
written to disk, so the checkpoint stays the single source of the weights.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from app.ml.errors import InvalidOptionError

log = logging.getLogger("cellseg.onnx")

INSTALL_HINT = "install it with: pip install 'cellseg[onnx]'"


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401, PLC0415 - optional dependency
        import onnxscript  # noqa: F401, PLC0415 - torch's exporter needs it
    except ImportError:
        return False
    return True


class OnnxRuntimeNetwork:
    """(N, C_in, h, w) float32 array -> (N, num_classes, h', w') float32 logits, like the model it wraps."""

    def __init__(self, model: nn.Module, threads: int) -> None:
        if not onnxruntime_available():
            raise InvalidOptionError(f"the onnxruntime backend needs onnxruntime and onnxscript; {INSTALL_HINT}")
        self.model, self.threads = model, threads
        self._sessions: dict[tuple[int, int], object] = {}
        self._lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        session = self.session_for((batch.shape[-2], batch.shape[-1]))
        return session.run(None, {"x": np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def session_for(self, size: tuple[int, int]) -> object:
        """The session for inputs of this (h, w), exported on first use (a few seconds; warm_up does it early)."""
        with self._lock:
            if size not in self._sessions:
                self._sessions[size] = self._export(size)
            return self._sessions[size]

    def _export(self, size: tuple[int, int]) -> object:
        import onnxruntime  # noqa: PLC0415 - optional dependency

        started = time.perf_counter()
        # Batch 2, not 1: torch.export fixes any dimension whose example size is 1.
        example = torch.zeros(2, self.model.config.in_channels, *size)
        batch = torch.export.Dim("batch", min=1, max=1024)
        with _quiet_exporter(), torch.inference_mode(False):
            program = torch.onnx.export(
                self.model,
                (example,),
                input_names=["x"],
                output_names=["logits"],
                dynamic_shapes={"x": {0: batch}},
                dynamo=True,
                verbose=False,
            )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        # Idle kernel threads would otherwise spin and take the cores from the instance step of other requests.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(
            program.model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        log.info("exported the network to ONNX for %dx%d inputs in %.1f s", *size, time.perf_counter() - started)
        return session


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter prints progress, warns about its own internals and logs in a format of its own (which would
    break the service's one-JSON-object-per-line logs); none of it is news to our users."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        exporter_log.setLevel(level)
