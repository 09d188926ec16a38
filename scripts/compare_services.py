"""Two checkouts' services alternately on this machine, throughput at concurrency 1 and 16: the A/B behind
docs/performance.md's "no slower than before" table. Each round starts each service afresh (`python -m app.serve`
from its checkout, the same model store), warms it with 15 requests, then times 30 requests at concurrency 1 and 48
at 16 with bench's own client.

    git worktree add /tmp/before <commit>
    python scripts/compare_services.py --before /tmp/before --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path

from app.bench.cli import DEFAULT_IMAGE
from app.bench.loadgen import post_many
from app.bench.localserver import running_server

REPO = Path(__file__).resolve().parents[1]


def images_per_s(checkout: Path, image: bytes, model_store: Path) -> dict[int, float]:
    os.chdir(checkout)  # the server runs `python -m app.serve` from the working directory's code
    settings = {"model_store": str(model_store), "log_level": "WARNING"}
    with running_server(**settings) as server:
        asyncio.run(post_many(server.url, image, 15, 1, {}))
        figures = {}
        for concurrency, count in ((1, 30), (16, 48)):
            records, wall = asyncio.run(post_many(server.url, image, count, concurrency, {}))
            figures[concurrency] = round(sum(r["status"] == 200 for r in records) / wall, 3)
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="the other checkout (a git worktree)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    args = parser.parse_args()
    image, store = args.image.read_bytes(), REPO / "model_store"
    results: dict[str, list] = {"before": [], "now": []}
    for round_ in range(args.rounds):
        for name, checkout in (("before", args.before.resolve()), ("now", REPO)):
            results[name].append(images_per_s(checkout, image, store))
            print(name, round_ + 1, results[name][-1], flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
