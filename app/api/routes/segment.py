"""POST /segment: one image (field `file`) or several (field `files`) in, every cell out; with the progress stream
and the disconnect watch that run beside the route. The answer's body and headers: app.api.answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import Response, StreamingResponse

from app.api import answers, schemas
from app.api.deps import MetricsDep, ModelDep, SettingsDep
from app.api.errors import public_detail, status_of
from app.api.logs import internal_error, request_id
from app.api.metrics import Metrics
from app.api.middleware import release_slot
from app.ml.errors import CellSegError
from app.ml.imageio import MAX_CHANNEL_NAME
from app.ml.options import Mode
from app.ml.outputs import OutputFormat
from app.ml.postprocess import THRESHOLD_RANGES
from app.ml.rules import InstanceRules
from app.ml.serving.pipeline import SegmentationPipeline, SegmentedFile, TileProgress, all_or_none
from app.ml.stopping import until_done

router = APIRouter(tags=["segmentation"])
log = logging.getLogger("cellseg.api")

FILE_DESCRIPTIONS = {
    OutputFormat.PNG: "16-bit PNG: 0 = background, 1..N = cells",
    OutputFormat.MASK: "8-bit PNG: 255 = cell, 0 = background",
    OutputFormat.OVERLAY: "RGB PNG of the image with every cell tinted and outlined",
    OutputFormat.TIFF: "label TIFF for Fiji: 16-bit (32-bit float over 65535 cells), 0 = background; a stack "
    "gives one page per frame",
    OutputFormat.ROI: "zip of ImageJ polygon ROIs, one per cell, for Fiji's ROI Manager",
    OutputFormat.GEOJSON: "GeoJSON FeatureCollection of cell polygons with area and score, for QuPath",
    OutputFormat.COCO: "COCO instance annotations with compressed RLE, for pycocotools",
}
OK_DESCRIPTION = "JSON cells by default; else one file: " + "; ".join(
    f"{f.value}: {t}" for f, t in FILE_DESCRIPTIONS.items()
)
FILE_CONTENT = {f.media_type: {} for f in FILE_DESCRIPTIONS}


def threshold(name: str) -> object:
    low, high = THRESHOLD_RANGES[name]
    return Query(ge=low, le=high, description=f"override the model's {name} ({low}..{high})")


@router.post(
    "/segment",
    response_model=schemas.Segmentation | schemas.StackSegmentation | schemas.BatchSegmentation,
    responses={**schemas.ERROR_RESPONSES, 200: {"content": FILE_CONTENT, "description": OK_DESCRIPTION}},
    summary="Find every cell in one or several images",
)
async def segment(
    request: Request,
    settings: SettingsDep,
    metrics: MetricsDep,
    model: ModelDep,
    file: Annotated[UploadFile | None, File(description="one image: PNG, JPEG or TIFF")] = None,
    files: Annotated[list[UploadFile] | None, File(description="several images (JSON output only)")] = None,
    output: Annotated[OutputFormat, Query(alias="format", description=" | ".join(OutputFormat))] = OutputFormat.JSON,
    mode: Annotated[
        Mode,
        Query(
            description="auto (resize near the trained image size, else tile) | resize (572x572 and back) | "
            "tile (overlap-tile at the trained pixel scale); the answer says which ran"
        ),
    ] = Mode.AUTO,
    foreground_threshold: Annotated[float | None, threshold("foreground_threshold")] = None,
    seed_threshold: Annotated[float | None, threshold("seed_threshold")] = None,
    min_cell_area: Annotated[int | None, threshold("min_cell_area")] = None,
    channel: Annotated[
        str | None,
        Query(
            max_length=MAX_CHANNEL_NAME,
            description="the channel to segment, by index (0, 1, ...) or name (an OME-TIFF's channel names; red, "
            "green or blue of an RGB image); needed where a file has several channels",
        ),
    ] = None,
) -> Response:
    """Each cell comes back as its own non-overlapping mask, at the upload's exact size in pixels.

    `format=json` (default) gives one Kaggle RLE per cell with area, bbox and score; `png`, `mask` and `overlay`
    give a PNG; `tiff`, `roi`, `geojson` and `coco` the files Fiji, QuPath and pycocotools open. Send one image
    as `file`, or several as `files` (JSON only). A TIFF stack (Z, time, pages; OME-TIFF and ImageJ hyperstacks
    included) is segmented frame by frame: JSON gives one result per frame, `tiff` one page per frame.

    With `Accept: text/event-stream` (JSON only) the answer is a stream of server-sent events: `progress` events
    ({"tiles_done", "tiles_total"}) as the network works through a large image, then one `result` event holding the
    JSON answer, or an `error` event ({"status", "detail"}).

    `model` names the model version to run, one of those loaded (`GET /models`); the answer names the one that ran.
    """
    pipeline = model.pipeline
    uploads = _uploads(file, files, output, settings.max_files)
    rules = pipeline.rules(
        foreground_threshold=foreground_threshold, seed_threshold=seed_threshold, min_cell_area=min_cell_area
    )
    stream = "text/event-stream" in request.headers.get("accept", "")
    if stream and output is not OutputFormat.JSON:
        raise HTTPException(400, "progress events come with format=json; ask for a file without them")
    images = [await _read(upload) for upload in uploads]
    deadline = settings.request_timeout_seconds
    with contextlib.ExitStack() as held:
        held.enter_context(await pipeline.admit(images, mode))  # 413 or 503 before any image is decoded
        if stream:  # the stream's work holds the admission and the model from here on
            held.enter_context(model.in_use())
            how = (mode, rules, channel)
            work = _stream_work(metrics, pipeline, uploads, images, how, single=file is not None)
            return _event_stream(request, work, held.pop_all(), deadline)
        # Several images go through the pipeline together, so their network inputs can share micro-batches.
        work = all_or_none([pipeline.segment(data, mode, rules, channel, output) for data in images])
        results = await _cancel_on_disconnect(request, metrics, work, deadline)
        return _answer(metrics, pipeline, uploads, results, output, single=file is not None)


Event = tuple[str, object]  # a server-sent event's name and its JSON data


def _stream_work(
    metrics: Metrics,
    pipeline: SegmentationPipeline,
    uploads: list[UploadFile],
    images: list[bytes],
    how: tuple[Mode, InstanceRules, str | None],
    single: bool,
) -> Callable[[Callable[[Event], None]], Awaitable[Event]]:
    """The work of a progress stream: given where to put its `progress` events, it ends with the `result` event."""

    async def work(emit: Callable[[Event], None]) -> Event:
        progress = TileProgress(lambda done, total: emit(("progress", {"tiles_done": done, "tiles_total": total})))
        results = await all_or_none([pipeline.segment(data, *how, OutputFormat.JSON, progress) for data in images])
        answer = _answer(metrics, pipeline, uploads, results, OutputFormat.JSON, single)
        return "result", json.loads(answer.body)

    return work


def _event_stream(
    request: Request,
    work: Callable[[Callable[[Event], None]], Awaitable[Event]],
    admitted: contextlib.ExitStack,
    deadline: float,
) -> StreamingResponse:
    """Server-sent events: `progress` ({"tiles_done", "tiles_total"}) as the network inputs come back, then one
    `result` (the JSON answer) or `error` ({"status", "detail"}). The work starts at once and frees what it holds
    (the pixel budget, the model, the request's slot) as soon as it ends, whether or not its events are read; the
    client going away cancels it, and it has `deadline` seconds."""
    events: asyncio.Queue[Event] = asyncio.Queue()

    async def run() -> None:
        try:
            async with asyncio.timeout(deadline):
                events.put_nowait(await work(events.put_nowait))
        except TimeoutError:
            events.put_nowait(("error", {"status": 504, "detail": _too_long(deadline)}))
        except CellSegError as exc:
            events.put_nowait(("error", {"status": status_of(exc), "detail": public_detail(exc)}))
        except Exception as exc:  # the stream has begun, so the error goes in it; the log has the details
            log.error("unexpected error in a progress stream: %s", exc, exc_info=exc)
            events.put_nowait(("error", {"status": 500, "detail": internal_error(request_id.get())}))
        finally:
            admitted.close()
            release_slot(request.scope)

    task = asyncio.ensure_future(run())

    async def stream() -> AsyncIterator[str]:
        try:
            name = "progress"
            while name == "progress":  # run() always ends with a result or an error event
                name, data = await events.get()
                yield f"event: {name}\ndata: {json.dumps(data)}\n\n"
        finally:
            task.cancel()  # the client went away, or the stream ended: no work outlives it

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _answer(
    metrics: Metrics,
    pipeline: SegmentationPipeline,
    uploads: list[UploadFile],
    results: list[SegmentedFile],
    output: OutputFormat,
    single: bool,
) -> Response:
    for result in results:
        for frame in result.frames:
            metrics.cells.observe(frame.instances.count)
    filenames = [upload.filename for upload in uploads]
    return answers.answer(results, filenames, output, pipeline.model_version, single)


def _uploads(
    file: UploadFile | None, files: list[UploadFile] | None, output: OutputFormat, max_files: int
) -> list[UploadFile]:
    if file is not None and files:
        raise HTTPException(400, "send one image as 'file' or several as 'files', not both")
    uploads = [file] if file is not None else list(files or [])
    if not uploads:
        raise HTTPException(
            400,
            "no file uploaded: send the image as multipart/form-data field 'file' (or several as 'files'), e.g. "
            "curl -F file=@cells.png",
        )
    if len(uploads) > max_files:
        raise HTTPException(400, f"{len(uploads)} files in one request; at most {max_files} are accepted")
    if len(uploads) > 1 and output is not OutputFormat.JSON:
        raise HTTPException(400, f"format={output.value} answers one image; use format=json for several")
    return uploads


async def _read(upload: UploadFile) -> bytes:
    data = await upload.read()
    if not data:
        raise HTTPException(422, f"the file {upload.filename!r} is empty; send a PNG, JPEG or TIFF image")
    return data


async def _cancel_on_disconnect(
    request: Request, metrics: Metrics, work: Awaitable[list[SegmentedFile]], deadline: float
) -> list[SegmentedFile]:
    """Run `work`, but cancel it (its queued network inputs, and its threads at their next step) if the client goes
    away meanwhile, or once `deadline` seconds have passed (504)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, timeout=deadline, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server itself is cancelling this request (e.g. shutting down)
        task.cancel()
        await until_done({task})
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    left = watcher.done() and not watcher.cancelled()
    task.cancel()
    await until_done({task})  # its threads' memory is freed before its pixels are (a step at most)
    if left:
        metrics.disconnects.inc()
        raise HTTPException(499, "client closed the request")
    raise HTTPException(504, _too_long(deadline))


def _too_long(deadline: float) -> str:
    return (
        f"the work took longer than this service's limit of {deadline:g} s (CELLSEG_REQUEST_TIMEOUT_SECONDS) and was "
        "stopped; send a smaller image, or fewer"
    )


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
