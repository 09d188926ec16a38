"""Labelled folders in the layouts labs keep them, each recognized on its own, read together as one dataset.

`open_labelled(folders, cell_type)` looks at each folder, decides its layout (LAYOUTS: the first that fits),
checks every image and every label file in it, logs what it found ("cellseg.data": "<folder>: <layout> layout,
N images, M cells") and returns a LabelledFolders: the interface train, evaluate and tune read.

- kaggle: train.csv and train/<id>.png, read by KaggleDataset as before (its ids, cell types, sample_ids,
  fingerprint).
- ctc: Cell Tracking Challenge sequences NN/tTTT.tif with NN_GT/SEG/man_segTTT.tif (3 or 4 digits) for the
  frames that are labelled; the others are not read. Image id "NN-tTTT".
- pairs: NAME.EXT beside NAME_masks.EXT (Cellpose), NAME_labels.EXT or NAME-labels.EXT (cellseg's own label files:
  `predict --formats tiff png`); or images/NAME.EXT beside masks/NAME.EXT or labels/NAME.EXT. Not `_mask`: the
  service's NAME-mask.png is a 0/255 foreground mask, not a label image; not Cellpose's `_seg.npy` (a pickle).
- coco: a COCO instances JSON beside its images or an images/ folder (file_name relative to either); a
  `NAME-coco.json` holding one image, as the service writes it, goes with NAME.EXT beside it.
- geojson, roi, cellseg-json: NAME.EXT beside NAME.geojson or NAME.json (QuPath's GeoJSON), NAME.zip,
  NAME_rois.zip or NAME-rois.zip (a Fiji ROI set), or NAME.json (the JSON /segment answers). Such files may mix
  in one folder; its layout is then named by all of them ("geojson+roi").

Every file the service writes for an image (label TIFF or PNG, ROI set, GeoJSON, COCO, JSON) reads back as that
image's labels. app.ml.data.annotations turns each label file into labels and states the overlap rule: a pixel two
shapes claim goes to the first, unless they share more than 20 % of the smaller, which is an error.

Images are decoded by app.ml.imageio.read_image, the decoder the service runs on an upload, so training sees
what serving sees (a 16-bit image is divided by 65535 whatever its values are). The image id is the file's stem
(CTC: sequence and frame); every image is its own sample (sample_id = image id; CTC records its sequence in the
metadata). The cell type of every cell of a folder is `cell_type` where given, else the folder's name; a Kaggle
folder keeps its train.csv's cell_type column.

Nothing is skipped: a folder's problems (unreadable or empty files, images without labels and labels without
images, sizes that differ, label files with no cells, overlapping shapes...) are collected and raised as one
DatasetError listing them, each naming its file.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.ml.data.annotations import LabelFileError, LabelSource, json_kind, read_bytes, read_json, read_labels
from app.ml.data.kaggle import KaggleDataset, Sample
from app.ml.errors import DatasetError, InvalidImageError
from app.ml.imageio import ImageLimits, check_geometry, declared_shape, read_image

LOG = logging.getLogger("cellseg.data")

LAYOUTS = """\
  kaggle        train.csv (one row per cell: id, annotation as RLE, width, height, cell_type) and train/<id>.png
  pairs         NAME.tif|png beside NAME_masks.tif|png (Cellpose), NAME_labels.* or NAME-labels.*; or images/NAME.*
                beside masks/NAME.* or labels/NAME.*: label images (0 = background, one value per cell)
  ctc           01/t000.tif ... beside 01_GT/SEG/man_seg000.tif for the labelled frames (Cell Tracking Challenge)
  coco          a COCO instances JSON (polygons or RLE) beside its images or beside an images/ folder
  geojson       NAME.tif|png beside NAME.geojson or NAME.json: Polygon or MultiPolygon features (QuPath)
  roi           NAME.tif|png beside NAME.zip, NAME_rois.zip or NAME-rois.zip: a Fiji ROI Manager set
  cellseg-json  NAME.tif|png beside NAME.json: the JSON /segment answers, one RLE per cell"""

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")  # what the service decodes
LABEL_SUFFIXES = (".tif", ".tiff", ".png")
MASK_ENDINGS = ("_masks", "_labels", "-labels")  # Cellpose's; common; the service's (predict --formats tiff png)
ROI_ENDINGS = (".zip", "_rois.zip", "-rois.zip")  # Fiji's ROI Manager saves NAME.zip; RoiSet.zip renamed; ours
JSON_ENDINGS = (".geojson", ".json")
SERVICE_COCO = "-coco.json"  # predict --formats coco: one image per file, whose file_name the service cannot know
_SEQUENCE = re.compile(r"\d+")
_FRAME = re.compile(r"t(\d+)\.tiff?", re.IGNORECASE)
_MAN_SEG = re.compile(r"man_seg(\d+)\.tiff?", re.IGNORECASE)
_KINDS = {"label-image": "pairs", "geojson": "geojson", "roi": "roi", "cellseg-json": "cellseg-json"}


@dataclass
class LabelledRecord:
    """One labelled image: where its pixels and its cells are, and what it is."""

    image_id: str
    sample_id: str
    cell_type: str  # the image's: the type of its cells (a Kaggle image's most common one)
    image: Path
    labels: LabelSource | None  # None in a Kaggle folder: the cells are train.csv's rows
    cells: int
    metadata: dict[str, str]


@dataclass
class _Found:
    """An image and its label file, as a layout's reader finds them (not yet checked)."""

    image_id: str
    image: Path
    labels: LabelSource
    metadata: dict[str, str]


