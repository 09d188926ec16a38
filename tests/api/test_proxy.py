"""The service behind a real nginx running deploy/nginx.conf, the config docker-compose.yml mounts.

The test renders that file by replacing a few exact strings (the upstream, the listen port, the /tmp paths and,
where the real values would take minutes or megabytes, shorter limits); each must be found exactly as often as
expected, so the config tested is the one compose runs.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from app.bench.localserver import free_port
from app.config import Settings
from app.ml.data.synth import generate_image
from app.ml.imageio import to_uint8
from tests.api.conftest import png
from tests.api.test_segment import decode_cells
from tests.conftest import REPO, started_nginx

pytestmark = pytest.mark.slow

CONFIG = REPO / "deploy" / "nginx.conf"
LIMIT = 64 * 1024  # the rendered body limit, so a refused upload is small
TIMEOUT = 2  # seconds, the rendered client_header_timeout and client_body_timeout
IMAGE = png(to_uint8(generate_image(np.random.default_rng(5), 256, 256, "cort").image))
ACCEPTED = "send a smaller image (PNG, JPEG or TIFF)"


def render(tmp: Path, upstream: str, port: int, **directives: str) -> str:
    """deploy/nginx.conf with the upstream, the port and the /tmp paths moved, and each of `directives`
    (`client_body_timeout="2s"`) set to a new value, in the error messages that quote it too; every string
    replaced must be found exactly as often as expected."""
    text = CONFIG.read_text()
    swaps = [
        ("server api:8000;", f"server {upstream};", 1),
        ("listen 8080;", f"listen 127.0.0.1:{port};", 1),
        (" /tmp/", f" {tmp}/", 6),
    ]
    for name, value in directives.items():
        old = directive(name)
        swaps.append((f"{name} {old};", f"{name} {value};", 1))
        if name == "client_max_body_size":
            swaps.append((f"limit of {int(old):,} bytes", f"limit of {int(value):,} bytes", 1))
        if name == "proxy_read_timeout":
            swaps.append((f"within {old[:-1]} s", f"within {value[:-1]} s", 1))
    for old, new, count in swaps:
        assert text.count(old) == count, f"deploy/nginx.conf should hold {old!r} {count} time(s)"
        text = text.replace(old, new)
    return text


def directive(name: str) -> str:
    """The value of a directive that deploy/nginx.conf sets once (at any level)."""
    (value,) = re.findall(rf"^\s*{name} (\S+);", CONFIG.read_text(), re.M)
    return value


@dataclass(frozen=True)
class Proxy:
    url: str
    port: int
    access_log: Path


@contextlib.contextmanager
def running_nginx(tmp: Path, upstream: str, **directives: str) -> Iterator[Proxy]:
    """nginx in the foreground on 127.0.0.1 with the rendered config; stopped gracefully (SIGQUIT) afterwards."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(render(tmp, upstream, port, **directives))
    access_log = tmp / "access.log"  # nginx's stdout
    with started_nginx(conf, tmp, port, access_log):
        yield Proxy(f"http://127.0.0.1:{port}", port, access_log)


