"""The Docker image, built and run: what `.ci/docker` checks after it has started an engine and built the image.

Runs only with CELLSEG_DOCKER=1 and a Docker engine (`bash ../shared/tools/docker-engine start`), on the image the
compose file's CPU services name (cellseg:cpu, built by `.ci/docker`). Every container runs as compose would run
that service (its image, environment, volumes, entrypoint and command, read from `docker-compose config`), but on
the host's network: the engines on these machines have no bridge network, so the proxy reaches the service as
api -> 127.0.0.1 and the service listens on the host's port 8000, the proxy on 8080.

The tests run in file order and share the containers; each is one step of the check and says what failed. The
figures (times, sizes) go to CELLSEG_DOCKER_REPORT as JSON when it is set.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app.bench.localserver import running_server
from app.ml.scoring.metric import iou_matrix
from app.samples import path as sample_path
from tests.api.test_segment import decode_cells
from tests.conftest import MODEL_STORE, REPO, SARTORIUS, SHARED_DATA, shared_folder, shared_lab_folder

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(
        os.environ.get("CELLSEG_DOCKER") != "1",
        reason="the image's tests need a Docker engine and the built image: `bash .ci/docker` runs them",
    ),
]

API, PROXY = "http://127.0.0.1:8000", "http://127.0.0.1:8080"
PREFIX = "cellseg-ci-"
SAMPLE = sample_path("cells.png")
FIGURES: dict[str, Any] = {}
VERSION = "ci-u373"  # the model train writes in the image


def docker(*args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        pytest.fail(f"docker {' '.join(args)[:300]} exited with {done.returncode}: {done.stderr[-2000:]}")
    return done


def record(**figures: Any) -> None:
    FIGURES.update(figures)
    if report := os.environ.get("CELLSEG_DOCKER_REPORT"):
        Path(report).write_text(json.dumps(FIGURES, indent=2))


@pytest.fixture(scope="module")
def services() -> dict[str, dict]:
    """The compose file's services, with its variables and paths resolved, as docker-compose reads them."""
    done = subprocess.run(
        ["docker-compose", "-f", str(REPO / "docker-compose.yml"), "--profile", "cpu", "--profile", "train", "config"],
        capture_output=True, text=True, check=True, cwd=REPO,
    )  # fmt: skip
    return yaml.safe_load(done.stdout)["services"]


@pytest.fixture(scope="module")
def image(services: dict[str, dict]) -> str:
    name = services["api-cpu"]["image"]
    if docker("image", "inspect", name, check=False).returncode != 0:
        pytest.fail(f"no image {name}: build it first (`bash .ci/docker` does)")
    return name


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the project's model_store, as a host folder mounted at /app/model_store: owned by the host's user
    (here the one running the tests), as a fresh clone's model_store is."""
    folder = tmp_path_factory.mktemp("store") / "model_store"
    shutil.copytree(MODEL_STORE, folder, ignore=shutil.ignore_patterns("last.pt", "*.tmp"))
    folder.chmod(0o755)
    return folder