class LabelledFolder:
    """One checked folder in one layout."""

    def __init__(self, root: Path, layout: str, records: list[LabelledRecord], kaggle: KaggleDataset | None) -> None:
        self.root, self.layout, self.records, self.kaggle = root, layout, records, kaggle

    def load(self, index: int) -> Sample:
        if self.kaggle is not None:
            return self.kaggle.load(index)
        record = self.records[index]
        assert record.labels is not None
        try:
            image = read_image(record.image)
        except (InvalidImageError, OSError) as exc:
            raise DatasetError(f"{record.image}: {exc}") from exc
        labels = read_labels(record.labels, image.shape)
        cell_types = [record.cell_type] * int(labels.max())
        return Sample(record.image_id, image, labels, cell_types, dict(record.metadata))

    def fingerprint(self) -> str:
        """sha256 of every file read, each once, in the records' order (a Kaggle folder: KaggleDataset's)."""
        if self.kaggle is not None:
            return self.kaggle.fingerprint()
        digest = hashlib.sha256()
        for path in dict.fromkeys(p for r in self.records for p in (r.image, r.labels.path if r.labels else r.image)):
            digest.update(path.read_bytes())
        return digest.hexdigest()


class LabelledFolders:
    """Labelled folders of any layouts read as one dataset; image ids must be unique across them, so a split or a
    score names each image once."""

    def __init__(self, folders: Sequence[str | Path], cell_type: str | None = None) -> None:
        if not folders:
            raise DatasetError(f"no data folder given; pass one or more labelled folders, in these layouts:\n{LAYOUTS}")
        self.folders = [open_folder(Path(folder), cell_type or None) for folder in folders]
        self.layouts = {str(f.root): f.layout for f in self.folders}
        self.root = ", ".join(str(f.root) for f in self.folders)
        self._where = [(folder, i) for folder in self.folders for i in range(len(folder.records))]
        self.records = [folder.records[i] for folder, i in self._where]
        repeated = sorted(i for i, n in Counter(self.image_ids).items() if n > 1)
        if repeated:
            raise DatasetError(
                f"image ids {repeated[:5]} appear in more than one of the folders {self.root}; an image id names one "
                "image: rename the files of one folder"
            )

    def __len__(self) -> int:
        return len(self.records)

    @property
    def image_ids(self) -> list[str]:
        return [r.image_id for r in self.records]

    def load(self, index: int) -> Sample:
        folder, local = self._where[index]
        return folder.load(local)

    def __iter__(self) -> Iterator[Sample]:
        return (self.load(i) for i in range(len(self)))

    def fingerprint(self) -> str:
        """The folder's own fingerprint for one folder; for several, sha256 of theirs in order."""
        if len(self.folders) == 1:
            return self.folders[0].fingerprint()
        return hashlib.sha256("".join(f.fingerprint() for f in self.folders).encode()).hexdigest()


def open_labelled(folders: Sequence[str | Path], cell_type: str | None = None) -> LabelledFolders:
    """Read labelled folders, each in whatever layout it is (LAYOUTS), as one dataset. `cell_type` names the cells
    of every folder but Kaggle ones (default: each folder's name). DatasetError listing every problem found."""
    return LabelledFolders(folders, cell_type)


