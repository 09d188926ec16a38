"""Model folders: `model_store/<version>/` holds tensors-only weights and `model.json` describing them.

Writes are atomic: the weights go to a content-addressed file (weights-<sha256 prefix>.safetensors) first,
then model.json, which names that file and its sha256, replaces the old one in a single rename. A crash at any
point leaves either the old consistent pair or the new one. Loading never runs pickled code (safetensors).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from app.ml.card import ModelCard
from app.ml.errors import CheckpointError
from app.ml.transforms import PreprocessConfig
from app.ml.unet import UNet, UNetConfig

MODEL_JSON = "model.json"
DEFAULT_POINTER = "DEFAULT"
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # added by torch.compile and DistributedDataParallel


@dataclass(frozen=True)
class Checkpoint:
    """A loaded model folder: its card (model.json) and the weights."""

    version: str
    path: Path
    card: ModelCard
    state_dict: dict[str, torch.Tensor]

    @property
    def architecture(self) -> UNetConfig:
        return self.card.architecture

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.card.preprocessing

    @property
    def split(self) -> dict[str, Any] | None:
        """The train/validation split the model was trained with, as model.json records it (None if it does not)."""
        return self.card.split

    def build_model(self) -> UNet:
        """A UNet of the recorded architecture holding these weights, in eval mode on the CPU."""
        model = UNet(self.architecture)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.path}: weights do not fit the architecture in {MODEL_JSON}: {exc}") from exc
        return model.eval()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; models must be readable by the service's own user
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def remove_temp_files(folder: Path) -> list[Path]:
    """Delete the temp files atomic_write_bytes leaves in `folder` when killed mid-write; returns them. Only for a
    folder no other process is writing into (a run's own folder)."""
    stale = sorted(folder.glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes and move every tensor to contiguous CPU memory."""
    return {_strip_prefixes(k): v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_checkpoint(folder: Path, state_dict: dict[str, torch.Tensor], card: ModelCard) -> ModelCard:
    """Write weights and model.json into `folder` atomically; returns the card as written (with weights info)."""
    blob = save_safetensors(clean_state_dict(state_dict))
    digest = hashlib.sha256(blob).hexdigest()
    weights_name = f"weights-{digest[:16]}.safetensors"
    atomic_write_bytes(folder / weights_name, blob)
    card = card.with_weights(weights_name, digest)
    atomic_write_json(folder / MODEL_JSON, card.to_dict())
    for stale in folder.glob("weights-*.safetensors"):
        if stale.name != weights_name:
            stale.unlink(missing_ok=True)
    return card


def load_checkpoint(folder: str | Path) -> Checkpoint:
    """Read and verify a model folder. Raises CheckpointError naming the file and the problem."""
    folder = Path(folder)
    card = read_card(folder)
    if card.weights is None:
        raise CheckpointError(f"{folder / MODEL_JSON} does not name its weights file and sha256")
    weights_path = _weights_path(folder, card.weights.file)
    blob = _read_weights(weights_path)
    expected = card.weights.sha256
    actual = hashlib.sha256(blob).hexdigest()
    if actual != expected:
        raise CheckpointError(
            f"{weights_path}: sha256 is {actual} but {folder / MODEL_JSON} records {expected}; "
            "the file is corrupt or was replaced: restore it or retrain"
        )
    try:
        state = clean_state_dict(load_safetensors(blob))
    except SafetensorError as exc:  # only a file whose recorded sha256 was computed over bad bytes gets here
        raise CheckpointError(f"{weights_path} is not a readable safetensors file ({exc})") from exc
    return Checkpoint(version=folder.name, path=folder, card=card, state_dict=state)


def read_card(folder: Path) -> ModelCard:
    """model.json of a model folder, parsed and checked; CheckpointError naming the file and the problem."""
    path = folder / MODEL_JSON
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} not found")
    if not path.is_file():
        raise CheckpointError(f"{path} not found: {folder} is not a complete model folder")
    try:
        card = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc
    try:
        return ModelCard.from_dict(card)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def list_versions(store: str | Path) -> list[str]:
    """Names of the complete model folders (those with a model.json) in a store, sorted."""
    store = Path(store)
    if not store.is_dir():
        return []
    return sorted(p.name for p in store.iterdir() if (p / MODEL_JSON).is_file())


def default_version(store: str | Path) -> str | None:
    """The version named by store/DEFAULT, else the newest complete folder by name, else None."""
    store = Path(store)
    pointer = store / DEFAULT_POINTER
    if pointer.is_file():
        return pointer.read_text().strip() or None
    versions = list_versions(store)
    return versions[-1] if versions else None


def resolve_model_folder(store: str | Path, version: str | None = None) -> Path:
    """The folder of `version` (or of the default one) in `store`; CheckpointError with the choices if absent."""
    store = Path(store)
    chosen = version or default_version(store)
    available = list_versions(store)
    if chosen is None:
        raise CheckpointError(f"no model in {store}: train one with `train` or set the version to load")
    if chosen not in available:
        raise CheckpointError(f"model version {chosen!r} not found in {store}; available: {available or 'none'}")
    return store / chosen


def set_default_version(store: str | Path, version: str) -> None:
    atomic_write_bytes(Path(store) / DEFAULT_POINTER, f"{version}\n".encode())


def _weights_path(folder: Path, name: str) -> Path:
    """The weights file model.json names, which must be a plain file name inside the model folder."""
    if Path(name).name != name or name in {"", ".", ".."}:
        raise CheckpointError(f"{folder / MODEL_JSON} names weights file {name!r}: it must be a file name in {folder}")
    return folder / name


def _read_weights(path: Path) -> bytes:
    if not path.is_file():
        raise CheckpointError(f"{path} not found, but {path.parent / MODEL_JSON} names it")
    return path.read_bytes()


def _strip_prefixes(key: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        key = key.removeprefix(prefix)
    return key


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not allow opening directories; the rename is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
