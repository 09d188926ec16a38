"""Pure ASGI middleware (no buffering of bodies): request ids, access logs and metrics; the API key and admission,
both decided before any of the body is read; the upload size limit."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.logs import internal_error, request_id
from app.api.metrics import Metrics

log = logging.getLogger("cellseg.access")
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Metric labels come from fixed sets, so no client can grow /metrics by sending made-up methods.
_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
OPEN_PATHS = {"/health", "/"}  # answered without the API key: a liveness probe and the page hold no secrets
OPEN_PREFIXES = ("/static/",)  # the page's and the docs' script and style files, the same for everyone


async def send_json(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer {"detail": ...} with `status` and close the connection (the body may be left unread)."""
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    """When a key is set, every route but OPEN_PATHS and the static files (the docs and the OpenAPI schema included)
    needs it in the X-API-Key header; a request without it gets 401 before any of its body is read (the page asks a
    person for the key and sends it). The header's bytes are
    compared with the key's UTF-8 bytes in constant time, so a non-ASCII key works too."""

    def __init__(self, app: ASGIApp, key: str | None) -> None:
        self.app, self.key = app, key.encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if self.key is None or scope["type"] != "http" or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-api-key", b"")
        if hmac.compare_digest(given, self.key):
            await self.app(scope, receive, send)
            return
        await send_json(
            send, 401, "missing or wrong API key: send it in the X-API-Key header", [(b"www-authenticate", b"APIKey")]
        )


RELEASE_SLOT = "cellseg.release_slot"  # the scope's key for the function that frees a request's admission slot


def release_slot(scope: Scope) -> None:
    """Free the admission slot of the request `scope` belongs to, as its work has ended (a no-op if freed)."""
    if RELEASE_SLOT in scope:
        scope[RELEASE_SLOT]()


class AdmissionMiddleware:
    """Refuses a POST /segment the service cannot take now before reading a byte of its body: when `max_active`
    such requests are already in progress (uploading or being worked on), or the work in flight fills the service
    or the queue of the model the request names (`is_full(model)`, None for the default), it gets 503 with
    Retry-After at once. A crowd of clients then costs each refused one a header's worth of work, and the admitted
    ones keep their pace.

    A request holds its slot until its work ends, not until its answer is read: a client that never reads its
    answer keeps its socket, not a slot. That end is the answer's start, but for a progress stream, which starts
    before its work: its route frees the slot (`release_slot`) as the work ends."""

    def __init__(self, app: ASGIApp, max_active: int, is_full: Callable[[str | None], bool]) -> None:
        self.app, self.max_active, self.is_full, self.active = app, max_active, is_full, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/segment" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if self.active >= self.max_active or self.is_full(_query_value(scope, "model")):
            await send_json(
                send,
                503,
                f"the service is busy ({self.active} requests in progress, its limit "
                f"{self.max_active}); retry after Retry-After seconds",
                [(b"retry-after", b"1")],
            )
            return
        self.active += 1
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self.active -= 1

        async def send_releasing(message: Message) -> None:
            if message["type"] == "http.response.start" and not _is_event_stream(message):
                release()
            await send(message)

        scope[RELEASE_SLOT] = release
        try:
            await self.app(scope, receive, send_releasing)
        finally:
            release()


def _is_event_stream(start: Message) -> bool:
    return any(name == b"content-type" and value.startswith(b"text/event-stream") for name, value in start["headers"])


def _query_value(scope: Scope, name: str) -> str | None:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(name)
    return values[-1] if values else None


# What a browser may do with each answer: the page runs its own script and style only and shows the overlay it
# fetched (a blob: URL); Swagger UI at /docs starts from an inline script and styles its own elements; the JSON and
# files may do nothing. No answer may be framed by another site (clickjacking) or sniffed into another type.
_PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)
_DOCS_POLICY = (
    "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)
_ANSWER_POLICY = "default-src 'none'; frame-ancestors 'none'"


def _security_headers(policy: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-security-policy", policy.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
    ]


_PAGE_HEADERS, _DOCS_HEADERS, _ANSWER_HEADERS = map(_security_headers, (_PAGE_POLICY, _DOCS_POLICY, _ANSWER_POLICY))


def security_headers(path: str) -> list[tuple[bytes, bytes]]:
    """The security headers of the answer at `path` (built once, shared by every answer)."""
    if path == "/docs" or path.startswith("/static/docs/"):
        return _DOCS_HEADERS
    if path == "/" or path.startswith("/static/page/"):
        return _PAGE_HEADERS
    return _ANSWER_HEADERS


class RequestContextMiddleware:
    """Gives every request an id (the client's X-Request-ID when sane), returns it as a header beside the security
    headers, logs one line per request and counts it in the metrics by route template, method and status. A request
    the server cancels while shutting down (an upload still coming in when the grace period ends) is answered 503,
    and an unexpected error a JSON 500 naming the request id, not uvicorn's plain-text 500."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _VALID_ID.match(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        started, status, answered = time.perf_counter(), 500, False

        async def send_with_id(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status, answered = message["status"], True
                added = [(b"x-request-id", rid.encode()), *security_headers(scope["path"])]
                message["headers"] = [*message.get("headers", []), *added]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # Only uvicorn cancels a request's own task, at the end of a shutdown's grace period.
            if answered:
                raise
            await send_json(
                send_with_id,
                503,
                "the service is shutting down; retry in a moment, maybe elsewhere",
                [(b"retry-after", b"5")],
            )
        except Exception as exc:
            if answered:  # the answer has begun; the connection is cut and uvicorn logs it
                raise
            log.error("unexpected error: %s", exc, exc_info=exc)
            await send_json(send_with_id, 500, internal_error(rid))
        finally:
            self._record(scope, status, time.perf_counter() - started)
            request_id.reset(token)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        method = scope["method"] if scope["method"] in _METHODS else "other"
        self.metrics.requests.labels(method, route, str(status)).inc()
        self.metrics.latency.labels(route).observe(seconds)
        level = logging.WARNING if status >= 500 else logging.INFO
        log.log(
            level,
            "%s %s %d",
            scope["method"],
            scope["path"],
            status,
            extra={
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "duration_ms": round(seconds * 1000, 1),
                "client": (scope.get("client") or ("-",))[0],
            },
        )


class BodySizeLimitMiddleware:
    """Refuses bodies over max_bytes with 413: at once when Content-Length says so, otherwise as soon as the
    bytes received pass the limit (the rest is never read), whatever the app made of the cut-off body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        received, exceeded, started = 0, False, False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    return {"type": "http.disconnect"}  # the app stops reading; we answer below
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # whatever the app answers to a truncated body is replaced by our 413
            started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        await send_json(
            send,
            413,
            f"the upload is larger than the limit of {self.max_bytes:,} bytes; "
            "send a smaller image (PNG, JPEG or TIFF)",
        )
