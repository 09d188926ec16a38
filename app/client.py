"""A small Python client for the cellseg service, sync (`CellsegClient`) and async (`AsyncCellsegClient`).

    with CellsegClient("http://localhost:8000") as cellseg:
        labels = cellseg.labels("cells.png")  # (H, W) uint16: 0 = background, 1..N = cells

Both clients share everything but the waiting: requests are built, retried, bounded and read by the helpers
below, so the two cannot drift apart. Each request's whole time (connect, upload, every byte of the answer) is
bounded by one deadline, which httpx's own timeouts (per read) cannot do: `asyncio.timeout` in the async client, a
watchdog that shuts the request's socket in the blocking one. Nothing the answer says is trusted: its size is
capped while it streams, and its claims are checked before anything is allocated from them. It needs httpx, numpy,
Pillow and tifffile, never torch or the web stack; RLEs are parsed by the service's own `app.ml.rle`, so client
and server agree on the Kaggle convention by construction.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal, Self, TypedDict, Unpack, get_args, overload
from urllib.parse import quote

import httpx
import numpy as np
import tifffile
from PIL import Image

from app.ml import rle
from app.ml.errors import InvalidRLEError

FileFormat = Literal["png", "mask", "overlay", "tiff", "roi", "geojson", "coco"]
Format = Literal["json", FileFormat]
ImageInput = str | os.PathLike[str] | bytes | np.ndarray
"""A path to an image file, the file's bytes, or the pixels as an (H, W) array (sent as a PNG or TIFF)."""

# Retried besides 503s (answered before any work): failures where the request cannot have reached the service.
# Neither can have segmented the image, so retrying never does the work twice.
CONNECTION_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)
# A wait's floor: a Retry-After of 0 must not make a busy loop of requests.
MIN_WAIT = 0.25
# A label image is at most this many pixels (all frames together) unless the client is told otherwise: over twice the
# service's own default limit (CELLSEG_MAX_PIXELS, 24 M), 128 MB of uint16 labels.
MAX_ANSWER_PIXELS = 64 * 2**20
# The largest answer read unless the client is told otherwise; a JSON one takes a few times this once parsed.
MAX_ANSWER_BYTES = 256 * 2**20
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


class ClientOptions(TypedDict, total=False):
    """How a client reaches the service and what it puts up with; docs/client.md has the defaults.

    `timeout` bounds each request's whole time in seconds: connect, upload and the whole answer (a large image takes
    a while). `retries` and `max_wait` bound the retries after a 503 or a refused connection: how many, and the
    seconds from a call's start after which no new try begins (so a call ends within `max_wait` + `timeout`).
    `max_answer_bytes` caps an answer's size, `max_answer_pixels` the label images (width x height x frames) an
    answer may claim: beyond either the answer is refused with ServiceError before it is read or allocated."""

    api_key: str | None
    timeout: float
    retries: int
    max_wait: float
    max_answer_bytes: int
    max_answer_pixels: int


@dataclass(frozen=True)
class _Limits:
    """ClientOptions but the key, with their defaults."""

    timeout: float = 120.0
    retries: int = 3
    max_wait: float = 30.0
    max_answer_bytes: int = MAX_ANSWER_BYTES
    max_answer_pixels: int = MAX_ANSWER_PIXELS


