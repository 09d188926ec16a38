"""`predict --cluster` on a real Ray cluster of several nodes on this machine (ray.cluster_utils.Cluster: a raylet
and its workers per node): the same cells as `predict`, a node SIGKILLed mid-run, a rerun doing only what is left,
failing images recorded. Skipped without Ray (`pip install '.[cluster]'`)."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.cluster.storage import ROWS_SUFFIX, Location, done_ids, image_names
from app.ml.imageio import MAX_PIXELS
from app.ml.options import InferenceOptions, Mode
from app.predict import main as predict
from tests.conftest import MODEL_STORE, REPO

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="Ray is not installed: pip install '.[cluster]'"
)
NODE = {"num_cpus": 1, "object_store_memory": 200 * 2**20}  # small nodes: 2 cores are shared with other work
# A killed node is declared dead within about 2 s instead of Ray's default 15 or more.
FAST_HEALTH_CHECK = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}
COMMON = ["--model-store", str(MODEL_STORE), "--no-compile"]  # the bundled default model, as a user runs it


def read_csv(path: Path) -> list[tuple[str, str]]:
    with path.open() as handle:
        return sorted((row["id"], row["predicted"]) for row in csv.DictReader(handle))


def cluster_run(images: Path | str, out_dir: Path, address: str, *extra: str) -> int:
    """predict --cluster as a user runs it; its exit code."""
    try:
        predict([*COMMON, "--images", str(images), "--out-dir", str(out_dir), "--out", str(out_dir / "all.csv"),
                 "--cluster", address, *extra])  # fmt: skip
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    """A head and one worker node of 1 CPU each, this process their driver; shut down after the module."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install '.[cluster]'")
    from ray.cluster_utils import Cluster  # noqa: PLC0415 - only with Ray installed

    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "_system_config": FAST_HEALTH_CHECK})
    cluster.add_node(**NODE)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def plate(sartorius: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four real 520x704 competition images (the three test images and one training image)."""
    folder = tmp_path_factory.mktemp("plate")
    for path in sorted((sartorius / "test").glob("*.png")):
        shutil.copy(path, folder)
    shutil.copy(next(iter(sorted((sartorius / "train").glob("*.png")))), folder / "train0.png")
    return folder


def test_predict_without_ray_names_the_extra_and_the_single_process_path_imports_no_ray(tmp_path):
    code = (
        "import sys; sys.modules['ray'] = None\n"  # as if Ray were not installed
        "import app.main, app.predict\n"
        "app.predict.main(['--images', '.', '--cluster', 'auto'])"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1
    assert "predict: --cluster needs Ray, an optional extra: pip install '.[cluster]'" in done.stderr
    clean = "import sys, app.main, app.predict; assert 'ray' not in sys.modules, 'Ray imported'"
    subprocess.run([sys.executable, "-c", clean], cwd=REPO, check=True)


def test_locations_write_whole_files_and_know_the_images_done_on_any_filesystem(tmp_path):
    for url in (str(tmp_path / "local"), f"file://{tmp_path}/as-url", "memory://cellseg-test/dest"):
        dest = Location.of(url)
        assert dest.names() == [] and done_ids(dest) == set()
        dest.write(f"a{ROWS_SUFFIX}", b"a,1 2\n")
        dest.write("a.geojson", b"{}")
        dest.write("b.PNG", b"png")
        assert done_ids(dest) == {"a"}
        assert image_names(dest) == {"b": "b.PNG"}
        assert dest.read(f"a{ROWS_SUFFIX}") == b"a,1 2\n"
        assert not [n for n in dest.names() if n.endswith(".tmp")], "no temp file left behind"


@needs_ray
def test_a_cluster_run_finds_the_cells_predict_finds_and_records_the_images_it_cannot_read(cluster, plate, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(plate, images)
    (images / "broken.png").write_bytes(b"not a png at all")
    side = int(np.sqrt(MAX_PIXELS)) + 1  # over the pixel limit: refused from its header, before decoding
    Image.fromarray(np.zeros((side, side), np.uint8)).save(images / "huge.png")

    with pytest.raises(SystemExit) as single_exit:
        predict([*COMMON, "--images", str(images), "--out", str(tmp_path / "single.csv"),
                 "--formats", "tiff", "geojson", "--out-dir", str(tmp_path / "single")])  # fmt: skip
    assert single_exit.value.code == 1
    started = time.monotonic()
    out = tmp_path / "cluster"
    code = cluster_run(f"file://{images}", out, cluster.address, "--formats", "tiff", "geojson")
    print(f"cluster run of 6 images: {time.monotonic() - started:.1f} s")

    assert code == 1, "failed images make the exit code say so, as predict's skipped files do"
    single = read_csv(tmp_path / "single.csv")
    assert read_csv(out / "all.csv") == single and len(single) > 4 * 20, "the same cells, row for row"
    good = sorted(p.stem for p in plate.glob("*.png"))
    for stem in good:  # the lab files are byte for byte those predict writes
        for name in (f"{stem}-labels.tif", f"{stem}.geojson"):
            assert (out / name).read_bytes() == (tmp_path / "single" / name).read_bytes()
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["id"] for f in failures] == ["broken", "huge"]
    assert "InvalidImageError" in failures[0]["reason"] or "UnsupportedImageError" in failures[0]["reason"]
    assert "ImageTooLargeError" in failures[1]["reason"]
    assert done_ids(Location.of(str(out))) == set(good)


@needs_ray
def test_decoding_runs_in_cpu_tasks_beside_the_network_actors_not_fused_into_them(cluster, plate, capsys):
    import ray  # noqa: PLC0415 - only with Ray installed

    from app.cluster.run import pipeline  # noqa: PLC0415
    from app.cluster.stages import RunSpec  # noqa: PLC0415

    where = Location.of(str(plate))
    spec = RunSpec(ray.put(None), InferenceOptions(), Mode.AUTO, (), where, where)  # planned only, never run
    pipeline(spec, [("a", "a.png"), ("b", "b.png")], batch_size=2).explain()
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "TaskPoolMapOperator[MapBatches(finish)]" in optimized
    assert "ActorPoolMapOperator[MapBatches(Network)]" in optimized
    assert "TaskPoolMapOperator[MapBatches(decode)]" in optimized


@needs_ray
def test_a_rerun_does_only_the_images_left(cluster, plate, tmp_path, capsys):
    out = tmp_path / "out"
    assert cluster_run(plate, out, cluster.address, "--formats", "tiff") == 0
    first = read_csv(out / "all.csv")
    redo = sorted(p.stem for p in plate.glob("*.png"))[:2]
    for stem in redo:  # as if the run had stopped before these
        (out / f"{stem}{ROWS_SUFFIX}").unlink()
        (out / f"{stem}-labels.tif").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith(tuple(redo))}
    capsys.readouterr()

    assert cluster_run(plate, out, cluster.address, "--formats", "tiff") == 0
    printed = capsys.readouterr().out
    assert "2 images done" in printed and f"{len(kept_ids(plate)) - 2} done before" in printed
    assert {name: (out / name).stat().st_mtime_ns for name in kept if name != "all.csv"} == {
        name: mtime for name, mtime in kept.items() if name != "all.csv"
    }, "the images done before are not written again"
    assert all((out / f"{stem}-labels.tif").is_file() for stem in redo)
    assert read_csv(out / "all.csv") == first


def kept_ids(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.png"))


def network_actor_nodes() -> set[str]:
    """The node ids of the Network actors alive now, from the cluster's own table of actors."""
    from ray._private import state  # noqa: PLC0415 - the GCS's actor table, without the dashboard

    actors = state.actors().values()
    return {a["Address"]["NodeID"] for a in actors if "Network" in a["ActorClassName"] and a["State"] == "ALIVE"}


@needs_ray
def test_a_node_killed_mid_run_leaves_every_image_done_exactly_once(cluster, plate, tmp_path, reconstructed, capsys):
    images = tmp_path / "images"
    shutil.copytree(plate, images)
    for path in sorted((reconstructed / "train").glob("*.png"))[:6]:
        shutil.copy(path, images)
    total = len(list(images.glob("*.png")))
    extra = [cluster.add_node(**NODE) for _ in range(2)]  # 4 CPUs: 2 network actors, so one can be lost
    cluster.wait_for_nodes()
    out = tmp_path / "out"
    result: dict[str, int] = {}
    options = ["--batch-size", "2", "--merge-images"]  # network passes across images: the GPU path
    run = threading.Thread(target=lambda: result.update(code=cluster_run(images, out, cluster.address, *options)))
    started = time.monotonic()
    run.start()
    try:
        # Once some images are done, kill a worker node that holds a network actor (the head holds the driver).
        workers = {node.node_id: node for node in cluster.worker_nodes}
        while not (any(out.glob(f"*{ROWS_SUFFIX}")) and network_actor_nodes() & workers.keys()) and run.is_alive():
            time.sleep(0.1)
        victim = workers[sorted(network_actor_nodes() & workers.keys())[0]]
        done_at_kill = len(done_ids(Location.of(str(out))))
        cluster.remove_node(victim, allow_graceful=False)  # SIGKILL: raylet, object store, workers
    finally:
        run.join(timeout=300)
    print(f"killed a network actor's node with {done_at_kill} of {total} done; run {time.monotonic() - started:.1f} s")
    del extra

    assert not run.is_alive() and result["code"] == 0
    assert 0 < done_at_kill < total, "the node died in the middle of the run"
    assert f"{total} images done" in capsys.readouterr().out, "each image counted once, none twice"
    rows = read_csv(out / "all.csv")
    ids = sorted({image_id for image_id, _ in rows})
    assert ids == sorted(p.stem for p in images.glob("*.png"))
    assert len(rows) == len(set(rows)), "no image's rows twice"
    assert done_ids(Location.of(str(out))) == set(ids)
    assert sum(1 for _ in io.StringIO((out / "all.csv").read_text())) == len(rows) + 1
