"""A small Python client for the cellseg service, sync (`CellsegClient`) and async (`AsyncCellsegClient`).

    with CellsegClient("http://localhost:8000") as cellseg:
        labels = cellseg.labels("cells.png")  # (H, W) uint16: 0 = background, 1..N = cells

Both clients share everything but the waiting: requests are built, retried and read by the helpers below, so
the two cannot drift apart. It needs httpx, numpy, Pillow and tifffile, never torch or the web stack; RLEs are
decoded by the service's own `app.ml.rle`, so client and server agree on the Kaggle convention by construction.
"""

from __future__ import annotations

import asyncio
import io
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self, TypedDict, Unpack, get_args, overload
from urllib.parse import quote

import httpx
import numpy as np
import tifffile
from PIL import Image

from app.ml import rle

FileFormat = Literal["png", "mask", "overlay", "tiff", "roi", "geojson", "coco"]
Format = Literal["json", FileFormat]
ImageInput = str | os.PathLike[str] | bytes | np.ndarray
"""A path to an image file, the file's bytes, or the pixels as an (H, W) array (sent as a PNG or TIFF)."""

# Retried besides 503s (answered before any work): failures where the request cannot have reached the service.
# Neither can have segmented the image, so retrying never does the work twice.
CONNECTION_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)
# What `save` writes when no format is given, by the file name's ending.
FORMAT_OF_SUFFIX: dict[str, Format] = {
    ".json": "json",
    ".png": "png",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".zip": "roi",
    ".geojson": "geojson",
}


class Options(TypedDict, total=False):
    """The query options of POST /segment besides `format`; unset ones are the model's own. `model` names the
    model version to run, one the service has loaded (`models()`, `load_model()`); unset, its default model."""

    model: str
    mode: Literal["auto", "resize", "tile"]
    channel: str | int
    foreground_threshold: float
    seed_threshold: float
    min_cell_area: int


class ServiceError(Exception):
    """The service refused (`status` is its HTTP status, `detail` its reason), or could not be reached
    (`status` is None)."""

    def __init__(self, status: int | None, detail: str) -> None:
        super().__init__(detail if status is None else f"cellseg answered {status}: {detail}")
        self.status, self.detail = status, detail


@dataclass(frozen=True)
class SegmentResult:
    """A JSON answer of POST /segment. `cells` are the answer's cell dicts (id, rle, area, bbox, score); a stack
    (multi-frame TIFF) has them frame by frame in `frames`, and `cells` holds every frame's in order."""

    width: int
    height: int
    model_version: str  # the model that ran
    mode: str
    cell_type: str | None
    cell_count: int
    cells: list[dict[str, Any]]
    frames: list[list[dict[str, Any]]]
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> SegmentResult:
        frames = [frame["cells"] for frame in body["frames"]] if "frames" in body else [body["cells"]]
        return cls(
            width=body["width"],
            height=body["height"],
            model_version=body["model_version"],
            mode=body["mode"],
            cell_type=body.get("cell_type"),
            cell_count=body["cell_count"],
            cells=[cell for frame in frames for cell in frame],
            frames=frames,
            raw=body,
        )

    @property
    def is_stack(self) -> bool:
        return "frames" in self.raw

    @property
    def labels(self) -> np.ndarray:
        """The label image, as `format=png` gives it: (H, W), or (N, H, W) for a stack; 0 = background, 1..N =
        cells. uint16, or int32 where a frame has more than 65535 cells."""
        images = [label_image(cells, (self.height, self.width)) for cells in self.frames]
        return np.stack(images) if self.is_stack else images[0]


# The names these classes had before they were renamed (two other classes of the package have them): still
# importable, with a DeprecationWarning.
_RENAMED = {"CellsegError": ServiceError, "Segmentation": SegmentResult}


