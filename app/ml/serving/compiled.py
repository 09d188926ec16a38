"""The network through torch.compile on the CPU, for the input shapes it was compiled for at warm-up.

Inductor with frozen weights (the parameters become constants, so convolution weights are packed once for
oneDNN instead of on every call) runs the network faster on the CPU, in bfloat16 and in float32
(docs/performance.md). Compiling takes seconds per input shape, so it happens only while warming up: a shape
first seen later, such as another batch size, runs eagerly, and no request ever waits for a compilation. Where
compiling fails (no C++ compiler, say) the network stays eager and a warning says why.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import torch
from torch import nn

log = logging.getLogger("cellseg.compile")


class CompiledNetwork:
    """Callable like the model: (N, C_in, h, w) tensor -> logits, compiled for the shapes seen while warming."""

    def __init__(self, model: nn.Module) -> None:
        # Freezing applies to graphs compiled without autograd (inference mode), so training is untouched.
        torch._inductor.config.freezing = True
        self.model = model
        self.compiled = torch.compile(model, dynamic=False)
        self.shapes: set[tuple[int, ...]] = set()
        self._warming = False
        self.failed = False

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        shape = tuple(batch.shape)
        if shape in self.shapes:
            return self.compiled(batch)
        if self._warming and not self.failed:
            return self._compile_for(batch)
        return self.model(batch)

    @contextlib.contextmanager
    def warming(self) -> Iterator[None]:
        """While inside, each new input shape is compiled (a few seconds each) and kept."""
        self._warming = True
        try:
            yield
        finally:
            self._warming = False

    def _compile_for(self, batch: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        try:
            logits = self.compiled(batch)
        except Exception as exc:  # inductor raises many types (missing compiler, unsupported op): all mean eager
            self.failed = True
            log.warning("torch.compile failed, the network runs eagerly: %s", str(exc).splitlines()[0][:300])
            return self.model(batch)
        self.shapes.add(tuple(batch.shape))
        log.info("compiled the network for input %s in %.1f s", list(batch.shape), time.perf_counter() - started)
        return logits