class ServiceError(Exception):
    """The service refused (`status` is its HTTP status, `detail` its reason), could not be reached or did not
    answer in time (`status` None), or answered what the client cannot take (too large, not JSON, cells it cannot
    paint: `status` is the answer's)."""

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
    def from_json(cls, body: dict[str, Any], max_pixels: int = MAX_ANSWER_PIXELS) -> SegmentResult:
        """ValueError naming what is wrong where `body` is not the service's answer, or claims label images of
        more than `max_pixels` in all (`labels` would allocate them)."""
        if "frames" in body:
            frames = [_field(frame, "cells", list) for frame in _field(body, "frames", list)]
        else:
            frames = [_field(body, "cells", list)]
        width, height = _field(body, "width", int), _field(body, "height", int)
        if min(width, height) < 1 or width * height * len(frames) > max_pixels:
            raise ValueError(
                f"it claims {len(frames)} label image(s) of {width}x{height} pixels: more than max_answer_pixels "
                f"({max_pixels}) or none at all"
            )
        return cls(
            width=width,
            height=height,
            model_version=_field(body, "model_version", str),
            mode=_field(body, "mode", str),
            cell_type=body.get("cell_type"),
            cell_count=_field(body, "cell_count", int),
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
        cells. uint16, or int32 where a cell's id passes 65535. ServiceError if the cells cannot be painted."""
        images = np.zeros((len(self.frames), self.height, self.width), dtype=_label_dtype(self.cells))
        for image, cells in zip(images, self.frames, strict=True):
            _paint(image.reshape(-1), cells)
        return images if self.is_stack else images[0]


def _field(body: Any, name: str, kind: type) -> Any:
    """body[name], checked to be a `kind` (bool is no int here)."""
    value = body.get(name) if isinstance(body, dict) else None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"its {name!r} is missing or not {'a list' if kind is list else kind.__name__}")
    return value


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
    """Cells (each with `id` and a Kaggle `rle`) -> (H, W) label image. Raises ServiceError if a cell is malformed
    or two overlap: the service promises they never do, and a label image could not show both."""
    image = np.zeros(shape, dtype=_label_dtype(cells))
    _paint(image.reshape(-1), cells)
    return image


# A SegmentResult is only made from a 200 answer: errors found painting it are that answer's.
_PAINTED = HTTPStatus.OK
_MAX_ID = np.iinfo(np.int32).max


def _label_dtype(cells: list[dict[str, Any]]) -> type:
    ids = [cell.get("id") for cell in cells if isinstance(cell, dict)]
    largest = max((i for i in ids if isinstance(i, int)), default=0)
    return np.uint16 if largest <= np.iinfo(np.uint16).max else np.int32


def _paint(flat: np.ndarray, cells: list[dict[str, Any]]) -> None:
    """Paint `cells` into the zeros of `flat` (one image, row-major) in place, using no memory per pixel beyond it:
    each run adds its id where it starts and takes it off where it ends, and a running sum fills the runs (the
    sum wraps around in uint16, which still leaves exactly the ids). Runs that overlap are found sorted, not drawn."""
    ids, starts, ends = _runs(cells, flat.size)
    order = np.argsort(starts, kind="stable")
    clash = np.flatnonzero(starts[order][1:] < ends[order][:-1])
    if clash.size:
        first, second = ids[order][clash[0]], ids[order][clash[0] + 1]
        raise ServiceError(_PAINTED, f"cell {second} overlaps cell {first} in the answer")
    steps = np.zeros(flat.size + 1, dtype=flat.dtype)
    steps[starts] += ids.astype(flat.dtype)  # starts are distinct, ends too: no index twice in one statement
    steps[ends] -= ids.astype(flat.dtype)
    np.cumsum(steps[:-1], dtype=flat.dtype, out=flat)


