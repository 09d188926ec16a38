"""Throughput of `predict --cluster` on a local Ray cluster of 1 and 2 worker nodes, beside `predict` in one
process on the same images (docs/scale.md quotes it).

Each cluster runs on this machine (ray.cluster_utils.Cluster): a head that only coordinates (0 CPUs: the driver and
Ray's own processes) and N worker nodes of --cpus-per-node CPUs each; every run segments the same images into a
fresh folder with the bundled default model, uncompiled unless --compile (compiling alone takes minutes on 2 cores).
Writes, as JSON: images/s over the whole run and the pipeline's (first network batch to last image written, without
connecting, loading the model and starting the actors), start-up, and the seconds per image of each
stage (decode: read, decode and cut into network inputs; network: its share of the actor's batch; finish: the
instance step and the files written), with the machine's load average before and after.

Example: .venv/bin/python scripts/cluster_bench.py --nodes 1 2 --out docs/bench-cluster.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def one_process(images: Path, compile_network: bool) -> dict:
    """`predict` as a user runs it, timed from the command to its exit (start-up included)."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "app.predict", "--images", str(images), "--out", f"{out}/s.csv"]
        command += [] if compile_network else ["--no-compile"]
        started = time.perf_counter()
        subprocess.run(command, cwd=REPO, check=True, capture_output=True)
        seconds = time.perf_counter() - started
    count = sum(1 for p in images.iterdir() if p.suffix.lower() == ".png")
    return {"seconds": round(seconds, 2), "images_per_s": round(count / seconds, 3)}


def on_cluster(images: Path, nodes: int, cpus: int, store_mb: int, compile_network: bool) -> dict:
    import ray  # noqa: PLC0415 - the cluster extra, only for this part
    from ray.cluster_utils import Cluster  # noqa: PLC0415

    from app.cluster.run import ClusterJob, run  # noqa: PLC0415
    from app.ml.checkpoint import resolve_model_folder  # noqa: PLC0415
    from app.ml.options import InferenceOptions  # noqa: PLC0415

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": store_mb << 20})
    for _ in range(nodes):
        cluster.add_node(num_cpus=cpus, object_store_memory=store_mb << 20)
    cluster.wait_for_nodes()
    try:
        with tempfile.TemporaryDirectory() as out:
            job = ClusterJob(
                str(images),
                out,
                f"{out}/all.csv",
                resolve_model_folder(REPO / "model_store"),
                InferenceOptions(compile=compile_network),
            )
            started = time.time()
            report = run(cluster.address, job)
    finally:
        ray.shutdown()
        cluster.shutdown()
    done = len(report.done)
    return {
        "worker_nodes": nodes,
        "cpus_per_node": cpus,
        "network_actors": max(1, nodes * cpus // 2),  # app.cluster.run: half the CPUs, the rest decode and finish
        "images": done,
        "failed": len(report.failures),
        "seconds": round(report.seconds, 2),
        "images_per_s": round(report.rate, 3),
        "pipeline_images_per_s": round(report.pipeline_rate, 3),
        "start_up_s": round(report.network_from - started, 2),
        "per_image_s": {stage: round(s / done, 4) for stage, s in report.stage_seconds.items()},
        "report": {k: v for k, v in asdict(report).items() if k not in ("done", "failures")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(REPO.parent / "shared/data/sartorius-reconstructed/train"))
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2], help="worker nodes per cluster, one run each")
    parser.add_argument("--cpus-per-node", type=int, default=2)
    parser.add_argument("--object-store-mb", type=int, default=300)
    parser.add_argument("--compile", action="store_true", help="torch.compile the network in each actor")
    parser.add_argument("--out", default="bench-cluster.json")
    args = parser.parse_args()
    images = Path(args.images)
    figures = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "load_average_before": os.getloadavg(),
        "command": "python scripts/cluster_bench.py " + " ".join(sys.argv[1:]),
        "one_process": one_process(images, args.compile),
        "clusters": [],
    }
    for nodes in args.nodes:
        figures["clusters"].append(on_cluster(images, nodes, args.cpus_per_node, args.object_store_mb, args.compile))
        print(json.dumps(figures["clusters"][-1]), flush=True)
    figures["load_average_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps({k: v for k, v in figures.items() if k != "clusters"}, indent=2))


if __name__ == "__main__":
    main()