def open_folder(root: Path, cell_type: str | None = None) -> LabelledFolder:
    """One folder, its layout recognized, every image and label file checked; DatasetError listing the problems."""
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder; a labelled folder is in one of these layouts:\n{LAYOUTS}")
    if (root / "train.csv").is_file():
        return _kaggle(root, cell_type)
    layout, found, problems, note = _find(root)
    name = cell_type or root.resolve().name
    records = []
    for item in found:
        try:
            shape = _image_shape(item.image)
            cells = int(read_labels(item.labels, shape).max())
        except LabelFileError as exc:
            problems += exc.problems
            continue
        metadata = {"layout": layout, "image": _relative(item.image, root), "labels": _relative(item.labels.path, root)}
        records.append(
            LabelledRecord(
                item.image_id, item.image_id, name, item.image, item.labels, cells, {**metadata, **item.metadata}
            )
        )
    repeated = sorted(i for i, n in Counter(r.image_id for r in records).items() if n > 1)
    if repeated:
        problems.append(f"image ids {repeated[:5]} name several images; an image id names one image")
    if problems:
        shown = 30
        more = f"\n... and {len(problems) - shown} more" if len(problems) > shown else ""
        raise DatasetError(
            f"{len(problems)} problem(s) in {root} ({layout} layout):\n" + "\n".join(problems[:shown]) + more
        )
    cells = sum(r.cells for r in records)
    LOG.info("%s: %s layout, %d images, %d cells%s", root, layout, len(records), cells, f" ({note})" if note else "")
    return LabelledFolder(root, layout, records, None)


def _kaggle(root: Path, cell_type: str | None) -> LabelledFolder:
    dataset = KaggleDataset(root)
    records = [
        LabelledRecord(r.image_id, r.sample_id, r.cell_type, dataset.image_path(r), None, len(r.cells), r.metadata)
        for r in dataset.records
    ]
    note = f"its train.csv names the cells' types; cell type {cell_type!r} not applied" if cell_type else ""
    LOG.info(
        "%s: kaggle layout, %d images, %d cells%s",
        root,
        len(records),
        sum(r.cells for r in records),
        f" ({note})" if note else "",
    )
    return LabelledFolder(root, "kaggle", records, dataset)


def _find(root: Path) -> tuple[str, list[_Found], list[str], str]:
    """(layout, images and their label files, problems, a note for the log) of a folder that is not Kaggle's."""
    sequences = sorted(
        d.name
        for d in root.iterdir()
        if d.is_dir() and _SEQUENCE.fullmatch(d.name) and _seg_folder(root, d.name).is_dir()
    )
    if sequences:
        return ("ctc", *_ctc(root, sequences))
    if (root / "images").is_dir() and ((root / "masks").is_dir() or (root / "labels").is_dir()):
        return ("pairs", *_pair_folders(root), "")
    coco_files = [p for p in _files(root) if p.suffix.lower() == ".json" and _is_coco(p)]
    if coco_files:
        return ("coco", *_coco(root, coco_files), "")
    kinds, found, problems = _per_image(root)
    if not kinds:
        raise DatasetError(
            f"{root}: not a labelled folder in a layout this reads ({_what_is_there(root)}). Accepted:\n{LAYOUTS}"
        )
    return "+".join(sorted(kinds)), found, problems, ""


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _seg_folder(root: Path, sequence: str) -> Path:
    return root / f"{sequence}_GT" / "SEG"


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def _image_shape(path: Path) -> tuple[int, int]:
    """(height, width) of an image file from its header, which must declare one 2-D image the service's limits
    admit; LabelFileError naming the file otherwise."""
    data = read_bytes(path)
    if not data:
        raise LabelFileError(f"{path}: the image file is empty")
    shape = declared_shape(data)
    if shape is None:
        raise LabelFileError(f"{path}: not a readable PNG, JPEG or TIFF image")
    height, width, planes = shape
    if planes > 1:
        raise LabelFileError(f"{path}: it holds {planes} planes (a stack or channels); training reads 2-D images")
    try:
        check_geometry(height, width, planes, ImageLimits())
    except InvalidImageError as exc:
        raise LabelFileError(f"{path}: {exc}") from exc
    return height, width


# Cell Tracking Challenge


def _ctc(root: Path, sequences: list[str]) -> tuple[list[_Found], list[str], str]:
    found: list[_Found] = []
    problems: list[str] = []
    notes = []
    for sequence in sequences:
        frames = {int(m[1]): p for p in _files(root / sequence) if (m := _FRAME.fullmatch(p.name))}
        labelled = 0
        for path in _files(_seg_folder(root, sequence)):
            match = _MAN_SEG.fullmatch(path.name)
            if not match:
                if path.name.lower().startswith("man_seg"):
                    problems.append(
                        f"{path}: not a 2-D frame's label file man_segTTT.tif (3-D man_seg_TTT_ZZZ not read)"
                    )
                continue
            image = frames.get(int(match[1]))
            if image is None:
                problems.append(f"{path}: no frame t{match[1]}.tif in {root / sequence}")
                continue
            labelled += 1
            metadata = {"sequence": sequence, "frame": image.stem[1:]}
            found.append(_Found(f"{sequence}-{image.stem}", image, LabelSource("label-image", path), metadata))
        if not labelled and not problems:
            problems.append(f"{_seg_folder(root, sequence)}: no man_segTTT.tif label file")
        notes.append(f"sequence {sequence}: {labelled} of {len(frames)} frames labelled")
    return found, problems, "; ".join(notes)


