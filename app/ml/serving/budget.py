"""The service's pixel budget: memory follows the pixels of the images being worked on, so they are counted.

A request may declare at most `per_request` pixels over all its images (read from their headers, before any is
decoded); the service works on at most `in_flight` pixels at once over all requests. A request over its own
budget is refused for good (413); one that does not fit beside the work in flight now is refused for the moment
(503, retry later), before any of its images is decoded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from app.ml.errors import ImageTooLargeError
from app.ml.serving.batcher import QueueFullError


class PixelBudget:
    """Counts the pixels admitted and not yet answered. Used from one event loop: no lock needed."""

    def __init__(self, per_request: int, in_flight: int) -> None:
        self.per_request, self.in_flight, self.used = per_request, in_flight, 0

    @contextlib.contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        """Hold `pixels` of the budget while inside; ImageTooLargeError or QueueFullError if they do not fit."""
        allowed = min(self.per_request, self.in_flight)  # a request larger than the whole budget never fits
        if pixels > allowed:
            raise ImageTooLargeError(
                f"the images of this request have {pixels:,} pixels in all (or their network inputs have); one "
                f"request may have at most {allowed:,}: send fewer or smaller images"
            )
        if self.used + pixels > self.in_flight:
            raise QueueFullError("the service is working on as many pixels as it may hold; retry in a moment")
        self.used += pixels
        try:
            yield
        finally:
            self.used -= pixels
