"""Read a folder in the Kaggle Sartorius layout: `train.csv` (one row per cell) and `train/<id>.png`.

Overlaps: competition annotations overlap a little, but instances must not. The rule here is
"first row wins": a pixel claimed by several cells belongs to the cell whose row comes first in train.csv.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from app.ml import rle
from app.ml.errors import DatasetError, InvalidRLEError
from app.ml.imageio import image_size, read_image

CSV_COLUMNS = (
    "id",
    "annotation",
    "width",
    "height",
    "cell_type",
    "plate_time",
    "sample_date",
    "sample_id",
    "elapsed_timedelta",
)
METADATA_COLUMNS = ("plate_time", "sample_date", "sample_id", "elapsed_timedelta")


@dataclass(frozen=True)
class CellRow:
    """One row of train.csv, with its line number for error messages."""

    line: int
    annotation: str
    cell_type: str


@dataclass
class ImageRecord:
    """Everything train.csv says about one image."""

    image_id: str
    height: int
    width: int
    metadata: dict[str, str]
    cells: list[CellRow] = field(default_factory=list)

    @property
    def cell_type(self) -> str:
        """The image's cell type: the most common among its cells (Kaggle images hold one type)."""
        return Counter(c.cell_type for c in self.cells).most_common(1)[0][0]

    @property
    def sample_id(self) -> str:
        return self.metadata.get("sample_id") or self.image_id


@dataclass
class Sample:
    """One loaded image: (H, W) float32 image in [0, 1], (H, W) int32 labels, per-cell types, metadata."""

    image_id: str
    image: np.ndarray
    labels: np.ndarray
    cell_types: list[str]
    metadata: dict[str, str]

    @property
    def cell_type(self) -> str:
        return Counter(self.cell_types).most_common(1)[0][0] if self.cell_types else "unknown"


class KaggleDataset:
    """A validated Kaggle-layout folder; images are decoded lazily, one at a time.

    Construction checks every row (RLE syntax and bounds, image present, image size as the CSV says) and
    raises one DatasetError listing every problem with its line number, so a bad row is neither skipped
    silently nor discovered halfway through training.
    """

    def __init__(self, root: str | Path, csv_name: str = "train.csv", image_dir: str = "train") -> None:
        self.root = Path(root)
        self.csv_path = self.root / csv_name
        self.image_dir = self.root / image_dir
        self.records = _read_records(self.csv_path)
        _validate(self.records, self.image_dir, self.csv_path)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def image_ids(self) -> list[str]:
        return [r.image_id for r in self.records]

    def image_path(self, record: ImageRecord) -> Path:
        return self.image_dir / f"{record.image_id}.png"

    def load(self, index: int) -> Sample:
        record = self.records[index]
        return Sample(
            image_id=record.image_id,
            image=read_image(self.image_path(record)),
            labels=labels_from_rles([c.annotation for c in record.cells], (record.height, record.width)),
            cell_types=[c.cell_type for c in record.cells],
            metadata=dict(record.metadata),
        )

    def __iter__(self) -> Iterator[Sample]:
        return (self.load(i) for i in range(len(self)))

    def fingerprint(self) -> str:
        """sha256 of train.csv and of every image file: names exactly the data a model was trained on."""
        digest = hashlib.sha256(self.csv_path.read_bytes())
        for record in self.records:
            digest.update(self.image_path(record).read_bytes())
        return digest.hexdigest()


def labels_from_rles(annotations: list[str], shape: tuple[int, int]) -> np.ndarray:
    """RLE strings -> (H, W) int32 instance labels 1..N in the given order; the first cell keeps shared pixels."""
    labels = np.zeros(shape[0] * shape[1], dtype=np.int32)
    for number, annotation in enumerate(annotations, start=1):
        starts, lengths = rle.parse(annotation, shape)
        pixels = np.repeat(starts - 1, lengths) + _ramp(lengths)
        unclaimed = pixels[labels[pixels] == 0]
        labels[unclaimed] = number
    return labels.reshape(shape)


def _ramp(lengths: np.ndarray) -> np.ndarray:
    """[3, 2] -> [0, 1, 2, 0, 1]: offsets inside each run, without a Python loop over runs."""
    total = int(lengths.sum())
    run_starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(total) - run_starts


def _read_records(csv_path: Path) -> list[ImageRecord]:
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path} not found; a Kaggle-layout folder has train.csv and train/<id>.png")
    records: dict[str, ImageRecord] = {}
    problems: list[str] = []
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"id", "annotation", "width", "height"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(f"{csv_path}: missing columns {sorted(missing)}; expected {', '.join(CSV_COLUMNS)}")
        for row in reader:
            problem = _add_row(records, row, reader.line_num)
            if problem:
                problems.append(f"{csv_path.name} line {reader.line_num}: {problem}")
    _raise_if(problems)
    return list(records.values())


def _add_row(records: dict[str, ImageRecord], row: dict[str, str], line: int) -> str | None:
    try:
        width, height = int(row["width"]), int(row["height"])
    except (TypeError, ValueError):
        return f"width {row['width']!r} and height {row['height']!r} must be integers"
    image_id = row["id"]
    record = records.setdefault(
        image_id, ImageRecord(image_id, height, width, {k: row.get(k) or "" for k in METADATA_COLUMNS})
    )
    if (record.height, record.width) != (height, width):
        return f"image {image_id} is {width}x{height} here but {record.width}x{record.height} on earlier rows"
    record.cells.append(CellRow(line, row["annotation"] or "", row.get("cell_type") or "unknown"))
    return None


def _validate(records: list[ImageRecord], image_dir: Path, csv_path: Path) -> None:
    problems = []
    for record in records:
        problems += _image_problems(record, image_dir / f"{record.image_id}.png", csv_path.name)
        for cell in record.cells:
            if not cell.annotation.strip():
                problems.append(f"{csv_path.name} line {cell.line}: image {record.image_id}: empty annotation")
                continue
            try:
                rle.parse(cell.annotation, (record.height, record.width))
            except InvalidRLEError as exc:
                problems.append(f"{csv_path.name} line {cell.line}: image {record.image_id}: {exc}")
    _raise_if(problems)


def _image_problems(record: ImageRecord, path: Path, csv_name: str) -> list[str]:
    first_line = record.cells[0].line
    if not path.is_file():
        return [f"{csv_name} line {first_line}: image {record.image_id}: {path} not found"]
    try:
        size = image_size(path)
    except Exception as exc:  # any reader failure is a problem with that file, reported with the others
        return [f"{csv_name} line {first_line}: image {record.image_id}: {path} is not readable ({exc})"]
    if size != (record.height, record.width):
        return [
            f"{csv_name} line {first_line}: image {record.image_id}: the CSV says {record.width}x{record.height} "
            f"but {path.name} is {size[1]}x{size[0]}"
        ]
    return []


def _raise_if(problems: list[str], shown: int = 20) -> None:
    if problems:
        more = f"\n... and {len(problems) - shown} more" if len(problems) > shown else ""
        raise DatasetError(f"{len(problems)} problem(s) in the dataset:\n" + "\n".join(problems[:shown]) + more)