# Label images beside images


def _pair_folders(root: Path) -> tuple[list[_Found], list[str]]:
    """images/NAME.* beside masks/NAME.* or labels/NAME.* (or NAME_masks.* there)."""
    label_dirs = [root / d for d in ("masks", "labels") if (root / d).is_dir()]
    if len(label_dirs) > 1:
        return [], [f"{root}: both masks/ and labels/ beside images/; keep the one that holds the label images"]
    images = [p for p in _files(root / "images") if p.suffix.lower() in IMAGE_SUFFIXES]
    labels = {p.stem.lower(): p for p in _files(label_dirs[0]) if p.suffix.lower() in LABEL_SUFFIXES}
    problems = _repeated_stems(images) + _repeated_stems(list(labels.values()))
    found, missing, used = [], [], set()
    for image in images:
        stem = image.stem.lower()
        path = next((labels[k] for k in (stem, *(stem + e for e in MASK_ENDINGS)) if k in labels), None)
        if path is None:
            missing.append(image.name)
            continue
        used.add(path)
        found.append(_Found(image.stem, image, LabelSource("label-image", path), {}))
    if missing:
        problems.append(f"{root / 'images'}: no label file in {label_dirs[0]} for {_listed(missing)}")
    orphans = [p.name for p in labels.values() if p not in used]
    if orphans:
        problems.append(f"{label_dirs[0]}: no image in {root / 'images'} for {_listed(orphans)}")
    return found, problems


def _per_image(root: Path) -> tuple[set[str], list[_Found], list[str]]:
    """Every image at the folder's top and the one label file beside it; the kinds of label files found."""
    files = _files(root)
    by_name = {p.name.lower(): p for p in files}
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and not _is_label_image(p)]
    problems = _repeated_stems(images)
    kinds: set[str] = set()
    found, missing, used = [], [], set()
    for image in images:
        stem = image.stem.lower()
        endings = [m + s for m in MASK_ENDINGS for s in LABEL_SUFFIXES] + list(JSON_ENDINGS) + list(ROI_ENDINGS)
        candidates = [by_name[stem + e] for e in endings if stem + e in by_name]
        used.update(candidates)
        if not candidates:
            missing.append(image.name)
            continue
        if len(candidates) > 1:
            kinds.update(_layout_by_name(p) for p in candidates)
            problems.append(
                f"{image}: several label files beside it ({_listed([p.name for p in candidates])}); keep one"
            )
            continue
        try:
            kind = _kind(candidates[0])
        except LabelFileError as exc:
            kinds.add(_layout_by_name(candidates[0]))
            problems += exc.problems
            continue
        kinds.add(_KINDS[kind])
        found.append(_Found(image.stem, image, LabelSource(kind, candidates[0]), {}))
    orphans = [p for p in files if p not in used and (_is_label_image(p) or _is_shapes_name(p))]
    kinds.update(_layout_by_name(p) for p in orphans)
    if kinds and missing:
        problems.append(f"{root}: no label file beside {_listed(missing)}")
    if orphans:
        problems.append(f"{root}: no image beside the label files {_listed([p.name for p in orphans])}")
    return kinds, found, problems


def _layout_by_name(path: Path) -> str:
    """The layout a label file's name suggests (a JSON's content decides between GeoJSON and cellseg's JSON)."""
    name = path.name.lower()
    return "roi" if name.endswith(".zip") else "geojson" if name.endswith((".geojson", ".json")) else "pairs"


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".zip"):
        return "roi"
    if name.endswith(".geojson"):
        return "geojson"
    if name.endswith(".json"):
        return json_kind(path)
    return "label-image"


def _is_label_image(path: Path) -> bool:
    return path.suffix.lower() in LABEL_SUFFIXES and path.stem.lower().endswith(MASK_ENDINGS)


def _is_shapes_name(path: Path) -> bool:
    return path.name.lower().endswith((".geojson", "_rois.zip", "-rois.zip"))


