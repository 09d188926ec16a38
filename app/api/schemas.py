"""Response bodies, with examples for the OpenAPI docs at /docs."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Cell(BaseModel):
    id: int = Field(description="1..N, as in the PNG label image")
    rle: str = Field(description="Kaggle RLE: 'start length' pairs, 1-indexed, row-major pixel numbers")
    area: int = Field(description="pixels")
    bbox: list[int] = Field(description="[x, y, width, height] in pixels")
    score: float = Field(description="mean foreground probability over the cell, 0..1")


class Timings(BaseModel):
    decode_ms: float
    preprocess_ms: float
    network_ms: float
    instances_ms: float
    encode_ms: float


class ImageFacts(BaseModel):
    """What every answer says of the image: its name and size, the model and mode that ran, the channel."""

    filename: str | None
    width: int
    height: int
    model_version: str
    mode: str
    channel: str | None = Field(
        None, description="the channel segmented, by name where the file names it; null for one channel"
    )


class FrameCells(BaseModel):
    """The cells of one image, or of one frame of a stack."""

    cell_type: str | None = Field(
        description="the image's cell type as the model's classifier reads it from the cells found (it picks that "
        "type's thresholds); null for a model without a classifier"
    )
    cell_type_probability: float | None = Field(description="the classifier's probability for cell_type, 0..1")
    cell_count: int
    cells: list[Cell]
    timings: Timings


EXAMPLE = {  # one image's answer, for the OpenAPI docs
    "filename": "7ae19de7bc2a.png",
    "width": 704,
    "height": 520,
    "model_version": "sartorius-w16-v3",
    "mode": "resize",
    "channel": None,
    "cell_type": "shsy5y",
    "cell_type_probability": 0.97,
    "cell_count": 1,
    "cells": [{"id": 1, "rle": "120428 3 121132 5", "area": 8, "bbox": [36, 171, 5, 2], "score": 0.91}],
    "timings": {"decode_ms": 4.1, "preprocess_ms": 6.0, "network_ms": 330.2, "instances_ms": 41.5, "encode_ms": 3.2},
}


class Segmentation(FrameCells, ImageFacts):  # fields in order: the image's facts first, then its cells
    model_config = {"json_schema_extra": {"examples": [EXAMPLE]}}


class Frame(FrameCells):
    index: int = Field(description="0..frame_count-1, in the file's order (the last frame axis fastest)")


class StackSegmentation(ImageFacts):
    """A Z or time stack (or any multi-page TIFF), segmented frame by frame."""

    axes: str = Field(description="the file's frame axes as tifffile names them: T time, Z depth, I pages, ...")
    frame_shape: list[int] = Field(description="the size of each frame axis")
    frame_count: int
    cell_count: int = Field(description="cells in all frames")
    frames: list[Frame]


class BatchSegmentation(BaseModel):
    model_version: str
    results: list[Segmentation | StackSegmentation]


class Error(BaseModel):
    detail: str = Field(description="what was wrong and what is accepted")


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    ready: bool
    status: str = Field(description="what the service is doing: loading the model, warming up, ready, or failed")
    model_version: str | None
    device: str | None
    backend: str | None = Field(description="what runs the network: torch or onnxruntime")
    precision: str | None = Field(description="what it computes in: float32, float16 (CUDA) or bfloat16 (CPU)")
    compiled: bool | None = Field(description="whether the network runs through torch.compile")
    tta: int | None = Field(description="test-time augmentation: views averaged per network input (1: off)")
    loaded: list[str] = Field(description="the model versions loaded, the default first (GET /models says more)")


class CardSummary(BaseModel):
    """What model.json says of a model in short; GET /models/{version} gives all of it."""

    created_at: str
    code_version: str
    architecture: dict[str, Any]
    validation_score: float | None = Field(description="the competition score on its validation images")
    weights_sha256: str | None


class ModelState(BaseModel):
    """A loaded model version and how it is being used."""

    version: str
    default: bool = Field(description="the default model: answers requests without model=, never unloaded")
    ready: bool = Field(description="warmed up and taking requests")
    status: str = Field(description="ready, warming up, or what went wrong")
    device: str
    backend: str
    precision: str
    compiled: bool
    tta: int
    loaded_at: str = Field(description="when it was loaded (ISO 8601, UTC)")
    last_used_at: str | None = Field(description="when a request last used it (ISO 8601, UTC)")
    in_flight: int = Field(description="requests using it now")
    card: CardSummary


class Models(BaseModel):
    default: str = Field(description="the default model: the one requests without model= get")
    max_models: int = Field(description="most versions loaded at once (CELLSEG_MAX_MODELS), the default included")
    loaded: list[ModelState] = Field(description="the versions loaded, the default first")
    loading: str | None = Field(description="a version being loaded now")
    available: list[str] = Field(description="the versions in the model store, loaded or not")
    worker: int = Field(description="the process id of the server process (worker) that answered")


class ModelChange(BaseModel):
    """What POST /models/{version}/load or /unload did."""

    version: str
    status: str = Field(description="loaded, already loaded, or unloaded")
    evicted: str | None = Field(description="the least recently used version a load unloaded to make room")
    drained: int = Field(description="requests an unload let finish on the model before freeing it")
    seconds: float
    loaded: list[str] = Field(description="the versions loaded now, the default first")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": Error, "description": "no file, or options that do not go together"},
    401: {"model": Error, "description": "API key missing or wrong (only when one is configured)"},
    404: {"model": Error, "description": "the model version asked for is not in the model store"},
    409: {"model": Error, "description": "the model version asked for is not loaded (POST /models/{version}/load)"},
    413: {"model": Error, "description": "upload or image dimensions over the limit"},
    415: {"model": Error, "description": "not an image, or an unsupported format"},
    422: {"model": Error, "description": "a truncated or too small image, a channel to choose, or an invalid option"},
    503: {"model": Error, "description": "busy (retry after the Retry-After header) or still loading"},
}
