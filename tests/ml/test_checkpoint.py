import json

import pytest
import torch

from app.ml.card import ModelCard
from app.ml.checkpoint import (
    MODEL_JSON,
    default_version,
    list_versions,
    load_checkpoint,
    resolve_model_folder,
    save_checkpoint,
    set_default_version,
)
from app.ml.errors import CheckpointError
from app.ml.transforms import PreprocessConfig
from app.ml.unet import UNet, UNetConfig

CONFIG = UNetConfig(base_width=4, depth=2)


def write_model(folder, seed=0):
    torch.manual_seed(seed)
    model = UNet(CONFIG)
    card = ModelCard(version=folder.name, architecture=CONFIG, preprocessing=PreprocessConfig(input_size=64))
    return model, save_checkpoint(folder, model.state_dict(), card)


def test_a_saved_model_loads_back_identical(tmp_path):
    model, card = write_model(tmp_path / "v1")
    checkpoint = load_checkpoint(tmp_path / "v1")
    assert checkpoint.version == "v1" and checkpoint.architecture == CONFIG
    assert checkpoint.preprocess.input_size == 64
    rebuilt = checkpoint.build_model()
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value)
    assert card.weights.file.startswith("weights-") and len(card.weights.sha256) == 64


def test_weights_are_tensors_only_safetensors_not_pickle(tmp_path):
    _, card = write_model(tmp_path / "v1")
    blob = (tmp_path / "v1" / card.weights.file).read_bytes()
    header_length = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + header_length])  # safetensors: a JSON header, then raw tensor bytes
    assert "inc.block.0.weight" in header
    assert b"\x80\x04" not in blob[:2]  # no pickle protocol marker


def test_saving_again_replaces_the_weights_and_leaves_one_consistent_pair(tmp_path):
    write_model(tmp_path / "v1", seed=0)
    _, card = write_model(tmp_path / "v1", seed=1)
    files = sorted(p.name for p in (tmp_path / "v1").iterdir())
    assert files == sorted([MODEL_JSON, card.weights.file])
    load_checkpoint(tmp_path / "v1")


def test_a_corrupt_weights_file_is_refused_naming_the_file(tmp_path):
    _, card = write_model(tmp_path / "v1")
    weights = tmp_path / "v1" / card.weights.file
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=rf"{weights.name}: sha256 is .* but .*model.json records"):
        load_checkpoint(tmp_path / "v1")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda folder, card: (folder / card.weights.file).unlink(), "not found, but .*model.json names it"),
        (lambda folder, card: (folder / MODEL_JSON).write_text("{not json"), "model.json is not valid JSON"),
        (lambda folder, card: (folder / MODEL_JSON).unlink(), "model.json not found"),
    ],
)
def test_incomplete_folders_are_refused_with_the_problem(tmp_path, damage, message):
    _, card = write_model(tmp_path / "v1")
    damage(tmp_path / "v1", card)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "v1")


def test_versions_and_the_default(tmp_path):
    write_model(tmp_path / "a")
    write_model(tmp_path / "b")
    (tmp_path / "half-written").mkdir()  # no model.json: not a version
    assert list_versions(tmp_path) == ["a", "b"]
    assert default_version(tmp_path) == "b"
    set_default_version(tmp_path, "a")
    assert resolve_model_folder(tmp_path) == tmp_path / "a"
    assert resolve_model_folder(tmp_path, "b") == tmp_path / "b"
    with pytest.raises(CheckpointError, match=r"'zzz' not found .* available: \['a', 'b'\]"):
        resolve_model_folder(tmp_path, "zzz")
    with pytest.raises(CheckpointError, match="no model in"):
        resolve_model_folder(tmp_path / "empty")
