"""Several models served at once, against real uvicorn processes: the store's real models (sartorius-w16-v3, the
default, beside v2 and v1), loaded and unloaded while requests come in, a failed load that changes nothing, memory
given back, the least recently used model evicted, the API key, and several workers that agree."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.bench.localserver import LocalServer
from app.bench.localserver import running_server as start_server
from app.client import CellsegClient, ServiceError
from app.ml.data.synth import generate_image
from app.ml.imageio import to_uint8
from tests.api.conftest import png
from tests.conftest import MODEL_STORE

pytestmark = pytest.mark.slow

DEFAULT, V2, V1 = "sartorius-w16-v3", "sartorius-w16-v2", "sartorius-w16-v1"
V2_COPY = "lab-copy-of-v2"  # a fourth good version, to fill the registry
IMAGE = png(to_uint8(generate_image(np.random.default_rng(3), 256, 320, "cort").image))
FAST = {"compile": "false", "torch_threads": "1", "max_wait_ms": "0"}  # warm-up on, compiling off: loads take ~1 s


def weights_of(folder: Path) -> Path:
    return next(folder.glob("weights-*.safetensors"))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three real models, a copy of v2 under another name, and three broken folders."""
    store = tmp_path_factory.mktemp("store") / "model_store"
    for version in (DEFAULT, V2, V1):
        shutil.copytree(MODEL_STORE / version, store / version)
    shutil.copytree(MODEL_STORE / V2, store / V2_COPY)
    (store / "DEFAULT").write_text(f"{DEFAULT}\n")
    corrupt = shutil.copytree(MODEL_STORE / V2, store / "corrupt-weights")
    data = bytearray(weights_of(corrupt).read_bytes())
    data[-1] ^= 0xFF  # one bit of one weight: the file still parses, its sha256 no longer matches
    weights_of(corrupt).write_bytes(bytes(data))
    missing = shutil.copytree(MODEL_STORE / V2, store / "missing-weights")
    weights_of(missing).unlink()
    bad_card = shutil.copytree(MODEL_STORE / V2, store / "bad-card")
    (bad_card / "model.json").write_text('{"version": ')
    return store


@pytest.fixture(scope="module")
def server(store: Path) -> Iterator[LocalServer]:
    with start_server(store.parent / "server.log", model_store=str(store), **FAST) as running:
        yield running


@pytest.fixture
def http(server: LocalServer) -> Iterator[httpx.Client]:
    """A client of the module's server, with only the default model loaded at the start of each test."""
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for model in client.get("/models").json()["loaded"]:
            if not model["default"]:
                assert client.post(f"/models/{model['version']}/unload").status_code == 200
        yield client


def segment(http: httpx.Client, model: str | None = None, **params: str) -> httpx.Response:
    return http.post("/segment", params={**params, **({"model": model} if model else {})}, files={"file": IMAGE})


def loaded(http: httpx.Client) -> list[str]:
    return [model["version"] for model in http.get("/models").json()["loaded"]]


def test_models_says_what_is_loaded_and_answers_name_the_model_that_ran(http):
    models = http.get("/models").json()
    assert (models["default"], models["max_models"], models["loading"]) == (DEFAULT, 3, None)
    assert models["available"] == sorted([DEFAULT, V2, V1, V2_COPY, "bad-card", "corrupt-weights", "missing-weights"])
    [default] = models["loaded"]
    assert (default["version"], default["default"], default["ready"], default["status"]) == (
        DEFAULT,
        True,
        True,
        "ready",
    )
    assert default["card"]["architecture"]["base_width"] == 16 and default["card"]["validation_score"] > 0.3

    assert segment(http).json()["model_version"] == DEFAULT
    loading = http.post(f"/models/{V1}/load").json()
    assert (loading["version"], loading["status"], loading["evicted"], loading["loaded"]) == (
        V1,
        "loaded",
        None,
        [DEFAULT, V1],
    )
    assert http.post(f"/models/{V1}/load").json()["status"] == "already loaded"
    assert segment(http, V1).json()["model_version"] == V1
    assert segment(http, V1, format="png").headers["x-model-version"] == V1
    assert segment(http, format="png").headers["x-model-version"] == DEFAULT
    assert http.get("/ready").json()["loaded"] == [DEFAULT, V1]
    state = {model["version"]: model for model in http.get("/models").json()["loaded"]}
    assert state[V1]["ready"] and not state[V1]["default"] and state[V1]["last_used_at"] and state[V1]["in_flight"] == 0
    assert http.get(f"/models/{V1}").json()["weights"]["sha256"] == state[V1]["card"]["weights_sha256"]