@pytest.fixture(scope="module")
def proxy(server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """nginx in front of the real service, with a 64 KiB body limit and 2 s client timeouts."""
    upstream = server.removeprefix("http://")
    limits = {
        "client_max_body_size": str(LIMIT),
        "client_header_timeout": f"{TIMEOUT}s",
        "client_body_timeout": f"{TIMEOUT}s",
    }
    tmp = tmp_path_factory.mktemp("nginx")
    with running_nginx(tmp, upstream, **limits) as running:
        yield running


def segment(url: str, **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/segment", files={"file": ("cells.png", IMAGE, "image/png")}, headers=headers, timeout=60)


def test_the_config_matches_the_service_defaults_and_is_what_compose_mounts():
    settings = Settings()
    assert int(directive("client_max_body_size")) == settings.max_upload_bytes
    assert f"limit of {settings.max_upload_bytes:,} bytes; {ACCEPTED}" in CONFIG.read_text()
    upstream_idle = re.search(r"upstream cellseg \{[^}]*keepalive_timeout (\d+)s;", CONFIG.read_text())
    assert upstream_idle and int(upstream_idle[1]) < settings.keep_alive_seconds, "nginx must close idle first"
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    for name in ("proxy", "proxy-cpu"):
        assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in compose[name]["volumes"]
        assert compose[name]["ports"] == ["${CELLSEG_PORT:-8000}:8080"]
    for name in ("api", "api-cpu"):
        assert "ports" not in compose[name] and compose[name]["expose"] == ["8000"]
        assert "api" in compose[name]["networks"]["default"]["aliases"]


def test_health_and_a_segmented_image_are_the_same_through_the_proxy(proxy, server):
    health = httpx.get(f"{proxy.url}/health", timeout=10)
    assert health.status_code == 200, health.text
    direct, proxied = segment(server), segment(proxy.url)
    assert direct.status_code == proxied.status_code == 200, proxied.text
    assert proxied.json()["cell_count"] > 0
    assert np.array_equal(decode_cells(proxied.json()), decode_cells(direct.json()))


def test_the_request_id_is_kept_or_made_by_nginx_and_logged_by_it(proxy):
    assert segment(proxy.url, **{"X-Request-ID": "plate7-well-B3"}).headers["x-request-id"] == "plate7-well-B3"
    made = httpx.get(f"{proxy.url}/health", timeout=10).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made), "nginx's $request_id, kept by the service"
    deadline = time.monotonic() + 5  # nginx logs a request just after it has answered it
    while f'"request_id":"{made}"' not in proxy.access_log.read_text():
        assert time.monotonic() < deadline, f"{made} is not in nginx's access log"
        time.sleep(0.05)


def test_an_upload_over_the_body_limit_gets_413_with_a_json_detail_from_nginx(proxy):
    body = png(np.random.default_rng(0).integers(0, 256, (300, 300)).astype(np.uint8))  # about 90 KB
    assert len(body) > LIMIT
    refused = httpx.post(
        f"{proxy.url}/segment", files={"file": ("big.png", body)}, headers={"X-Request-ID": "too-big"}, timeout=30
    )
    assert refused.status_code == 413
    assert refused.headers["content-type"] == "application/json"
    assert refused.json() == {"detail": f"the upload is larger than the limit of {LIMIT:,} bytes; {ACCEPTED}"}
    assert refused.headers["x-request-id"] == "too-big"


def test_a_client_that_stalls_is_cut_off_by_the_proxy(proxy):
    stalls = {
        "headers": b"POST /segment HTTP/1.1\r\nHost: cellseg\r\n",  # the header never ends
        "body": b"POST /segment HTTP/1.1\r\nHost: cellseg\r\nContent-Length: 1000\r\n\r\nsome bytes",
    }
    sockets = {name: socket.create_connection(("127.0.0.1", proxy.port)) for name in stalls}
    started = time.monotonic()
    try:
        for name, data in stalls.items():
            sockets[name].sendall(data)
        for name, sock in sockets.items():
            sock.settimeout(TIMEOUT + 5)
            answer = b""
            with contextlib.suppress(ConnectionResetError):  # reset_timedout_connection: nginx resets it
                answer = b"".join(iter(lambda s=sock: s.recv(65536), b""))  # until nginx closes it
            waited = time.monotonic() - started
            assert TIMEOUT - 0.5 < waited < TIMEOUT + 3, f"{name}: closed after {waited:.1f} s"
            assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), f"{name}: {answer[:200]!r}"
    finally:
        for sock in sockets.values():
            sock.close()
    assert httpx.get(f"{proxy.url}/health", timeout=10).status_code == 200


def test_the_services_own_errors_pass_through_unchanged(proxy, server):
    def post(url: str) -> httpx.Response:
        return httpx.post(f"{url}/segment", files={"file": ("notes.txt", b"these are my notes")}, timeout=30)

    direct, proxied = post(server), post(proxy.url)
    assert proxied.status_code == direct.status_code == 415
    assert proxied.json() == direct.json()
    assert "not an image we can read" in proxied.json()["detail"]


@pytest.mark.parametrize(
    ("upstream", "status", "detail"),
    [
        (lambda listening: f"127.0.0.1:{free_port()}", 502, "the segmentation service is not reachable"),
        (lambda listening: f"127.0.0.1:{listening}", 504, "the segmentation service did not answer within"),
    ],
    ids=["nothing listening", "never answers"],
)
def test_nginx_answers_json_when_the_service_is_down_or_too_slow(
    tmp_path: Path, upstream: Callable[[int], str], status: int, detail: str
):
    with socket.socket() as silent:  # accepts connections (the kernel does) but never reads or answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        target = upstream(silent.getsockname()[1])
        with running_nginx(tmp_path, target, proxy_read_timeout="1s") as proxy:
            answer = httpx.get(f"{proxy.url}/ready", headers={"X-Request-ID": "down"}, timeout=10)
    assert answer.status_code == status
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["detail"].startswith(detail)
    assert "300 s" not in answer.json()["detail"], "the message quotes the rendered timeout"
    assert answer.headers["x-request-id"] == "down"
    if status == 502:
        assert answer.headers["retry-after"] == "5"
