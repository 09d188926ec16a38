"""Work in a thread that stops when its request is given up: asyncio can stop awaiting a thread, but not the
thread. A long loop (one cell after another, in the output encoders) calls `check()` between steps; the work run
by `in_thread` then ends with `StoppedError` soon after the awaiting task is cancelled (its client left, or its deadline
passed), so no answer nobody waits for keeps a core busy."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_stop: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("stop", default=None)


class StoppedError(Exception):
    """The work's caller is gone; nothing will read what it makes."""


def check() -> None:
    """Raise StoppedError if the work running in this thread was given up; nothing outside `in_thread`."""
    stop = _stop.get()
    if stop is not None and stop.is_set():
        raise StoppedError


async def in_thread(function: Callable[..., T], *args: object) -> T:
    """`function(*args)` in the default executor, as asyncio.to_thread, with `check()` raising StoppedError in it once
    the awaiting task is cancelled."""
    stop = threading.Event()
    context = contextvars.copy_context()
    context.run(_stop.set, stop)
    call = functools.partial(context.run, function, *args)
    try:
        return await asyncio.get_running_loop().run_in_executor(None, call)
    except asyncio.CancelledError:
        stop.set()
        raise
