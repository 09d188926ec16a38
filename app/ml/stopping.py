"""Work in a thread that stops when its request is given up: asyncio can stop awaiting a thread, but not the
thread. A long loop (one cell after another, in the output encoders) calls `check()` between steps; the work run
by `in_thread` then ends with `StoppedError` soon after the awaiting task is cancelled (its client left, or its deadline
passed), so no answer nobody waits for keeps a core busy. The cancelled task ends only once its thread has: what the
request holds (its pixels in the budget) is freed when the memory the thread works on is, not a step earlier."""

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
    the awaiting task is cancelled; the cancellation takes effect when the thread has stopped."""
    stop = threading.Event()
    context = contextvars.copy_context()
    context.run(_stop.set, stop)
    call = functools.partial(context.run, _checked, function, *args)
    thread = asyncio.get_running_loop().run_in_executor(None, call)
    try:
        return await asyncio.shield(thread)
    except asyncio.CancelledError:
        stop.set()  # a step not begun yet ends at once, one running at its next check() or its end
        await until_done({thread})
        raise


def _checked(function: Callable[..., T], *args: object) -> T:
    check()
    return function(*args)


async def until_done(work: set[asyncio.Future]) -> None:
    """Wait for `work` to end (cancelled work too) whatever cancels the waiter meanwhile: it is the memory that work
    holds, and what the waiter frees after it (the pixel budget) must not be freed first. Each ends within a step."""
    pending = {future for future in work if not future.done()}
    while pending:
        try:
            _, pending = await asyncio.wait(pending)
        except asyncio.CancelledError:
            continue  # the waiter's own cancellation was delivered; it re-raises once the work has ended
    for future in work:
        if not future.cancelled():
            future.exception()  # retrieved: a StoppedError nobody reads is no "never retrieved" warning
