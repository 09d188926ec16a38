"""The answer to POST /segment from the pipeline's results: the JSON body (app.api.schemas), or the one file with
the headers that describe it."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi.responses import Response

from app.api import schemas
from app.ml.outputs import OutputFormat
from app.ml.serving.pipeline import SegmentedFile, SegmentedFrame


def answer(
    results: list[SegmentedFile], filenames: list[str | None], output: OutputFormat, version: str, single: bool
) -> Response:
    """One file (every format but json), or the JSON body: one image's, or several images' (`single` false) as a
    batch. `version`: the model that ran."""
    if output is not OutputFormat.JSON:
        return file_response(results[0], output, version)
    bodies = [json_body(name, result, version) for name, result in zip(filenames, results, strict=True)]
    body = bodies[0] if single else schemas.BatchSegmentation(model_version=version, results=bodies)
    # Serialized by pydantic's Rust encoder in one call, faster than FastAPI's generic response_model path
    # (jsonable_encoder, then json.dumps; docs/performance.md has the figures). The route's response_model still
    # documents it.
    return Response(body.model_dump_json(), media_type="application/json")


def file_response(result: SegmentedFile, output: OutputFormat, version: str) -> Response:
    """The file with what it holds in its headers: the model, the mode, the cells, the time per stage; a stack's
    frames, or one image's cell type; the channel chosen."""
    headers = {
        "X-Model-Version": version,
        "X-Mode": result.mode.value,
        "X-Cell-Count": str(result.cell_count),
        "Server-Timing": server_timing(result.frames[0].timings),
    }
    layout = result.layout
    if layout.is_stack:
        headers |= {"X-Frame-Count": str(len(result.frames)), "X-Frame-Axes": header_text(layout.axes)}
    elif (instances := result.frames[0].instances).cell_type is not None:
        headers["X-Cell-Type"] = instances.cell_type
        headers["X-Cell-Type-Probability"] = f"{instances.cell_type_probability:.4f}"
    if layout.channel is not None:
        headers["X-Channel"] = header_text(layout.channel)
    return Response(result.file, media_type=output.media_type, headers=headers)


def json_body(
    filename: str | None, result: SegmentedFile, version: str
) -> schemas.Segmentation | schemas.StackSegmentation:
    """One file's JSON: the image's facts, then its cells, or a stack's cells frame by frame."""
    frames = [frame_cells(frame) for frame in result.frames]
    height, width = result.shape
    layout = result.layout
    facts = {
        "filename": filename,
        "width": width,
        "height": height,
        "model_version": version,
        "mode": result.mode.value,
        "channel": layout.channel,
    }
    if not layout.is_stack:
        return schemas.Segmentation(**facts, **frames[0])
    return schemas.StackSegmentation(
        **facts,
        axes=layout.axes,
        frame_shape=list(layout.frame_shape),
        frame_count=len(frames),
        cell_count=result.cell_count,
        frames=[schemas.Frame(index=index, **cells) for index, cells in enumerate(frames)],
    )


def frame_cells(frame: SegmentedFrame) -> dict[str, Any]:
    """The fields of schemas.FrameCells for one image or frame."""
    probability = frame.instances.cell_type_probability
    return {
        "cell_type": frame.instances.cell_type,
        "cell_count": len(frame.cells),
        "cells": frame.cells,
        "cell_type_probability": None if probability is None else round(probability, 4),
        "timings": {f"{stage}_ms": round(seconds * 1000, 2) for stage, seconds in frame.timings.items()},
    }


# Printable ASCII but "%": what a header value may hold as it is. Anything else a file names (a channel "Ca²⁺", a frame
# axis "€", either holding CR LF) is percent-encoded UTF-8, as in a URL, which no header parser can misread.
_HEADER_SAFE = "".join(chr(code) for code in range(0x20, 0x7F) if chr(code) != "%")


def header_text(text: str) -> str:
    """`text` as a header value: itself where it is printable ASCII, its other characters percent-encoded (UTF-8);
    `urllib.parse.unquote` reads it back."""
    return quote(text, safe=_HEADER_SAFE)


def server_timing(timings: dict[str, float]) -> str:
    return ", ".join(f"{stage};dur={seconds * 1000:.1f}" for stage, seconds in timings.items())
