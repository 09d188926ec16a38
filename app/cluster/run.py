"""The driver of `predict --cluster`: connect, find what is left to do, stream it through the stages
(app.cluster.stages) with a progress bar, then gather the Kaggle CSV and the failures.

The driver holds only file names and one small result row per image: images and network outputs live in the
cluster's object store while Ray Data streams them, so a campaign of any size runs in bounded memory.
"""

from __future__ import annotations

import json
import posixpath
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import ray
import ray.data
from tqdm import tqdm

from app.cluster.stages import STAGES, Network, RunSpec, decode, finish
from app.cluster.storage import FAILURES, ROWS_SUFFIX, Location, done_ids, image_names
from app.ml.checkpoint import load_checkpoint
from app.ml.errors import CellSegError
from app.ml.imageio import IMAGE_SUFFIXES
from app.ml.options import InferenceOptions, Mode
from app.ml.outputs import OutputFormat, submission_csv

# The names are cut into at most this many blocks: enough to keep every node busy, few enough that a campaign of
# 10^5 images is not 10^5 objects to track (a block's images are still decoded one at a time, streaming).
MAX_BLOCKS = 1000
# An image's bytes, its float32 pixels, the network inputs, the two full-size maps and the labels, with room to spare.
TASK_BYTES_PER_PIXEL = 20


@dataclass(frozen=True)
class ClusterJob:
    """One `predict --cluster` run: what to segment, where to write, with which model and settings."""

    images: str  # folder or fsspec URL
    out_dir: str  # folder or fsspec URL: every image's files, its rows, failures.jsonl
    out: str  # the Kaggle CSV of every image done
    model: Path
    options: InferenceOptions
    mode: Mode = Mode.AUTO
    formats: tuple[OutputFormat, ...] = ()
    batch_size: int = 8  # images per call of a network actor
    merge_images: bool = False  # forward passes across those images (stages.Network)


@dataclass
class RunReport:
    """What a run found and did: images already done before it, done by it, failed (id -> reason), and the
    seconds each stage spent, summed over the images."""

    images: int = 0
    already_done: int = 0
    done: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    network_from: float = 0.0  # time.time() of the first network batch: the model loaded, the actors up
    finished_by: float = 0.0  # time.time() of the last image written

    @property
    def rate(self) -> float:
        """Images done per second of the whole run, start-up and the final CSV included."""
        return len(self.done) / self.seconds if self.seconds else 0.0

    @property
    def pipeline_rate(self) -> float:
        """Images done per second from the first network batch to the last image written: the pipeline's own
        throughput, without connecting, loading the model and starting the actors."""
        span = self.finished_by - self.network_from
        return len(self.done) / span if span > 0 else 0.0


def connect(address: str) -> bool:
    """Join the cluster at `address` (as ray.init takes it: auto, ray://HOST:PORT, HOST:PORT, local); True if this
    call connected (and the caller should disconnect), False when this process already was."""
    if ray.is_initialized():
        return False
    ray.init(address=address, log_to_driver=False)
    return True


def run(address: str, job: ClusterJob) -> RunReport:
    """Segment every image of job.images not yet done in job.out_dir on the cluster at `address`."""
    started = time.perf_counter()
    source, dest = Location.of(job.images), Location.of(job.out_dir)
    names = image_names(source)
    if not names:
        raise CellSegError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {job.images}")
    done = done_ids(dest) & names.keys()
    report = RunReport(images=len(names), already_done=len(done))
    todo = sorted(names.keys() - done)
    connected = connect(address)
    try:
        if todo:
            model = ray.put(load_checkpoint(job.model))
            spec = RunSpec(model, job.options, job.mode, job.formats, source, dest, merge_images=job.merge_images)
            results = pipeline(spec, [(image_id, names[image_id]) for image_id in todo], job.batch_size)
            collect(results.iter_rows(), len(todo), report)
    finally:
        if connected:
            ray.shutdown()
    write_failures(dest, report.failures)
    write_submission(dest, sorted(done_ids(dest) & names.keys()), job.out)
    report.seconds = time.perf_counter() - started
    return report


def pipeline(spec: RunSpec, todo: list[tuple[str, str]], batch_size: int) -> ray.data.Dataset:
    """decode (CPU tasks) -> Network (actors: one per GPU, or CPU actors) -> finish (CPU tasks), streamed.

    Ray Data's defaults are what a lost node needs: its tasks run again elsewhere (max_retries -1 for system
    failures; our own errors are caught per image, never retried), its actors restart (max_restarts -1) and their
    calls are retried (max_task_retries -1)."""
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver's own bar counts whole images
    items = [{"image_id": image_id, "name": name} for image_id, name in todo]
    # What a decode or finish task may hold at worst, reserved so a node runs no more than fit its memory. Asking
    # it also keeps Ray Data from fusing the decode into the network actors (it fuses a task step into the next
    # actor step when their remote arguments match): the decoding runs in CPU tasks beside the actors, not in them.
    tasks = {"num_cpus": 1, "memory": TASK_BYTES_PER_PIXEL * spec.limits.max_pixels}
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = gpus or max(1, int(ray.cluster_resources().get("CPU", 1)) // 2)  # the other CPUs decode and finish
    return (
        ray.data.from_items(items, override_num_blocks=min(len(items), MAX_BLOCKS))
        .map_batches(decode, fn_kwargs={"spec": spec}, batch_size=1, **tasks)
        .map_batches(
            Network,
            fn_constructor_kwargs={"spec": spec},
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=1 if gpus else 0,
            num_cpus=1,
        )
        .map_batches(finish, fn_kwargs={"spec": spec}, batch_size=1, **tasks)
    )


def collect(rows: Iterable[dict], total: int, report: RunReport) -> None:
    """Count each image's result as it streams in, on a progress bar of images done and their rate."""
    with tqdm(total=total, desc="predict --cluster", unit="img") as bar:
        for row in rows:
            image_id, error = str(row["image_id"]), str(row["error"])
            if error:
                report.failures[image_id] = f"{row['name']}: {error}"
            else:
                report.done.append(image_id)
                started = float(row["network_at"])
                report.network_from = min(report.network_from or started, started)
                report.finished_by = max(report.finished_by, float(row["finished_at"]))
            for stage in STAGES:
                report.stage_seconds[stage] += float(row[f"{stage}_s"])
            bar.update()


def write_failures(dest: Location, failures: dict[str, str]) -> None:
    """failures.jsonl in the destination: one line per image this run could not do, with its reason; none left
    behind when every image was done."""
    if not failures:
        dest.remove(FAILURES)
        return
    lines = [json.dumps({"id": image_id, "reason": reason}) for image_id, reason in sorted(failures.items())]
    dest.write(FAILURES, ("\n".join(lines) + "\n").encode())


def write_submission(dest: Location, image_ids: list[str], out: str) -> None:
    """One Kaggle CSV of every image done, by this run or an earlier one, in image id order."""
    paths = [dest.path(f"{image_id}{ROWS_SUFFIX}") for image_id in image_ids]
    parts = dest.fs.cat(paths) if paths else {}
    body = b"".join(parts[path] for path in paths)
    folder, name = posixpath.split(out)
    Location.of(folder or ".").write(name, submission_csv([]) + body)