def __getattr__(name: str) -> type:
    if name in _RENAMED:
        new = _RENAMED[name]
        warnings.warn(f"app.client.{name} is now {new.__name__}", DeprecationWarning, stacklevel=2)
        return new
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def label_image(cells: list[dict[str, Any]], shape: tuple[int, int]) -> np.ndarray:
    """Cells (each with `id` and a Kaggle `rle`) -> (H, W) label image. Raises ServiceError if two overlap: the
    service promises they never do, and a label image could not show both."""
    dtype = np.uint16 if max((cell["id"] for cell in cells), default=0) <= np.iinfo(np.uint16).max else np.int32
    flat = np.zeros(shape[0] * shape[1], dtype=dtype)
    for cell in cells:
        starts, lengths = rle.parse(cell["rle"], shape)
        # Every pixel of every run, in one go: each run's first pixel, repeated, plus 0, 1, ... along the run.
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        pixels = np.repeat(starts - 1, lengths) + offsets
        if flat[pixels].any():
            raise ServiceError(None, f"cell {cell['id']} overlaps cell {flat[pixels].max()} in the answer")
        flat[pixels] = cell["id"]
    return flat.reshape(shape)


def _encode(pixels: np.ndarray) -> tuple[str, bytes]:
    """An array -> (file name, file bytes) that the service reads back to the same values. uint8 and uint16, and
    (H, W, 3|4) uint8 as RGB(A), go as PNG; any other numbers as a float32 TIFF, which the service reads as every
    float image: as it is in [0, 1], else stretched from its min..max (16 bits would round them, and move cells at
    the margin)."""
    array = np.asarray(pixels)
    rgb = array.ndim == 3 and array.shape[2] in (3, 4) and array.dtype == np.uint8
    if array.ndim != 2 and not rgb:
        raise ValueError(
            f"an array of shape {array.shape} ({array.dtype}) is not one image: send (H, W) pixels or (H, W, 3|4) "
            "uint8, or pass the path of a TIFF for stacks and other channel layouts"
        )
    if rgb or array.dtype in (np.uint8, np.uint16):
        return "image.png", _png(array)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array.astype(np.float32))
    return "image.tif", buffer.getvalue()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _upload(image: ImageInput) -> tuple[str, bytes]:
    """(file name, bytes) of the multipart field `file`."""
    if isinstance(image, np.ndarray):
        return _encode(image)
    if isinstance(image, bytes):
        return "image", image
    path = Path(image)
    return path.name, path.read_bytes()


def _segment_request(image: ImageInput, output: Format, options: Options) -> dict[str, Any]:
    """The keyword arguments of httpx's `request` for one POST /segment."""
    params = {"format": output, **{name: str(value) for name, value in options.items() if value is not None}}
    return {"params": params, "files": {"file": _upload(image)}}


def _model_url(version: str, action: Literal["load", "unload"]) -> str:
    return f"/models/{quote(version, safe='')}/{action}"


def _checked(response: httpx.Response, also_ok: tuple[int, ...] = ()) -> httpx.Response:
    """The response if it succeeded, else ServiceError with the service's own explanation."""
    if response.is_success or response.status_code in also_ok:
        return response
    try:
        body = response.json()
    except ValueError:  # not JSON: a proxy's page, say
        body = None
    body = body if isinstance(body, dict) else {}
    detail = body.get("detail") or body.get("status") or response.text or response.reason_phrase  # /ready: status
    raise ServiceError(response.status_code, str(detail))


def _answer(response: httpx.Response, output: Format) -> SegmentResult | bytes:
    return SegmentResult.from_json(response.json()) if output == "json" else response.content


def _format_of(path: Path, output: Format | None) -> Format:
    if output is not None:
        return output
    if path.suffix.lower() not in FORMAT_OF_SUFFIX:
        raise ValueError(f"cannot tell the format from {path.name!r}: pass format= (one of {get_args(Format)})")
    return FORMAT_OF_SUFFIX[path.suffix.lower()]


