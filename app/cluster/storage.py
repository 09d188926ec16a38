"""Where a cluster run reads its images and writes its files: folders or fsspec URLs (s3://, gs://, file://, local
paths), so every node of the cluster reaches the same places.

A finished image is one whose Kaggle rows file (`<id>-kaggle.csv`) is in the destination: it is written last, after
the image's other files, and every write is whole or absent, so a run stopped at any point and started again redoes
exactly the images that have no rows file.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from app.ml.checkpoint import atomic_write_bytes
from app.ml.imageio import IMAGE_SUFFIXES

ROWS_SUFFIX = "-kaggle.csv"  # one image's Kaggle rows, without the header: the mark that it is done
FAILURES = "failures.jsonl"


@dataclass(frozen=True)
class Location:
    """A folder on some filesystem: picklable (fsspec filesystems are), so tasks on any node open it alike."""

    fs: fsspec.AbstractFileSystem
    root: str

    @classmethod
    def of(cls, url: str) -> Location:
        fs, root = fsspec.core.url_to_fs(url)
        return cls(fs, root.rstrip("/") or "/")

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def names(self) -> list[str]:
        """File names directly in the folder (none when it does not exist yet)."""
        if not self.fs.exists(self.root):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False))

    def read(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def write(self, name: str, data: bytes) -> None:
        """Readers see the whole file or none: on a local disk a temp file renamed into place; an object store's
        single put is already whole or absent."""
        if isinstance(self.fs, LocalFileSystem):
            atomic_write_bytes(Path(self.path(name)), data)
        else:
            self.fs.pipe_file(self.path(name), data)

    def remove(self, name: str) -> None:
        if self.fs.exists(self.path(name)):
            self.fs.rm_file(self.path(name))


def image_names(source: Location) -> dict[str, str]:
    """image id (the file name without suffix) -> file name, for every image in the source folder."""
    return {posixpath.splitext(n)[0]: n for n in source.names() if posixpath.splitext(n)[1].lower() in IMAGE_SUFFIXES}


def done_ids(dest: Location) -> set[str]:
    """The images a run already finished: those with a rows file in the destination."""
    return {name.removesuffix(ROWS_SUFFIX) for name in dest.names() if name.endswith(ROWS_SUFFIX)}