def test_a_model_not_loaded_or_not_in_the_store_is_refused_with_what_to_do(http):
    unknown = segment(http, "sartorius-w99")
    assert unknown.status_code == 404
    assert unknown.json()["detail"] == (
        "model version 'sartorius-w99' not found in the model store; available: bad-card, corrupt-weights, "
        f"{V2_COPY}, missing-weights, {V1}, {V2}, {DEFAULT}"
    )
    not_loaded = segment(http, V2)
    assert not_loaded.status_code == 409
    assert not_loaded.json()["detail"] == (
        f"model version '{V2}' is in the store but not loaded (loaded: {DEFAULT}); load it first: "
        f"POST /models/{V2}/load"
    )
    outside = segment(http, "../model_store")
    assert outside.status_code == 422
    assert outside.json()["detail"] == (
        "'../model_store' is not a model version: a version is the name of a folder in the model store, without '/' "
        "or '..'"
    )
    dots = http.post("/models/%2E%2E/load")
    assert dots.status_code == 422 and dots.json()["detail"].startswith("'..' is not a model version")
    assert http.post("/models/sartorius-w99/load").status_code == 404
    pinned = http.post(f"/models/{DEFAULT}/unload")
    assert pinned.status_code == 409
    assert pinned.json()["detail"] == (
        f"model {DEFAULT} is the default model: it answers requests without model= and is never unloaded (serve "
        "another default by setting CELLSEG_MODEL_VERSION and restarting)"
    )
    absent = http.post(f"/models/{V2}/unload")
    assert absent.status_code == 404
    assert absent.json()["detail"] == f"model version '{V2}' is not loaded (loaded: {DEFAULT})"


def test_a_failed_load_is_refused_with_its_reason_and_the_served_models_keep_answering(http, store):
    assert http.post(f"/models/{V2}/load").status_code == 200
    corrupt = weights_of(store / "corrupt-weights")
    recorded = json.loads((store / "corrupt-weights" / "model.json").read_text())["weights"]["sha256"]
    actual = hashlib.sha256(corrupt.read_bytes()).hexdigest()
    missing = json.loads((store / "missing-weights" / "model.json").read_text())["weights"]["file"]
    reasons = {
        "corrupt-weights": f"corrupt-weights/{corrupt.name}: sha256 is {actual} but corrupt-weights/model.json "
        f"records {recorded}; the file is corrupt or was replaced: restore it or retrain",
        "missing-weights": f"missing-weights/{missing} not found, but missing-weights/model.json names it",
        "bad-card": "bad-card/model.json is not valid JSON (Expecting value: line 1 column 13 (char 12))",
    }
    for version, reason in reasons.items():
        refused = http.post(f"/models/{version}/load")
        assert (refused.status_code, refused.json()) == (422, {"detail": reason}), version
        assert str(store) not in refused.text  # the service's own folders stay its own
        assert segment(http).status_code == 200, "the default answers right after"
        assert segment(http, V2).json()["model_version"] == V2, "and so does the other model loaded"
        assert loaded(http) == [DEFAULT, V2]
        assert segment(http, version).status_code == 409


def test_two_models_answer_side_by_side_each_with_its_own_cells(http, server):
    assert http.post(f"/models/{V1}/load").status_code == 200
    alone = {model: segment(http, model).json()["cells"] for model in (DEFAULT, V1)}
    assert alone[DEFAULT] != alone[V1], "the two models see this image differently, so a mix-up would show"

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            posts = [
                client.post("/segment", params={"model": (DEFAULT, V1)[i % 2]}, files={"file": IMAGE}) for i in range(8)
            ]
            return await asyncio.gather(*posts)

    answers = asyncio.run(together())
    for i, answer in enumerate(answers):
        model = (DEFAULT, V1)[i % 2]
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == model
        assert answer.json()["cells"] == alone[model]
    metrics = http.get("/metrics").text
    for model in (DEFAULT, V1):
        assert f'cellseg_inference_seconds_count{{model="{model}"}}' in metrics


def test_requests_that_started_on_a_model_finish_on_it_while_it_is_unloaded(http, server):
    assert http.post(f"/models/{V2}/load").status_code == 200
    large = png(to_uint8(generate_image(np.random.default_rng(4), 900, 1100, "astro").image))  # many tiles

    async def unload_midway() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            work = asyncio.ensure_future(
                client.post("/segment", params={"model": V2, "mode": "tile"}, files={"file": large})
            )
            while not any(m["in_flight"] for m in (await client.get("/models")).json()["loaded"]):
                await asyncio.sleep(0.01)
            unloaded = await client.post(f"/models/{V2}/unload")
            return await work, unloaded

    answer, unloaded = asyncio.run(unload_midway())
    assert answer.status_code == 200 and answer.json()["model_version"] == V2
    assert unloaded.json()["status"] == "unloaded" and unloaded.json()["drained"] == 1
    assert segment(http, V2).status_code == 409