class _Retry:
    """When to try a request again: after a 503 (busy, or still warming up) or a refused connection (the
    service is starting), at most `retries` times and `max_wait` seconds of waiting in all. A 503 says how long
    to wait in its Retry-After header; without one the wait doubles from half a second up to two."""

    def __init__(self, retries: float, max_wait: float) -> None:
        self.left, self.budget, self.backoff = retries, max_wait, 0.5

    def delay(self, response: httpx.Response | None) -> float | None:
        """Seconds to wait before trying again after `response` (None: no connection), or None to stop."""
        if response is not None and response.status_code != 503:
            return None
        if self.left <= 0 or self.budget <= 0:
            return None
        wanted = _retry_after(response) if response is not None else None
        if wanted is None:
            wanted, self.backoff = self.backoff, min(self.backoff * 2, 2.0)
        delay = min(wanted, self.budget)
        self.left, self.budget = self.left - 1, self.budget - delay
        return delay


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):  # absent, or an HTTP date: fall back to backing off
        return None


def _unreachable(base_url: httpx.URL, exc: Exception) -> ServiceError:
    return ServiceError(None, f"cannot reach cellseg at {base_url}: {exc}")


class _Client:
    """What both clients keep: where the service is, how to authenticate, how long to wait and retry."""

    def __init__(
        self,
        base_url: str = "http://localhost:8000",
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        retries: int = 3,
        max_wait: float = 30.0,
    ) -> None:
        """`timeout` bounds each request in seconds (a large image takes a while); `retries` and `max_wait`
        bound the retries after a 503 or a refused connection: how many, and how many seconds of waiting in all."""
        self.retries, self.max_wait = retries, max_wait
        headers = {"X-API-Key": api_key.encode()} if api_key else {}  # bytes: a key need not be ASCII
        self._http = self._open(base_url=base_url, headers=headers, timeout=timeout)

    def _open(self, **options: Any) -> Any:
        raise NotImplementedError

    def _retry(self) -> _Retry:
        return _Retry(self.retries, self.max_wait)


class CellsegClient(_Client):
    """The service over HTTP, blocking. Use it as a context manager (or call `close`) to free its connections."""

    _http: httpx.Client

    def _open(self, **options: Any) -> httpx.Client:
        return httpx.Client(**options)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    @overload
    def segment(
        self, image: ImageInput, *, format: Literal["json"] = "json", **options: Unpack[Options]
    ) -> SegmentResult: ...
    @overload
    def segment(self, image: ImageInput, *, format: FileFormat, **options: Unpack[Options]) -> bytes: ...
    def segment(
        self, image: ImageInput, *, format: Format = "json", **options: Unpack[Options]
    ) -> SegmentResult | bytes:
        """Every cell of one image: a SegmentResult for `format="json"`, else the answered file's bytes."""
        return _answer(self._post(image, format, options), format)

    def labels(self, image: ImageInput, **options: Unpack[Options]) -> np.ndarray:
        """The (H, W) label image (0 = background, 1..N = cells), or (N, H, W) for a stack; see SegmentResult."""
        return self.segment(image, format="json", **options).labels

    def save(
        self,
        image: ImageInput,
        path: str | os.PathLike[str],
        *,
        format: Format | None = None,
        **options: Unpack[Options],
    ) -> Path:
        """Write the answer in `format` (default: from the file name, e.g. .zip -> an ImageJ ROI set) to `path`."""
        path = Path(path)
        path.write_bytes(self._post(image, _format_of(path, format), options).content)
        return path

    def health(self) -> dict[str, Any]:
        """Whether the process answers (open even with an API key)."""
        return self._get("/health", self._retry())

    def ready(self) -> dict[str, Any]:
        """Whether the model is loaded and warm (`ready`), and what the service is doing (`status`); asks once."""
        return self._get("/ready", _Retry(0, 0), also_ok=(503,))

    def wait_until_ready(self, timeout: float = 120.0) -> dict[str, Any]:
        """Block until /ready answers 200, through refused connections while the service starts; ServiceError
        saying what it was still doing once `timeout` seconds of waiting are spent."""
        return self._get("/ready", _Retry(math.inf, timeout))

    def models(self) -> dict[str, Any]:
        """The versions loaded (`loaded`: each with its state and a summary of its model.json), the `default` one,
        and those in the store (`available`)."""
        return self._get("/models", self._retry())

    def load_model(self, version: str) -> dict[str, Any]:
        """Have the service load `version` from its store and serve it (a no-op if it is loaded): what it did, and
        which version it unloaded to make room (`evicted`). ServiceError with the reason if it cannot."""
        return _checked(self._send("POST", _model_url(version, "load"), self._retry())).json()

    def unload_model(self, version: str) -> dict[str, Any]:
        """Have the service stop serving `version` and free its memory (never the default model)."""
        return _checked(self._send("POST", _model_url(version, "unload"), self._retry())).json()

    def _post(self, image: ImageInput, output: Format, options: Options) -> httpx.Response:
        return _checked(self._send("POST", "/segment", self._retry(), **_segment_request(image, output, options)))

    def _get(self, url: str, retry: _Retry, also_ok: tuple[int, ...] = ()) -> dict[str, Any]:
        return _checked(self._send("GET", url, retry), also_ok).json()

    def _send(self, method: str, url: str, retry: _Retry, **request: Any) -> httpx.Response:
        while True:
            try:
                response = self._http.request(method, url, **request)
            except CONNECTION_ERRORS as exc:
                if (delay := retry.delay(None)) is None:
                    raise _unreachable(self._http.base_url, exc) from exc
            else:
                if (delay := retry.delay(response)) is None:
                    return response
            time.sleep(delay)


