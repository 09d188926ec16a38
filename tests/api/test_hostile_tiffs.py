"""Issue 26's hostile TIFFs against a real server (the bundled model, CELLSEG_MAX_PIXELS lowered to 4 M so the
files stay small): each answered with a JSON 4xx before decoding, the server's peak memory unchanged; then fuzzed
TIFFs, every one a 200 or a JSON 4xx. docs/reliability.md has the same files at the issue's own sizes, measured."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from urllib.parse import unquote

import httpx
import pytest

from app.bench.localserver import LocalServer, running_server
from app.ml.imageio import ImageLimits
from tests.conftest import MODEL_STORE
from tests.ml import hostile_tiffs as hostile
from tests.ml import tiff_fuzz

pytestmark = pytest.mark.slow

MAX_PIXELS = 4_000_000
UNCHANGED_MIB = 48  # the most a refused upload may add to the server's peak: parsing its upload, not its pixels


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    log = tmp_path_factory.mktemp("hostile") / "server.log"
    settings = {"model_store": str(MODEL_STORE), "compile": "false", "torch_threads": "2", "max_pixels": "4000000"}
    with running_server(log, timeout=300, **settings) as running:
        httpx.post(f"{running.url}/segment", files={"file": ("a.tif", hostile.two_channels())}, params={"channel": "0"})
        yield running


def peak_mib(server: LocalServer) -> float:
    return server.memory_kib()["VmHWM"] / 1024


CASES = {
    # 1. a 16x16 first page; the OME-XML's image is the 3000x2000 second page (6 MPx, over the 4 MPx limit)
    "ome-hidden-page": (lambda: hostile.ome_hidden_page(3000, 2000), {}, 413, "3000x2000 = 6,000,000 pixels"),
    # 2. 300,000,000 planes declared in 1.6 KB
    "ome-plane-count": (hostile.ome_plane_count, {}, 422, "declares 300,000,000 planes from IFD 0, beyond the file's"),
    # 3. 1000x1000 (1 MPx) with 450 planar samples
    "planar-samples": (lambda: hostile.planar_samples(1000, 1000, 450), {}, 413, "1000x1000 x 57 planes"),
    # 4. image codecs inside a 16x16 TIFF
    "png-strip": (lambda: hostile.png_strip(20_000), {}, 415, "compression PNG (34933) is not one we read"),
    "jpeg2000-strip": (hostile.jpeg2000_strip, {}, 415, "compression JPEG2000 (34712) is not one we read"),
    "jpeg-strip-lying": (
        lambda: hostile.jpeg_strip_lying(20_000, 20_000),
        {},
        422,
        "declares 20000x20000 pixels of 1 samples in its own header",
    ),
    # 8. values that reached the code unchecked (plain-text 500s before)
    "bits-per-sample-0": (lambda: hostile.bits_per_sample(0), {}, 415, "(0-bit, SampleFormat 1) are not a type"),
    "bits-per-sample-128": (lambda: hostile.bits_per_sample(128), {}, 415, "(128-bit, SampleFormat 1) are not"),
    "shaped-axes-YYX": (hostile.shaped_axes, {}, 422, "axes 'YYX'"),
    "ome-order-XYZZT": (lambda: hostile.ome_dimension_order("XYZZT"), {}, 422, "DimensionOrder 'XYZZT'"),
    "ome-order-XYXYT": (lambda: hostile.ome_dimension_order("XYXYT"), {}, 422, "DimensionOrder 'XYXYT'"),
    **{
        f"channel-{name}": (hostile.two_channels, {"channel": text}, 422, f"channel={text!r} is not in this image")
        for name, text in [("superscript-2", "²"), ("superscript-1", "¹"), ("circled-1", "①"), ("ethiopic-1", "፩")]
    },
    "channel-superscript-0-streamed": (hostile.two_channels, {"channel": "⁰"}, 422, "channel='⁰' is not in this"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_hostile_tiff_gets_a_json_4xx_before_decoding(server, name):
    make, params, status, detail = CASES[name]
    data = make()
    before = peak_mib(server)
    headers = {"X-Request-ID": f"hostile-{name}"}
    streamed = name.endswith("-streamed")
    if streamed:
        headers["Accept"] = "text/event-stream"
    started = time.perf_counter()
    answer = httpx.post(
        f"{server.url}/segment", params=params, files={"file": ("h.tif", data)}, headers=headers, timeout=120
    )
    seconds = time.perf_counter() - started
    if streamed:  # the stream has begun (200): the error is its last event
        assert answer.status_code == 200
        event, data = answer.text.strip().split("\n\n")[-1].split("\n")
        error = json.loads(data.removeprefix("data: "))
        assert event == "event: error" and error["status"] == status and detail in error["detail"], answer.text
    else:
        assert answer.status_code == status, answer.text
        assert detail in answer.json()["detail"]
    assert answer.headers["x-request-id"] == f"hostile-{name}"
    assert seconds < 10
    assert peak_mib(server) - before < UNCHANGED_MIB, f"{len(data):,} bytes raised the peak to {peak_mib(server)}"
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200


def test_fuzzed_tiffs_get_a_200_or_a_json_4xx_and_never_more_than_the_budget(server):
    before = peak_mib(server)
    statuses: dict[int, int] = {}
    for index, data in enumerate(tiff_fuzz.corpus(120, seed=260)):
        answer = httpx.post(f"{server.url}/segment", files={"file": (f"{index}.tif", data)}, timeout=120)
        statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
        assert answer.status_code == 200 or 400 <= answer.status_code < 500, (index, answer.text)
        assert answer.headers["content-type"] == "application/json", (index, answer.text)
        body = answer.json()
        expected = {"detail"} if answer.status_code != 200 else {"frames"} if "frames" in body else {"cells"}
        assert expected <= body.keys(), (index, answer.text[:300])
    print(statuses, f"peak {before:.0f} -> {peak_mib(server):.0f} MiB")
    assert statuses.get(200, 0) >= 10 and sum(statuses.values()) == 120
    budget_mib = tiff_fuzz.budget_bytes(b"", ImageLimits(max_pixels=MAX_PIXELS)) / 2**20
    assert peak_mib(server) - before < budget_mib


def test_channel_names_come_back_percent_encoded_in_x_channel(server):
    """Point 9: a channel named with non-Latin-1 characters, or holding CR LF, gave a 500 or a cut connection."""
    names = ("Phase–contrast", "Ca²⁺", "a\r\nX-Evil: 1", "DAPI")
    data = hostile.named_channels(*names)
    for index, name in enumerate(names):
        answer = httpx.post(
            f"{server.url}/segment", params={"channel": str(index), "format": "png"}, files={"file": ("c.tif", data)}
        )
        assert answer.status_code == 200, answer.text
        assert unquote(answer.headers["x-channel"]) == name
        assert "x-evil" not in answer.headers
    assert answer.headers["x-channel"] == "DAPI"  # printable ASCII as it is


def test_long_channel_names_are_not_echoed_whole(server):
    """Point 5: an error listing a file's channels echoed their names whole (5 MB in the attack); now each is cut to
    what `channel=` could name, and the answer to its error's length."""
    data = hostile.named_channels("x" * 400_000, "y" * 400_000)
    answer = httpx.post(f"{server.url}/segment", files={"file": ("c.tif", data)})
    assert answer.status_code == 422 and "the image has 2 channels: 0 (xxx" in answer.json()["detail"]
    assert len(answer.content) < 2_000
    streamed = httpx.post(
        f"{server.url}/segment", files={"file": ("c.tif", data)}, headers={"Accept": "text/event-stream"}
    )
    assert streamed.status_code == 200 and "event: error" in streamed.text and len(streamed.content) < 2_000


