"""Sample images shipped with the package, so every entrypoint and the README's first request have a real image to
work on without the project's data folder: `cells.png` is a real competition test image (README.md beside it).

    curl -F file=@"$(python -m app.samples)" http://localhost:8000/segment
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def path(name: str = "cells.png") -> Path:
    """The sample `name` as a file on disk (the package is installed as files, never zipped)."""
    found = FOLDER / name
    if not found.is_file():
        samples = sorted(p.name for p in FOLDER.iterdir() if p.suffix == ".png")
        raise FileNotFoundError(f"no sample {name!r} in {FOLDER}; the samples are {samples}")
    return found
