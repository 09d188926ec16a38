"""Map the typed errors of app.ml and request validation to clear JSON 4xx/5xx answers: {"detail": "..."}."""

from __future__ import annotations

import logging
import reprlib

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app.ml.errors import (
    CellSegError,
    CheckpointError,
    ImageTooLargeError,
    InvalidImageError,
    InvalidOptionError,
    UnsupportedImageError,
)
from app.ml.serving.batcher import QueueFullError
from app.ml.serving.registry import ModelNotFoundError, ModelNotLoadedError, ModelNotReadyError, PinnedModelError

log = logging.getLogger("cellseg.api")

# Most specific first: the first matching class decides the status.
STATUS_OF: list[tuple[type[CellSegError], int]] = [
    (ImageTooLargeError, 413),
    (UnsupportedImageError, 415),
    (InvalidImageError, 422),
    (InvalidOptionError, 422),
    (QueueFullError, 503),
    (ModelNotFoundError, 404),
    (ModelNotLoadedError, 409),
    (PinnedModelError, 409),
    (CheckpointError, 422),  # a model folder that cannot be loaded: the reason says which file and what
    (ModelNotReadyError, 503),
]
RETRY_AFTER = {QueueFullError: "1", ModelNotReadyError: "2"}  # seconds


MAX_DETAIL = 2000  # characters of an error's reason an answer holds; what a file names is echoed, and files lie


def public_detail(exc: CellSegError) -> str:
    """The error's reason as an answer gives it: shortened where a file made it long."""
    return _capped(str(exc))


def _capped(text: str) -> str:
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 1] + "…"


# A sample of a bad input, not all of it: a request may hold megabytes of text parts, and repr makes a byte 4.
_ECHO = reprlib.Repr()
_ECHO.maxstring, _ECHO.maxother, _ECHO.maxlist, _ECHO.maxtuple = 60, 60, 3, 3


def status_of(exc: CellSegError) -> int:
    return next((status for cls, status in STATUS_OF if isinstance(exc, cls)), 500)


async def handle_cellseg_error(request: Request, exc: CellSegError) -> JSONResponse:
    status = status_of(exc)
    retry_after = next((seconds for cls, seconds in RETRY_AFTER.items() if isinstance(exc, cls)), None)
    headers = {"Retry-After": retry_after} if retry_after else None
    if status >= 500 and not retry_after:
        log.error("unexpected error: %s", exc, exc_info=exc)
    return JSONResponse({"detail": public_detail(exc)}, status_code=status, headers=headers)


async def handle_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's list of validation errors -> one readable sentence per problem."""
    problems, length = [], 0
    for error in exc.errors():
        where, *path = error.get("loc", ("request",))
        name = ".".join(str(p) for p in path) or where
        problems.append(f"{where} parameter '{name}': {error.get('msg', 'invalid')}{_got(error)}")
        length += len(problems[-1]) + 2
        if length > MAX_DETAIL:  # a thousand bad fields make no longer an answer
            break
    return JSONResponse({"detail": _capped("; ".join(problems))}, status_code=422)


def _got(error: dict) -> str:
    shown = "input" in error and not isinstance(error["input"], dict)
    return f" (got {_ECHO.repr(error['input'])})" if shown else ""


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(CellSegError, handle_cellseg_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