def _runs(cells: list[dict[str, Any]], size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every run of every cell as (id, 0-indexed start, end past it); ServiceError naming a malformed cell."""
    ids, starts, ends = [], [], []
    for index, cell in enumerate(cells):
        try:
            cell_id, first, lengths = _cell_runs(cell, size)
        except (InvalidRLEError, ValueError) as exc:
            raise ServiceError(_PAINTED, f"cell {index} of the answer cannot be painted: {exc}") from exc
        ids.append(np.full(first.size, cell_id, dtype=np.int64))
        starts.append(first - 1)
        ends.append(first - 1 + lengths)
    return tuple(np.concatenate(part) if part else np.zeros(0, dtype=np.int64) for part in (ids, starts, ends))


def _cell_runs(cell: Any, size: int) -> tuple[int, np.ndarray, np.ndarray]:
    cell_id, text = _field(cell, "id", int), _field(cell, "rle", str)
    if not 1 <= cell_id <= _MAX_ID:
        raise ValueError(f"its id {cell_id} is not in 1..{_MAX_ID}")
    starts, lengths = rle.parse(text, (1, size))
    return cell_id, starts, lengths


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


@dataclass(frozen=True)
class _Answer:
    """A whole answer, read within its request's deadline and the size cap."""

    status: int
    headers: httpx.Headers
    content: bytes

    @property
    def is_success(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        try:
            return json.loads(self.content)
        except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8 at all
            raise ServiceError(self.status, f"the answer is not JSON ({exc}): {self.content[:80]!r}") from exc


def _checked(answer: _Answer, also_ok: tuple[int, ...] = ()) -> _Answer:
    """The answer if it succeeded, else ServiceError with the service's own explanation."""
    if answer.is_success or answer.status in also_ok:
        return answer
    try:
        body = answer.json()
    except ServiceError:  # not JSON: a proxy's page, say
        body = None
    body = body if isinstance(body, dict) else {}
    text = answer.content.decode(errors="replace")[:1000] or _phrase(answer.status)
    detail = body.get("detail") or body.get("status") or text  # /ready: status
    raise ServiceError(answer.status, str(detail))


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:  # a status no standard names
        return f"HTTP {status}"


def _object(answer: _Answer) -> dict[str, Any]:
    """The answer's JSON object: what health(), models() and the others promise."""
    body = answer.json()
    if not isinstance(body, dict):
        raise ServiceError(answer.status, f"the answer is JSON but not an object: {answer.content[:80]!r}")
    return body


def _answer(answer: _Answer, output: Format, max_pixels: int) -> SegmentResult | bytes:
    if output != "json":
        return answer.content
    try:
        return SegmentResult.from_json(_object(answer), max_pixels)
    except ValueError as exc:
        raise ServiceError(answer.status, f"the answer is not a segmentation: {exc}") from exc


class _Exchange:
    """One request under its deadline: the answer read up to the size cap, and httpx's failures as ServiceError
    (status: the answer's where it had begun, else None). Connection errors pass: the caller retries those."""

    def __init__(self, seconds: float, limits: _Limits) -> None:
        self.seconds, self.limits = seconds, limits
        self.status: int | None = None  # until the answer's status line is in
        self.expired = False  # the blocking client's watchdog shut the socket
        self.body = io.BytesIO()  # getvalue() hands its buffer over: the answer is held once, not twice

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, traceback: object) -> None:
        if exc is None or isinstance(exc, (ServiceError, *CONNECTION_ERRORS)):
            return
        if self.expired or isinstance(exc, (TimeoutError, httpx.TimeoutException)):
            left = "" if self.seconds >= self.limits.timeout else " (what was left of the call's time)"
            raise ServiceError(self.status, f"no whole answer from cellseg within {self.seconds:.3g} s{left}") from exc
        if isinstance(exc, httpx.HTTPError):  # the connection broke, a malformed answer, one that cannot be decoded
            raise ServiceError(self.status, f"the exchange with cellseg failed: {type(exc).__name__}: {exc}") from exc

    def begin(self, response: httpx.Response) -> None:
        """The answer has begun: refuse it at once if it says it will pass the cap."""
        self.status, limit = response.status_code, self.limits.max_answer_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ServiceError(self.status, f"the answer is {declared} bytes, over max_answer_bytes ({limit})")
        # httpx inflates each piece read whole, before the cap sees it, and gzip shrinks zeros a thousandfold; the
        # service never compresses, and the client asks for no compression, so a compressed answer is refused unread.
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise ServiceError(self.status, f"the answer is compressed ({encoding}), which the client did not ask for")

    def add(self, chunk: bytes) -> None:
        """One more piece of the answer (never compressed: see begin)."""
        if self.body.tell() + len(chunk) > self.limits.max_answer_bytes:
            raise ServiceError(
                self.status, f"the answer is over max_answer_bytes ({self.limits.max_answer_bytes} bytes)"
            )
        self.body.write(chunk)

    def answer(self, response: httpx.Response) -> _Answer:
        return _Answer(response.status_code, response.headers, self.body.getvalue())


class _Watchdog:
    """Shuts a blocking request's socket at its deadline, so a send or recv blocked in it returns at once: httpx's
    timeouts bound each operation, and a server trickling a byte a second never trips them. httpx lends the socket
    through its `trace` extension as it connects (so the blocking client keeps no connection between requests)."""

    def __init__(self, seconds: float, exchange: _Exchange) -> None:
        self.exchange, self.socket, self.lock = exchange, None, threading.Lock()
        self.timer = threading.Timer(seconds, self.expire)

    def __enter__(self) -> Self:
        self.timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.timer.cancel()

    def trace(self, event: str, info: dict[str, Any]) -> None:
        # TLS wraps the connected socket in another (the first is then detached): the last one is the one to shut.
        if event in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            with self.lock:
                self.socket = info["return_value"].get_extra_info("socket")
            if self.exchange.expired:  # connected only after the deadline
                self.expire()

    def expire(self) -> None:
        with self.lock:
            self.exchange.expired = True
            if self.socket is not None:
                with contextlib.suppress(OSError):  # closed already: the request ended as the timer fired
                    self.socket.shutdown(socket.SHUT_RDWR)


def _format_of(path: Path, output: Format | None) -> Format:
    if output is not None:
        return output
    if path.suffix.lower() not in FORMAT_OF_SUFFIX:
        raise ValueError(f"cannot tell the format from {path.name!r}: pass format= (one of {get_args(Format)})")
    return FORMAT_OF_SUFFIX[path.suffix.lower()]


class _Retry:
    """When to try a request again: after a 503 (busy, or still warming up) or a refused connection (the
    service is starting), at most `retries` times, and only while the wait ends before `max_wait` seconds from the
    call's start (wall time, the tries included). A 503 says how long to wait in its Retry-After header; without
    a usable one the wait doubles from half a second up to two. With `bounds_tries`, the tries themselves end by
    then too: `max_wait` bounds the whole call (wait_until_ready's `timeout`)."""

    def __init__(self, retries: float, max_wait: float, *, bounds_tries: bool = False) -> None:
        self.left, self.backoff, self.bounds_tries = retries, 0.5, bounds_tries
        self.until = time.monotonic() + max_wait

    def time_for_try(self, timeout: float) -> float:
        """Seconds the next try may take in all."""
        return min(timeout, self.until - time.monotonic()) if self.bounds_tries else timeout

    def delay(self, answer: _Answer | None) -> float | None:
        """Seconds to wait before trying again after `answer` (None: no connection), or None to stop."""
        if answer is not None and answer.status != 503:
            return None
        wanted = _retry_after(answer) if answer is not None else None
        if wanted is None:
            wanted, self.backoff = self.backoff, min(self.backoff * 2, 2.0)
        wait = max(wanted, MIN_WAIT)
        # Where the tries are bounded too, the next one needs a moment of its own after the wait.
        if self.left <= 0 or time.monotonic() + wait + (MIN_WAIT if self.bounds_tries else 0) >= self.until:
            return None
        self.left -= 1
        return wait


def _retry_after(answer: _Answer) -> float | None:
    """Retry-After in seconds, or None where it is absent or no usable number (an HTTP date, nan, inf, -5)."""
    try:
        seconds = float(answer.headers["retry-after"])
    except (KeyError, ValueError):
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _unreachable(base_url: httpx.URL, exc: Exception) -> ServiceError:
    return ServiceError(None, f"cannot reach cellseg at {base_url}: {exc}")


class _Client:
    """What both clients keep: where the service is, how to authenticate, what to put up with (ClientOptions)."""

    def __init__(self, base_url: str = "http://localhost:8000", **options: Unpack[ClientOptions]) -> None:
        api_key = options.pop("api_key", None)
        self.limits = _Limits(**options)
        headers = {"Accept-Encoding": b"identity"}  # the service never compresses; see _Exchange.begin
        if api_key:
            headers["X-API-Key"] = api_key.encode()  # bytes: a key need not be ASCII
        self._http = self._open(base_url=base_url, headers=headers, timeout=self.limits.timeout)

    def _open(self, **options: Any) -> Any:
        raise NotImplementedError

    def _retry(self) -> _Retry:
        return _Retry(self.limits.retries, self.limits.max_wait)


class CellsegClient(_Client):
    """The service over HTTP, blocking. Use it as a context manager (or call `close`) to free its connections."""

    _http: httpx.Client

    def _open(self, **options: Any) -> httpx.Client:
        # No connection kept between requests: each request's own socket is the one its watchdog may shut.
        return httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), **options)

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
        return _answer(self._post(image, format, options), format, self.limits.max_answer_pixels)

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
        """Block until /ready answers 200, through refused connections and 503s while the service starts;
        ServiceError with the last reason once `timeout` seconds (wall time, the requests included) are spent."""
        return self._get("/ready", _Retry(math.inf, timeout, bounds_tries=True))

    def models(self) -> dict[str, Any]:
        """The versions loaded (`loaded`: each with its state and a summary of its model.json), the `default` one,
        and those in the store (`available`)."""
        return self._get("/models", self._retry())

    def load_model(self, version: str) -> dict[str, Any]:
        """Have the service load `version` from its store and serve it (a no-op if it is loaded): what it did, and
        which version it unloaded to make room (`evicted`). ServiceError with the reason if it cannot."""
        return _object(_checked(self._send("POST", _model_url(version, "load"), self._retry())))

    def unload_model(self, version: str) -> dict[str, Any]:
        """Have the service stop serving `version` and free its memory (never the default model)."""
        return _object(_checked(self._send("POST", _model_url(version, "unload"), self._retry())))

    def _post(self, image: ImageInput, output: Format, options: Options) -> _Answer:
        return _checked(self._send("POST", "/segment", self._retry(), **_segment_request(image, output, options)))

    def _get(self, url: str, retry: _Retry, also_ok: tuple[int, ...] = ()) -> dict[str, Any]:
        return _object(_checked(self._send("GET", url, retry), also_ok))

    def _send(self, method: str, url: str, retry: _Retry, **request: Any) -> _Answer:
        while True:
            try:
                answer = self._fetch(method, url, retry.time_for_try(self.limits.timeout), **request)
            except CONNECTION_ERRORS as exc:
                if (delay := retry.delay(None)) is None:
                    raise _unreachable(self._http.base_url, exc) from exc
            else:
                if (delay := retry.delay(answer)) is None:
                    return answer
            time.sleep(delay)

    def _fetch(self, method: str, url: str, seconds: float, **request: Any) -> _Answer:
        with _Exchange(seconds, self.limits) as exchange, _Watchdog(seconds, exchange) as watchdog:
            trace = {"trace": watchdog.trace}
            with self._http.stream(method, url, timeout=seconds, extensions=trace, **request) as response:
                exchange.begin(response)
                for chunk in response.iter_bytes():
                    exchange.add(chunk)
                return exchange.answer(response)


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
        return _answer(await self._post(image, format, options), format, self.limits.max_answer_pixels)

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
        return await self._get("/ready", _Retry(math.inf, timeout, bounds_tries=True))

    async def models(self) -> dict[str, Any]:
        return await self._get("/models", self._retry())

    async def load_model(self, version: str) -> dict[str, Any]:
        return _object(_checked(await self._send("POST", _model_url(version, "load"), self._retry())))

    async def unload_model(self, version: str) -> dict[str, Any]:
        return _object(_checked(await self._send("POST", _model_url(version, "unload"), self._retry())))

    async def _post(self, image: ImageInput, output: Format, options: Options) -> _Answer:
        request = _segment_request(image, output, options)
        return _checked(await self._send("POST", "/segment", self._retry(), **request))

    async def _get(self, url: str, retry: _Retry, also_ok: tuple[int, ...] = ()) -> dict[str, Any]:
        return _object(_checked(await self._send("GET", url, retry), also_ok))

    async def _send(self, method: str, url: str, retry: _Retry, **request: Any) -> _Answer:
        while True:
            try:
                answer = await self._fetch(method, url, retry.time_for_try(self.limits.timeout), **request)
            except CONNECTION_ERRORS as exc:
                if (delay := retry.delay(None)) is None:
                    raise _unreachable(self._http.base_url, exc) from exc
            else:
                if (delay := retry.delay(answer)) is None:
                    return answer
            await asyncio.sleep(delay)

    async def _fetch(self, method: str, url: str, seconds: float, **request: Any) -> _Answer:
        with _Exchange(seconds, self.limits) as exchange:
            async with asyncio.timeout(seconds), self._http.stream(method, url, timeout=seconds, **request) as response:
                exchange.begin(response)
                async with contextlib.aclosing(response.aiter_bytes()) as chunks:  # closed here, not by the GC
                    async for chunk in chunks:
                        exchange.add(chunk)
                return exchange.answer(response)