def test_unloading_gives_the_memory_back(http, server):
    """Resident memory of the server process (VmRSS) before a load, after it, and after the unload, three times."""
    figures = []
    for _ in range(3):
        before = server.memory_kib()["VmRSS"]
        assert http.post(f"/models/{V2}/load").status_code == 200
        assert segment(http, V2).status_code == 200
        after_load = server.memory_kib()["VmRSS"]
        assert http.post(f"/models/{V2}/unload").status_code == 200
        after_unload = server.memory_kib()["VmRSS"]
        figures.append((before, after_load, after_unload))
    print(
        "VmRSS MiB (before load, after load and a request, after unload):",
        [tuple(round(kib / 1024, 1) for kib in row) for row in figures],
    )
    for before, after_load, after_unload in figures:
        added = after_load - before
        assert added > 4 * 1024, "a model and its warm-up take more than 4 MiB"
        assert after_unload - before < added / 2, "at least half of what the load added is given back"
    # Not more than allocator noise over the cycles: a model left behind each time would add its load's share.
    assert figures[-1][2] - figures[0][2] < min(row[1] - row[0] for row in figures) / 2, figures


def test_loading_when_full_evicts_the_least_recently_used_model_but_never_the_default(http):
    for version in (V2, V1):
        assert http.post(f"/models/{version}/load").status_code == 200
    assert segment(http, V2).status_code == 200  # V1 is now the least recently used
    assert segment(http, V1).status_code == 200  # V2 is, now
    assert segment(http, V2).status_code == 200  # V1 again
    answer = http.post(f"/models/{V2_COPY}/load").json()
    assert (answer["status"], answer["evicted"], answer["loaded"]) == ("loaded", V1, [DEFAULT, V2_COPY, V2])
    assert segment(http, V1).status_code == 409
    answer = http.post(f"/models/{V1}/load").json()
    assert answer["evicted"] == V2, "the default, used least of all, stays"
    assert segment(http).json()["model_version"] == DEFAULT


def test_the_client_chooses_loads_and_unloads_models(http, server, tmp_path):
    with CellsegClient(server.url) as cellseg:
        cellseg.load_model(V1)
        assert cellseg.segment(IMAGE, model=V1).model_version == V1
        assert cellseg.segment(IMAGE).model_version == DEFAULT
        assert [m["version"] for m in cellseg.models()["loaded"]] == [DEFAULT, V1]
        assert cellseg.unload_model(V1)["status"] == "unloaded"
        with pytest.raises(ServiceError) as refused:
            cellseg.save(IMAGE, tmp_path / "labels.png", model=V1)
        assert refused.value.status == 409 and "load it first" in refused.value.detail


def test_load_and_unload_need_the_api_key_and_one_model_at_most_keeps_the_default(store):
    key = {"X-API-Key": "s3cret"}
    with (
        start_server(
            store.parent / "keyed.log", model_store=str(store), api_key="s3cret", max_models="1", **FAST
        ) as running,
        httpx.Client(base_url=running.url, timeout=120) as http,
    ):
        for path in (f"/models/{V2}/load", f"/models/{V2}/unload"):
            refused = http.post(path)
            assert refused.status_code == 401
            assert refused.json()["detail"] == "missing or wrong API key: send it in the X-API-Key header"
        assert http.get("/models").status_code == 401 and http.get(f"/models/{V2}").status_code == 401
        full = http.post(f"/models/{V2}/load", headers=key)
        assert (full.status_code, full.json()["detail"]) == (
            409,
            (
                f"cannot load {V2}: at most 1 model(s) may be loaded (CELLSEG_MAX_MODELS) and the default model "
                f"{DEFAULT} is never unloaded"
            ),
        )
        assert http.post(f"/models/{V2}/unload", headers=key).status_code == 404


def test_several_workers_load_and_unload_together(store):
    """A load or unload reaches one worker; the others follow before their next request for that version."""
    with start_server(store.parent / "workers.log", model_store=str(store), workers="2", **FAST) as running:
        url = running.url

        def every_worker_shows(predicate, timeout: float = 60) -> dict[int, list[str]]:
            seen: dict[int, list[str]] = {}
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                models = httpx.get(f"{url}/models", timeout=30).json()  # a new connection each: any worker
                seen[models["worker"]] = [m["version"] for m in models["loaded"] if m["ready"]]
                if len(seen) == 2 and all(predicate(versions) for versions in seen.values()):
                    return seen
                time.sleep(0.05)
            raise AssertionError(f"the workers did not agree in {timeout} s: {seen}")

        every_worker_shows(lambda versions: versions == [DEFAULT])
        assert httpx.post(f"{url}/models/{V2}/load", timeout=120).status_code == 200
        answers = [
            httpx.post(f"{url}/segment", params={"model": V2}, files={"file": IMAGE}, timeout=120) for _ in range(8)
        ]
        assert [a.status_code for a in answers] == [200] * 8
        assert {a.json()["model_version"] for a in answers} == {V2}
        every_worker_shows(lambda versions: versions == [DEFAULT, V2])
        assert httpx.post(f"{url}/models/{V2}/unload", timeout=120).status_code == 200
        every_worker_shows(lambda versions: versions == [DEFAULT])
        answers = [
            httpx.post(f"{url}/segment", params={"model": V2}, files={"file": IMAGE}, timeout=120) for _ in range(4)
        ]
        assert [a.status_code for a in answers] == [409] * 4
