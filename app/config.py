"""Service settings, read from environment variables prefixed CELLSEG_ (e.g. CELLSEG_MODEL_VERSION)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.ml.imageio import MAX_PIXELS
from app.ml.options import OPTION_NAMES, TTA_CHOICES, Backend, DeviceSteps, InferenceOptions

INFERENCE = InferenceOptions()  # the inference settings' defaults


class Settings(BaseSettings):
    """Every setting of the service; docs/operations.md lists them with their defaults."""

    model_config = SettingsConfigDict(env_prefix="CELLSEG_", env_file=None, protected_namespaces=())

    model_store: Path = Field(Path("model_store"), description="folder holding <version>/model.json folders")
    model_version: str | None = Field(
        None,
        description="the default model: loaded at start, it answers requests without model= and is never unloaded "
        "(default: the version model_store/DEFAULT names at start-up)",
    )
    device: str = Field(INFERENCE.device, description="'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'")
    backend: Backend = Field(
        INFERENCE.backend,
        description="'auto' (PyTorch on CUDA, on CPUs with native bfloat16 and wherever compile is on; else ONNX "
        "Runtime when installed, else PyTorch), 'torch' or 'onnxruntime' (CPU, float32)",
    )
    half_precision: bool = Field(
        INFERENCE.half_precision,
        description="when the model allows it: float16 on CUDA, bfloat16 on CPUs that compute it natively (Intel "
        "AMX, AVX-512 BF16 as on AMD Zen 4; PyTorch backend)",
    )
    compile: bool = Field(
        INFERENCE.compile,
        description="torch.compile the network while warming up, when PyTorch runs it on the CPU (faster: "
        "docs/performance.md); other input shapes, such as batches over 1, run uncompiled",
    )
    tta: Literal[TTA_CHOICES] = Field(  # Literal[1, 2, 4, 8]
        INFERENCE.tta,
        description="test-time augmentation: the mean over 1 (off), 2 (a left-right flip), 4 (flips) or 8 (flips "
        "and turns) views of each network input, at that many times the network's cost, with the model card's "
        "instance step for that many views where it has one",
    )
    steps_on_device: DeviceSteps = Field(
        INFERENCE.steps_on_device,
        description="the steps around the network in torch on its device: 'none' (the CPU's, the reference), "
        "'resize' (normalization, resizes, tiles and maps; the instance step on the CPU), 'all' (the instance step "
        "too: only labels come back) or 'auto' ('resize' on CUDA, 'none' on the CPU)",
    )
    torch_threads: int = Field(
        INFERENCE.torch_threads,
        ge=0,
        description="CPU threads for the network (0: torch's default; with several workers, a share each)",
    )
    workers: int = Field(
        1,
        ge=1,
        description="server processes, each with its own copy of the model and micro-batcher, taking connections "
        "from one socket; each is warmed up before it takes any. Limits such as max_active_requests and "
        "max_pixels_in_flight apply per worker (docs/performance.md: when more than one pays)",
    )
    warmup: bool = Field(True, description="run a blank image through the model before reporting ready")
    max_models: int = Field(
        3,
        ge=1,
        description="most model versions loaded at once, the default included (POST /models/<version>/load); "
        "loading one more unloads the least recently used one; the default is never unloaded",
    )

    max_upload_bytes: int = Field(50 * 1024 * 1024, gt=0, description="largest request body accepted")
    max_pixels: int = Field(MAX_PIXELS, gt=0, description="largest image (width x height x frames) accepted")
    max_request_pixels: int = Field(
        MAX_PIXELS,
        gt=0,
        description="most pixels in one request, all its images together, or their network inputs' where those are "
        "more (tile mode on an image of extreme shape); checked from the headers before decoding (413)",
    )
    max_pixels_in_flight: int = Field(
        MAX_PIXELS,
        gt=0,
        description="most pixels being worked on at once, all requests together; a request that does not fit "
        "now gets 503 with Retry-After before it is decoded (docs/reliability.md: memory follows it)",
    )
    max_files: int = Field(16, gt=0, description="most images in one request (field 'files')")
    max_active_requests: int = Field(
        64,
        gt=0,
        description="most /segment requests in progress at once (uploading or being worked on, not while their "
        "answer is sent); beyond them, and "
        "while the pixels in flight or the queue are full, a request gets 503 with Retry-After before its body "
        "is read",
    )
    request_timeout_seconds: float = Field(
        600.0,
        gt=0,
        description="longest a /segment request is worked on once its upload is in, its answer's encoding included; "
        "past it the work stops and the answer is 504",
    )

    max_batch: int = Field(
        0,
        ge=0,
        description="most network inputs in one micro-batch (0: 8 on CUDA, 1 on CPU, where bench measured "
        "batches to be slower per image than single inputs)",
    )
    max_wait_ms: float = Field(5.0, ge=0, description="how long a micro-batch waits to fill up")
    max_queue: int = Field(
        64,
        gt=0,
        description="most network inputs a new request may wait in turn with, its own included (requests take turns, "
        "one input each); beyond it, 503",
    )

    api_key: SecretStr | None = Field(None, description="when set, every route but /health needs it")
    log_level: str = Field("INFO", description="logging level")
    log_json: bool = Field(True, description="one JSON object per log line (else plain text)")

    keep_alive_seconds: int = Field(
        5, ge=1, description="a connection that sends no request for this long is closed (idle or never used)"
    )
    max_connections: int = Field(
        4096, gt=0, description="most connections open at once; beyond them new ones get 503 (uvicorn)"
    )

    host: str = Field("0.0.0.0", description="address `serve` listens on")
    port: int = Field(8000, description="port `serve` listens on")

    @property
    def inference(self) -> InferenceOptions:
        """The inference settings, passed whole to the predictor: each under its name here, torch_threads as this
        worker's share (worker_threads)."""
        values = {name: getattr(self, name) for name in OPTION_NAMES}
        return InferenceOptions(**{**values, "torch_threads": worker_threads(self)})

    @field_validator("tta", mode="before")
    @classmethod
    def _number_from_text(cls, value: object) -> object:
        """An environment variable is text, which a choice of numbers does not parse by itself."""
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value

    @field_validator("model_version", "api_key", mode="before")
    @classmethod
    def _empty_means_unset(cls, value: object) -> object:
        """docker compose passes unset variables as empty strings: treat them as not given."""
        return None if value == "" else value


def worker_threads(settings: Settings) -> int:
    """Torch's CPU threads in each worker (0: torch's default): the setting, else with several workers this
    process's CPUs shared out over them, so they do not all run a thread per core (the network, and resizes in
    torch, would fight for them)."""
    if settings.torch_threads or settings.workers == 1:
        return settings.torch_threads
    return max(1, len(os.sched_getaffinity(0)) // settings.workers)


def load_settings() -> Settings:
    """The settings from the environment, or SystemExit with one line per bad variable: its name, what it was
    given and what it takes (pydantic's report is a page of text for a typo)."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = [
            f"CELLSEG_{'_'.join(str(part) for part in error['loc']).upper()}={error.get('input')!r}: {error['msg']}"
            for error in exc.errors()
        ]
        raise SystemExit("bad settings: " + "; ".join(problems)) from None
