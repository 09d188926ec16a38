"""The page at / and the API docs, in a real headless Chromium (Debian's, driven by Playwright) with the network
cut: every request that would leave 127.0.0.1 is recorded and refused.

`python -m tests.api.test_page URL OUT.png IMAGE` takes the screenshot in the docs from a running service.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
from collections.abc import Iterator
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
import tifffile
from PIL import Image

from app.ml.data.synth import generate_image
from app.ml.imageio import to_uint8
from tests.api.conftest import png

pytestmark = pytest.mark.slow
playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]' installs playwright")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = "Chromium not found: apt-get install chromium (Debian's package; .ci/run installs it)"
if CHROMIUM is None and os.environ.get("CI"):  # CI installs it: a missing browser is a broken CI, not a skip
    pytest.fail(NO_CHROMIUM, pytrace=False)
requires_chromium = pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
# Without the background-networking flags Chromium calls Google's hosts at start; here they are simply off.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
IMAGE = png(to_uint8(generate_image(np.random.default_rng(5), 256, 256, "shsy5y").image))


@contextlib.contextmanager
def offline_page(base_url: str) -> Iterator[tuple[object, list[str]]]:
    """A Chromium page whose requests may only go to the service; yields it and the list of refused URLs, which
    also holds what the service's Content-Security-Policy blocked (Chromium's console says)."""
    refused: list[str] = []
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        context = browser.new_context(base_url=base_url, accept_downloads=True, viewport={"width": 1200, "height": 900})

        def only_local(route, request) -> None:
            if urlparse(request.url).hostname == "127.0.0.1":
                route.continue_()
            else:
                refused.append(request.url)
                route.abort()

        def blocked_by_policy(message) -> None:
            if "Content Security Policy" in message.text:
                refused.append(message.text)

        context.route("**/*", only_local)
        page = context.new_page()
        page.on("console", blocked_by_policy)
        try:
            yield page, refused
        finally:
            browser.close()


@pytest.fixture
def browser_page(server: str) -> Iterator[tuple[object, list[str]]]:
    with offline_page(server) as opened:
        yield opened


@requires_chromium
def test_a_dropped_image_shows_its_cells_and_the_downloads_are_the_service_s_files(browser_page, client, tmp_path):
    page, refused = browser_page
    page.goto("/")
    page.wait_for_selector("#model:has-text('synth-v1')")
    (tmp_path / "cells.png").write_bytes(IMAGE)
    page.set_input_files("#file", str(tmp_path / "cells.png"))
    page.wait_for_selector("#result:not([hidden])", timeout=60_000)
    expected = client.post("/segment", files={"file": ("cells.png", IMAGE)}).json()
    assert page.inner_text("#count") == str(expected["cell_count"])
    assert page.inner_text("#mode-ran") == expected["mode"]
    assert page.eval_on_selector("#overlay", "img => [img.naturalWidth, img.naturalHeight]") == [256, 256]

    with page.expect_download() as download:
        page.click("button[data-format=tiff]")
    assert download.value.suggested_filename == "cells-labels.tif"
    labels = tifffile.imread(download.value.path())
    served = client.post("/segment", params={"format": "png"}, files={"file": ("cells.png", IMAGE)}).content
    assert np.array_equal(labels, np.asarray(Image.open(io.BytesIO(served))))
    page.screenshot(path=tmp_path / "page.png", full_page=True)
    assert refused == []


@requires_chromium
def test_a_file_that_is_no_image_shows_the_service_s_reason(browser_page, tmp_path):
    page, refused = browser_page
    page.goto("/")
    (tmp_path / "notes.txt").write_text("these are my notes")
    page.set_input_files("#file", str(tmp_path / "notes.txt"))
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    assert page.inner_text("#error").startswith("415: the file is not an image we can read.")
    assert refused == []


@requires_chromium
def test_the_model_chooser_offers_the_loaded_versions_and_the_page_names_the_one_that_ran(tmp_path):
    from tests.api.conftest import running_server  # noqa: PLC0415 - a second server, only here
    from tests.conftest import MODEL_STORE  # noqa: PLC0415

    default, other = "sartorius-w16-v3", "sartorius-w16-v1"
    for version in (default, other):
        shutil.copytree(MODEL_STORE / version, tmp_path / "store" / version)
    (tmp_path / "store" / "DEFAULT").write_text(default)
    (tmp_path / "cells.png").write_bytes(IMAGE)
    with running_server(tmp_path / "store", compile="false") as url, offline_page(url) as (page, refused):
        assert httpx.post(f"{url}/models/{other}/load", timeout=120).status_code == 200
        page.goto("/")
        page.wait_for_selector(f"#model-version option[value='{other}']", state="attached")
        names = page.eval_on_selector_all("#model-version option", "options => options.map(o => o.textContent)")
        assert names == [f"{default} (default)", other]
        assert page.input_value("#model-version") == default
        page.select_option("#model-version", other)
        page.set_input_files("#file", str(tmp_path / "cells.png"))
        page.wait_for_selector("#result:not([hidden])", timeout=60_000)
        assert page.inner_text("#model-ran") == other
        assert refused == []


@requires_chromium
def test_the_api_docs_render_without_internet(browser_page):
    page, refused = browser_page
    page.goto("/docs")
    page.wait_for_selector(".swagger-ui .info .title:has-text('cellseg')", timeout=30_000)
    page.wait_for_selector("text=/segment")
    assert refused == []


def test_the_page_and_its_files_are_open_with_an_api_key_and_everything_else_is_not(trained_model):
    from tests.api.conftest import running_server  # noqa: PLC0415 - a second server, only here

    with running_server(trained_model.parent, api_key="secret") as url:
        assert httpx.get(f"{url}/").status_code == 200
        assert httpx.get(f"{url}/static/page/page.js").status_code == 200
        assert httpx.get(f"{url}/static/docs/swagger-ui-bundle.js").status_code == 200
        for path in ("/docs", "/openapi.json", "/models"):
            assert httpx.get(f"{url}{path}").status_code == 401


if __name__ == "__main__":
    url, out, image = sys.argv[1:4]
    with offline_page(url) as (page, refused):
        page.goto("/")
        page.set_input_files("#file", image)
        page.wait_for_selector("#result:not([hidden])", timeout=120_000)
        page.screenshot(path=out, full_page=True)
    print(f"wrote {out}; requests refused: {refused or 'none'}")