class AsyncCellsegClient(_Client):
    """The same as CellsegClient, for asyncio: every method is awaited; use `async with` (or `aclose`)."""

    _http: httpx.AsyncClient

    def _open(self, **options: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(**options)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    @overload
    async def segment(
        self, image: ImageInput, *, format: Literal["json"] = "json", **options: Unpack[Options]
    ) -> SegmentResult: ...
    @overload
    async def segment(self, image: ImageInput, *, format: FileFormat, **options: Unpack[Options]) -> bytes: ...
    async def segment(
        self, image: ImageInput, *, format: Format = "json", **options: Unpack[Options]
    ) -> SegmentResult | bytes:
        return _answer(await self._post(image, format, options), format)

    async def labels(self, image: ImageInput, **options: Unpack[Options]) -> np.ndarray:
        return (await self.segment(image, format="json", **options)).labels

    async def save(
        self,
        image: ImageInput,
        path: str | os.PathLike[str],
        *,
        format: Format | None = None,
        **options: Unpack[Options],
    ) -> Path:
        path = Path(path)
        path.write_bytes((await self._post(image, _format_of(path, format), options)).content)
        return path

    async def health(self) -> dict[str, Any]:
        return await self._get("/health", self._retry())

    async def ready(self) -> dict[str, Any]:
        return await self._get("/ready", _Retry(0, 0), also_ok=(503,))

    async def wait_until_ready(self, timeout: float = 120.0) -> dict[str, Any]:
        return await self._get("/ready", _Retry(math.inf, timeout))

    async def models(self) -> dict[str, Any]:
        return await self._get("/models", self._retry())

    async def load_model(self, version: str) -> dict[str, Any]:
        return _checked(await self._send("POST", _model_url(version, "load"), self._retry())).json()

    async def unload_model(self, version: str) -> dict[str, Any]:
        return _checked(await self._send("POST", _model_url(version, "unload"), self._retry())).json()

    async def _post(self, image: ImageInput, output: Format, options: Options) -> httpx.Response:
        request = _segment_request(image, output, options)
        return _checked(await self._send("POST", "/segment", self._retry(), **request))

    async def _get(self, url: str, retry: _Retry, also_ok: tuple[int, ...] = ()) -> dict[str, Any]:
        return _checked(await self._send("GET", url, retry), also_ok).json()

    async def _send(self, method: str, url: str, retry: _Retry, **request: Any) -> httpx.Response:
        while True:
            try:
                response = await self._http.request(method, url, **request)
            except CONNECTION_ERRORS as exc:
                if (delay := retry.delay(None)) is None:
                    raise _unreachable(self._http.base_url, exc) from exc
            else:
                if (delay := retry.delay(response)) is None:
                    return response
            await asyncio.sleep(delay)