def test_a_tiff_of_200000_pages_is_refused_while_the_server_keeps_answering(server):
    """Point 7: the pages of a TIFF are counted in a thread, with a cap on the walk: /health answered after 5.8-8.2 s
    while a 480,000-page TIFF was counted on the event loop."""
    data = hostile.write([hostile.small_page() for _ in range(200_000)])  # 23 MB
    slowest, done = [0.0], threading.Event()

    def poll_health() -> None:
        while not done.is_set():
            started = time.perf_counter()
            httpx.get(f"{server.url}/health", timeout=60)
            slowest[0] = max(slowest[0], time.perf_counter() - started)
            time.sleep(0.02)

    poller = threading.Thread(target=poll_health)
    poller.start()
    try:
        answer = httpx.post(f"{server.url}/segment", files={"file": ("pages.tif", data)}, timeout=120)
    finally:
        done.set()
        poller.join()
    assert answer.status_code == 413 and "more than 10,000 pages" in answer.json()["detail"]
    assert slowest[0] < 1.0, f"/health took {slowest[0]:.2f} s meanwhile"


def test_a_stacks_frame_axes_come_back_percent_encoded_in_x_frame_axes(server):
    """Issue 26's fixes attacked again: X-Channel was encoded, X-Frame-Axes was not. A 500-byte TIFF whose
    tifffile "shaped" description names its frame axis "€" got a 500; CR or LF, the connection closed unanswered."""
    for escaped, axis in (("\\u20ac", "€"), ("\\r", "\r"), ("\\n", "\n"), ("Z", "Z")):
        data = hostile.shaped_axes(f"{escaped}YX")
        answer = httpx.post(f"{server.url}/segment", params={"format": "tiff"}, files={"file": ("s.tif", data)})
        assert answer.status_code == 200, answer.text
        assert unquote(answer.headers["x-frame-axes"]) == axis
    assert answer.headers["x-frame-axes"] == "Z"  # printable ASCII as it is