def _repeated_stems(paths: list[Path]) -> list[str]:
    stems = defaultdict(list)
    for path in paths:
        stems[path.stem.lower()].append(path.name)
    return [
        f"{paths[0].parent}: {_listed(names)} have one name; keep one" for names in stems.values() if len(names) > 1
    ]


def _listed(names: list[str], shown: int = 10) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


# COCO


def _is_coco(path: Path) -> bool:
    try:
        document = read_json(path)
    except LabelFileError:
        return False
    return isinstance(document, dict) and "images" in document and "annotations" in document


def _coco(root: Path, coco_files: list[Path]) -> tuple[list[_Found], list[str]]:
    found: list[_Found] = []
    problems: list[str] = []
    listed_in: dict[Path, Path] = {}
    for path in coco_files:
        document = read_json(path)
        images, annotations = document.get("images"), document.get("annotations")
        if not isinstance(images, list) or not isinstance(annotations, list):
            problems.append(f"{path}: 'images' and 'annotations' must be lists")
            continue
        by_image: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        for annotation in annotations:
            by_image[annotation.get("image_id") if isinstance(annotation, dict) else None].append(annotation)
        known = {entry.get("id") for entry in images if isinstance(entry, dict)}
        strays = [
            str(a.get("id") if isinstance(a, dict) else a)
            for key in by_image
            if key not in known
            for a in by_image[key]
        ]
        if strays:
            problems.append(f"{path}: annotations {_listed(strays)} belong to no image of its 'images'")
        for entry in images:
            image = _coco_image(path, entry, len(images))
            if image is None:
                problems.append(f"{path}: image {entry!r:.80}: no such file in {root} or {root / 'images'}")
                continue
            if image.resolve() in listed_in:
                problems.append(f"{path}: {image.name} is listed in {listed_in[image.resolve()].name} too")
                continue
            listed_in[image.resolve()] = path
            source = LabelSource("coco", path, tuple(by_image.get(entry.get("id"), ())), image.name)
            problems += _coco_size_problems(path, entry, image)
            metadata = {"coco_image_id": str(entry.get("id"))}
            found.append(_Found(image.stem, image, source, metadata))
    on_disk = [p for folder in (root, root / "images") if folder.is_dir() for p in _files(folder)]
    unlisted = [
        _relative(p, root) for p in on_disk if p.suffix.lower() in IMAGE_SUFFIXES and p.resolve() not in listed_in
    ]
    if unlisted:
        problems.append(f"{root}: images that no COCO file lists: {_listed(unlisted)}")
    return found, problems


def _coco_image(path: Path, entry: Any, count: int) -> Path | None:
    """The file of a COCO image entry: its file_name beside the JSON or in images/ beside it; for the service's
    NAME-coco.json (one image, whose file name the service does not know), NAME.EXT beside it."""
    file_name = entry.get("file_name") if isinstance(entry, dict) else None
    candidates = []
    if isinstance(file_name, str) and file_name:
        candidates += [path.parent / file_name, path.parent / "images" / file_name]
        candidates.append(path.parent / "images" / Path(file_name).name)
    if count == 1 and path.name.lower().endswith(SERVICE_COCO):
        stem = path.name[: -len(SERVICE_COCO)]
        candidates += [path.parent / f"{stem}{suffix}" for suffix in IMAGE_SUFFIXES]
    return next((c for c in candidates if c.is_file()), None)


def _coco_size_problems(path: Path, entry: dict[str, Any], image: Path) -> list[str]:
    try:
        shape = _image_shape(image)
    except LabelFileError:
        return []  # said when the image is checked
    declared = (entry.get("height"), entry.get("width"))
    if declared != shape:
        return [f"{path}: image {image.name} is {shape[1]}x{shape[0]}, its entry says {declared[1]}x{declared[0]}"]
    return []


def _what_is_there(root: Path) -> str:
    files = _files(root)
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    numbered = [d.name for d in root.iterdir() if d.is_dir() and _SEQUENCE.fullmatch(d.name)]
    if numbered:
        return f"sequence folders {', '.join(sorted(numbered))} without {sorted(numbered)[0]}_GT/SEG"
    masks = [p.name for p in images if p.stem.lower().endswith(("_mask", "-mask"))]
    if masks:  # the service's NAME-mask.png is a 0/255 foreground mask: one value for all cells
        return (
            f"{len(images)} images and no label file beside any of them; {_listed(masks)}: NAME_mask is not read "
            "as labels (a mask has one value for all cells); name label images NAME_masks"
        )
    if images:
        return f"{len(images)} images and no label file beside any of them"
    return "no images at its top" if files else "it is empty"