def run_arguments(service: dict, store: Path, name: str) -> list[str]:
    """`docker run` arguments that run a compose service as compose would, on the host's network: its image,
    environment, volumes (./model_store -> `store`, ./data -> the shared data), shm size, entrypoint and command."""
    arguments = ["--name", PREFIX + name, "--network", "host"]
    for key, value in service.get("environment", {}).items():
        arguments += ["--env", f"{key}={value}"]
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        source = {str(REPO / "model_store"): str(store), str(REPO / "data"): str(SHARED_DATA)}.get(source, source)
        arguments += ["--volume", ":".join([source, target, *mode])]
    if "shm_size" in service:
        arguments += ["--shm-size", service["shm_size"]]
    entrypoint = service.get("entrypoint", [])
    if entrypoint:
        arguments += ["--entrypoint", entrypoint[0]]
    return [*arguments, service["image"], *entrypoint[1:], *service.get("command", [])]


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def logs(name: str) -> list[str]:
    """The container's output, stdout and stderr interleaved as written."""
    done = subprocess.run(["docker", "logs", PREFIX + name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=60, check=True)  # fmt: skip
    return done.stdout.splitlines()


def remove(name: str) -> None:
    docker("rm", "--force", PREFIX + name, check=False)


def health(name: str) -> str:
    return docker("inspect", "--format", "{{.State.Health.Status}}", PREFIX + name).stdout.strip()


def status_of(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


@pytest.fixture(scope="module")
def api(services: dict[str, dict], image: str, store: Path) -> Iterator[dict[str, Any]]:
    """compose's api-cpu, started here: yields when its container runs, with what the health poll needs."""
    assert port_free(8000), "port 8000 is taken on this machine: the container serves on the host's network there"
    remove("api")
    started = time.monotonic()
    docker("run", "--detach", *run_arguments(services["api-cpu"], store, "api"))
    try:
        yield {"name": "api", "started": started}
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            (store.parent / "api.log").write_text("\n".join(logs("api")))
        remove("api")


@pytest.fixture(scope="module")
def ready_api(api: dict[str, Any]) -> dict[str, Any]:
    """The api once it is healthy: polls /health, /ready and Docker's health state every 0.5 s from its start."""
    seen: list[tuple[float, int, int, str]] = []
    deadline = api["started"] + 300
    while time.monotonic() < deadline:
        state = health("api")
        seen.append((time.monotonic() - api["started"], status_of(API + "/health"), status_of(API + "/ready"), state))
        if state == "healthy":
            break
        assert state == "starting", f"the container's health went {state!r} before it was healthy: {seen[-5:]}"
        time.sleep(0.5)
    else:
        pytest.fail(f"not healthy within 300 s; the last polls (s, /health, /ready, health): {seen[-5:]}")
    api["seen"] = seen
    return api


def test_the_image_holds_the_installed_package_and_the_model_store_only(image: str):
    script = (
        "ls -A /app; echo ---; "
        "python -c 'import app, app.samples; print(app.__file__); print(app.samples.path())'; echo ---; "
        "find / -xdev -name 'cellseg*.egg-info' 2>/dev/null; echo ---; "
        "python -c 'import torch; print(torch.__version__)'"
    )
    listing, package, egg_info, torch_version = docker("run", "--rm", image, "sh", "-c", script).stdout.split("---\n")
    assert listing.split() == ["model_store"], f"/app should hold the model store alone: {listing.split()}"
    assert "-packages/app/__init__.py" in package, f"the package is not the installed one: {package}"
    assert package.split()[1].endswith("-packages/app/samples/cells.png")
    assert not egg_info.split(), f"the package's egg-info left in the image: {egg_info.split()}"
    label = json.loads(docker("image", "inspect", "--format", "{{json .Config.Labels}}", image).stdout)
    version, variant = label["cellseg.torch"].split()
    assert variant == "cpu" and torch_version.strip() == f"{version}+cpu", "the CPU variant has PyTorch's CPU build"
    size = int(docker("image", "inspect", "--format", "{{.Size}}", image).stdout)
    record(image=image, image_bytes=size, torch=torch_version.strip())


def test_the_container_runs_as_uid_10001_not_root(image: str):
    assert docker("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip() == "10001"
    assert docker("run", "--rm", image, "id", "-u").stdout.strip() == "10001"


# Every console script with only the arguments it requires (serve and train run in the steps below), and the
# settings each runs with besides its defaults.
ENTRYPOINTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "evaluate": (["evaluate", "--data", "/data/sartorius"], {}),
    # tune chooses again on the model's own validation images: sartorius-w16-v1's are in /data/sartorius (the
    # default model's are 11 of the 43 reconstructed images, minutes on 2 cores). It writes into the image's copy.
    "tune": (["tune", "--model", "model_store/sartorius-w16-v1", "--data", "/data/sartorius"], {}),
    "predict": (["predict", "--images", "/data/sartorius/test"], {}),
    "synth": (["synth", "--out", "/tmp/synth"], {}),
    # The soak posts bench's default image, the sample shipped in the package; a few seconds of it, uncompiled
    # (the whole bench takes minutes, and the served container runs compiled below).
    "bench": (["bench", "--soak", "0.1"], {"CELLSEG_COMPILE": "false"}),
}


def test_every_console_script_is_checked_in_the_image():
    from tests.test_packaging import SCRIPTS  # noqa: PLC0415 - the installed package's console scripts

    assert {"serve", "train", *ENTRYPOINTS} == SCRIPTS


@pytest.mark.parametrize("name", list(ENTRYPOINTS))
def test_each_entrypoint_runs_with_its_defaults_in_the_image(image: str, name: str):
    shared_folder(SARTORIUS)
    command, environment = ENTRYPOINTS[name]
    settings = [f"--env={key}={value}" for key, value in environment.items()]
    started = time.monotonic()
    done = docker("run", "--rm", "--network", "host", "--volume", f"{SHARED_DATA}:/data:ro", *settings, image,
                  *command, check=False)  # fmt: skip
    assert done.returncode == 0, f"{name} exited with {done.returncode}: {done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    record(**{f"{name}_s": round(time.monotonic() - started, 1)})


def test_the_container_is_healthy_only_once_the_service_is_ready(ready_api: dict[str, Any]):
    seen = ready_api["seen"]
    alive = next(t for t, live, _, _ in seen if live == 200)
    ready = next((t for t, _, rdy, _ in seen if rdy == 200), None)
    healthy = seen[-1][0]
    assert ready is not None, "healthy before /ready ever answered 200: the healthcheck is not readiness"
    # Docker's health check runs every 10 s: healthy follows readiness by at most that (and the check's own time).
    assert ready <= healthy <= ready + 16, f"ready at {ready:.1f} s, healthy at {healthy:.1f} s"
    warming = [rdy for _, _, rdy, state in seen if state == "starting" and rdy != 0]
    assert 503 in warming, "/ready never answered 503 while warming up: the poll started too late to tell"
    record(health_s=round(alive, 1), ready_s=round(ready, 1), healthy_s=round(healthy, 1))


def test_the_service_runs_as_uid_10001_and_logs_json_lines(ready_api: dict[str, Any]):
    assert docker("exec", PREFIX + "api", "id", "-u").stdout.strip() == "10001"
    lines = logs("api")
    assert lines
    for line in lines:
        entry = json.loads(line)  # every line, the warm-up's included
        assert {"time", "level", "message"} <= entry.keys()


def same_cells(served: dict, reference: dict) -> str:
    """'identical' when every RLE is the same, else 'IoU >= 0.99': the same count and each cell matched by one at
    IoU 0.99 or more (float rounding may move a pixel on another CPU or precision)."""
    assert served["cell_count"] == len(served["cells"]) > 0
    if [c["rle"] for c in served["cells"]] == [c["rle"] for c in reference["cells"]]:
        return "identical"
    assert served["cell_count"] == reference["cell_count"], (served["cell_count"], reference["cell_count"])
    iou = iou_matrix(decode_cells(reference), decode_cells(served))[1:, 1:]
    worst = float(iou.max(axis=1).min())
    assert worst >= 0.99, f"a cell matched at IoU {worst:.3f} only"
    return "IoU >= 0.99"


def post(url: str, image: Path, **params: str) -> httpx.Response:
    with image.open("rb") as file:
        return httpx.post(f"{url}/segment", params=params, files={"file": (image.name, file)}, timeout=120)


@pytest.fixture(scope="module")
def container_answer(ready_api: dict[str, Any]) -> dict:
    answer = post(API, SAMPLE)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_the_container_finds_the_cells_the_venv_finds_in_a_real_image(container_answer: dict, tmp_path: Path):
    with running_server(tmp_path / "venv-serve.log", timeout=300, model_store=str(MODEL_STORE)) as server:
        venv = post(server.url, SAMPLE)
    assert venv.status_code == 200, venv.text
    for key in ("model_version", "cell_type", "mode", "width", "height"):
        assert container_answer[key] == venv.json()[key], key
    record(cells=container_answer["cell_count"], same_cells=same_cells(container_answer, venv.json()))


@pytest.fixture(scope="module")
def proxy(services: dict[str, dict], ready_api: dict[str, Any], store: Path) -> Iterator[str]:
    """compose's proxy-cpu: its nginx image and the config it mounts, in front of the running api."""
    assert port_free(8080), "port 8080 is taken on this machine: the proxy listens on the host's network there"
    service = services["proxy-cpu"]
    assert service["depends_on"] == {"api-cpu": {"condition": "service_healthy"}}
    remove("proxy")
    docker("run", "--detach", "--add-host", "api:127.0.0.1", *run_arguments(service, store, "proxy"))
    try:
        deadline = time.monotonic() + 30
        while status_of(PROXY + "/ready") != 200:
            assert time.monotonic() < deadline, "\n".join(logs("proxy")[-20:])
            time.sleep(0.3)
        yield PROXY
    finally:
        remove("proxy")


def test_the_proxy_passes_requests_and_request_ids(proxy: str, container_answer: dict):
    request_id = f"ci-{uuid.uuid4().hex[:12]}"
    with SAMPLE.open("rb") as file:
        answer = httpx.post(f"{proxy}/segment", files={"file": (SAMPLE.name, file)}, headers={"X-Request-ID":
                            request_id}, timeout=120)  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Request-ID"] == request_id
    assert same_cells(answer.json(), container_answer) == "identical"
    time.sleep(0.5)  # nginx writes its access line once the answer is sent
    nginx = [json.loads(line) for line in logs("proxy") if line.startswith("{")]
    assert any(line["request_id"] == request_id and line["status"] == 200 for line in nginx), nginx[-3:]
    assert any(f'"request_id": "{request_id}"' in line for line in logs("api"))


def test_the_proxy_refuses_an_upload_over_the_limit_with_its_json_413(proxy: str):
    body = b"\0" * (50 * 1024 * 1024 + 1024)
    answer = httpx.post(f"{proxy}/segment", files={"file": ("big.png", body)}, timeout=60)
    assert answer.status_code == 413
    assert "larger than the limit of 52,428,800 bytes" in answer.json()["detail"]
    assert answer.headers["X-Request-ID"]


def train_arguments(services: dict[str, dict], store: Path) -> list[str]:
    """compose's train-cpu with a short fine-tune of the bundled model on a lab's real cells (CTC layout)."""
    shared_lab_folder(SHARED_DATA / "lab-u373")
    return [
        *run_arguments(services["train-cpu"], store, "train")[:-1],  # without compose's --help
        "--init", "model_store/sartorius-w16-v3", "--data", "/data/lab-u373", "--version", VERSION,
        "--epochs", "1", "--epoch-size", "16", "--folds", "2",
    ]  # fmt: skip


def test_train_says_in_one_line_what_to_run_when_it_cannot_write_the_store(
    services: dict[str, dict], image: str, store: Path
):
    remove("train")
    # The store belongs to the host's user (uid 0 here, as CI runs), not to the image's uid 10001.
    assert store.stat().st_uid != 10001
    done = docker("run", "--rm", *train_arguments(services, store), check=False)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "cannot write to /app/model_store" in lines[0] and "sudo chown -R 10001 model_store" in lines[0]


def test_train_in_the_image_writes_a_model_into_the_mounted_store(services: dict[str, dict], image: str, store: Path):
    # What the line above says to run, from a container so it works for any host user.
    docker("run", "--rm", "--user", "0", "--volume", f"{store}:/store", image, "chown", "-R", "10001:10001", "/store")
    remove("train")
    started = time.monotonic()
    done = docker("run", "--rm", *train_arguments(services, store), check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["version"] == VERSION
    card = json.loads((store / VERSION / "model.json").read_text())
    assert (store / VERSION / card["weights"]["file"]).stat().st_uid == 10001
    record(train_s=round(time.monotonic() - started, 1), train_seg=summary["seg"])


def test_the_running_service_serves_the_model_trained_in_the_image(ready_api: dict[str, Any], proxy: str):
    frame = shared_lab_folder(SHARED_DATA / "lab-u373") / "02" / "t010.tif"
    started = time.monotonic()
    loaded = httpx.post(f"{proxy}/models/{VERSION}/load", timeout=300)
    assert loaded.status_code == 200, loaded.text
    record(load_s=round(time.monotonic() - started, 1))
    answer = post(proxy, frame, model=VERSION)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == VERSION and answer.json()["cell_count"] > 0


def test_docker_stop_ends_the_service_cleanly(ready_api: dict[str, Any]):
    name = PREFIX + "api"
    started = time.monotonic()
    docker("stop", name)  # SIGTERM, then SIGKILL after 10 s
    stopped = time.monotonic() - started
    state = json.loads(docker("inspect", "--format", "{{json .State}}", name).stdout)
    assert state["ExitCode"] == 0 and not state["OOMKilled"], state
    assert stopped < 9, f"docker stop took {stopped:.1f} s: the service did not stop on SIGTERM"
    assert json.loads(logs("api")[-1])["message"].startswith("Finished server process")
    record(stop_s=round(stopped, 1))
