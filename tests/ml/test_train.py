"""The `train` entrypoint end to end: real runs on synthetic data, killed and resumed, and under torchrun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from app.ml.checkpoint import list_versions, load_checkpoint
from app.ml.data.kaggle import KaggleDataset
from app.ml.data.split import Split, load_split, split_by_rows, split_by_sample, split_rows
from app.ml.data.synth import write_dataset
from app.ml.errors import CheckpointError
from app.ml.options import InferenceOptions
from app.ml.postprocess import InstanceConfig
from app.ml.scoring.evaluation import evaluate
from app.ml.serving.predictor import Predictor
from app.ml.serving.runner import native_bfloat16
from app.ml.training import trainset
from app.ml.training.augment import AugmentConfig, Example, augment
from app.ml.training.config import TrainConfig
from app.ml.training.run_files import STATE_FILE, load_resume_state
from app.ml.training.trainer import Trainer
from app.train import build_parser

pytestmark = pytest.mark.slow

TINY = ["--epochs", "3", "--epoch-size", "40", "--batch-size", "4", "--crop", "128", "--width", "8", "--depth", "2",
        "--input-size", "128", "--tile-size", "128", "--val-fraction", "0.34", "--torch-threads", "1",
        "--checkpoint-every", "5", "--no-tune-thresholds"]  # fmt: skip


def run_train(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "app.train", *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_resume_state(folder)[1]["model"]


# ---------------------------------------------------------------- quality


def test_a_few_minutes_of_training_is_far_above_an_untrained_network(trained_model, synth_train_data):
    card = json.loads((trained_model / "model.json").read_text())
    split = Split.from_dict(card["training"]["data"]["split"])
    dataset = KaggleDataset(synth_train_data)
    _, val_samples = load_split(dataset, split)
    checkpoint = load_checkpoint(trained_model)
    torch.manual_seed(0)
    untrained = Predictor(
        type(checkpoint.build_model())(checkpoint.architecture),
        checkpoint.preprocess,
        InstanceConfig(),
        InferenceOptions.float32(),
    )
    untrained_score = evaluate(untrained, val_samples).score
    trained_score = card["metrics"]["validation"]["score"]
    assert trained_score > 0.25, card["metrics"]
    assert trained_score > untrained_score + 0.2
    # The service's own predictor loads the checkpoint and reproduces the recorded score in float32, and comes
    # close to it in the reduced precision it serves in where the hardware has one (bfloat16 on CPUs that compute
    # it natively).
    exact = Predictor.from_checkpoint(trained_model, InferenceOptions.float32())
    assert evaluate(exact, val_samples).score == pytest.approx(trained_score)
    reduced = Predictor.from_checkpoint(trained_model, InferenceOptions(device="cpu", backend="torch", compile=False))
    assert abs(evaluate(reduced, val_samples).score - trained_score) < 0.05


def test_the_run_folder_has_everything_a_person_and_the_service_need(trained_model):
    names = {p.name for p in trained_model.iterdir()}
    assert {"model.json", "metrics.jsonl", "curves.png", "overlays.png", "split.json", STATE_FILE} <= names
    card = json.loads((trained_model / "model.json").read_text())
    assert card["architecture"]["base_width"] == 8
    assert set(card["postprocessing"]) >= set(InstanceConfig().to_dict()) | {"cell_type_classifier"}
    assert card["training"]["args"]["epochs"] == 24
    # --amp auto: bfloat16 autocast where this CPU computes it natively (about twice as fast), else float32.
    assert card["training"]["summary"]["amp"] == ("bfloat16" if native_bfloat16() else "off")
    assert len(card["training"]["data"]["fingerprint"]) == 64
    assert set(card["metrics"]["validation"]["per_cell_type"]) <= {"shsy5y", "astro", "cort"}
    assert "validation_default_thresholds" in card["metrics"]
    # The weights of the best validation score and the last ones were both tuned; the better is kept.
    assert card["training"]["summary"]["weights"] in (
        "where the schedule ended",
        f"of the best validation score, epoch {card['training']['summary']['best_epoch']}",
    )
    assert card["created_at"] and card["code_version"]
    lines = [json.loads(line) for line in (trained_model / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(1, 24 * 8 + 1))
    assert len([r for r in lines if r["kind"] == "val"]) == 6
    for picture in ("curves.png", "overlays.png"):
        assert (trained_model / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list_versions(trained_model.parent) == ["synth-v1"]


# ---------------------------------------------------------------- data


def test_split_by_sample_never_puts_a_sample_in_both_sets_and_validates_every_cell_type(synth_train_data):
    dataset = KaggleDataset(synth_train_data)
    split = split_by_sample(dataset, 0.34, seed=0)
    sample_of = {r.image_id: r.sample_id for r in dataset.records}
    type_of = {r.image_id: r.cell_type for r in dataset.records}
    assert {sample_of[i] for i in split.train_ids}.isdisjoint({sample_of[i] for i in split.val_ids})
    # Three samples of two images per type: one sample of each type validates.
    assert len(split.val_ids) == 6 and len(split.train_ids) == 12
    assert sorted(type_of[i] for i in split.val_ids) == sorted(["astro", "cort", "shsy5y"] * 2)
    assert split == split_by_sample(dataset, 0.34, seed=0)
    assert split != split_by_sample(dataset, 0.34, seed=1)


def test_a_single_sample_cannot_be_split_by_sample(sartorius):
    with pytest.raises(ValueError, match="--holdout-rows"):
        split_by_sample(KaggleDataset(sartorius), 0.2, seed=0)


def test_holding_out_the_bottom_rows_of_the_real_sample(sartorius):
    dataset = KaggleDataset(sartorius)
    assert split_by_rows(dataset, 0.2).kind == "rows"
    top, bottom = split_rows(dataset.load(0), 0.2)
    assert top.image.shape == (416, 448) and bottom.image.shape == (104, 448)
    for part in (top, bottom):
        assert np.unique(part.labels).tolist() == list(range(part.labels.max() + 1))
        assert len(part.cell_types) == part.labels.max()
    assert 20 < bottom.labels.max() < 100 and top.labels.max() + bottom.labels.max() >= 247


def test_augmentation_moves_image_and_targets_together():
    rng = np.random.default_rng(0)
    classes = np.zeros((300, 300), dtype=np.uint8)
    for _ in range(30):
        r, c = rng.integers(0, 280, size=2)
        classes[r : r + 20, c : c + 14] = rng.integers(1, 3)
    image = classes.astype(np.float32)
    example = Example(image, classes, image.astype(np.float16), image.astype(np.float16))
    config = AugmentConfig(crop=128, brightness=0.0, contrast=0.0, noise=0.0)
    for seed in range(5):
        out = augment(example, config, np.random.default_rng(seed))
        assert out.image.shape == out.classes.shape == out.weights.shape == out.centre.shape == (128, 128)
        assert np.array_equal(out.weights, out.image)  # same geometry, same interpolation
        assert np.array_equal(out.centre, out.image)
        assert np.mean(np.rint(out.image) == out.classes) > 0.97  # nearest vs linear differ only on edges
        assert not np.array_equal(out.image, image[:128, :128])


def test_weight_maps_are_computed_once_per_image_not_per_step(synth_dataset, tmp_path, monkeypatch):
    calls = []
    real = trainset.weight_map
    monkeypatch.setattr(trainset, "weight_map", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = TrainConfig(
        data=[str(synth_dataset)],
        out=str(tmp_path),
        version="once",
        epochs=2,
        epoch_size=24,
        batch_size=4,
        crop=64,
        width=4,
        depth=2,
        input_size=128,
        val_fraction=0.34,
        tune_thresholds=False,
    )
    trainer = Trainer(config)
    trainer.fit()
    assert len(calls) == len(trainer.examples) == 4
    assert trainer.state.step == 12


# ---------------------------------------------------------------- resume, processes, CLI


def test_a_run_killed_with_sigkill_and_resumed_ends_with_the_same_weights(synth_dataset, tmp_path):
    out = str(tmp_path)
    straight = run_train("--data", str(synth_dataset), "--out", out, "--version", "straight", *TINY)
    assert straight.wait(timeout=300) == 0, straight.stdout.read()

    killed = run_train("--data", str(synth_dataset), "--out", out, "--version", "killed", *TINY)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 17):
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    saved_step = json.loads(load_resume_state(tmp_path / "killed")[1]["run_state"])["step"]
    assert 0 < saved_step < 30, "the kill must land in the middle of the run"
    left_behind = tmp_path / "killed" / ".last.pt.k1ll3d.tmp"  # as a kill inside an atomic write leaves it
    left_behind.write_bytes(b"partial")

    resumed = run_train("--resume", str(tmp_path / "killed"))
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    assert not left_behind.exists(), "the resumed run cleans up the temp files of the killed one"
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "bit-exact on CPU with deterministic algorithms"
    cards = [json.loads((tmp_path / v / "model.json").read_text()) for v in ("straight", "killed")]
    assert cards[0]["weights"]["sha256"] == cards[1]["weights"]["sha256"]
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(x)["step"] for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_processes_under_torchrun_write_exactly_one_checkpoint(synth_dataset, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               "-m", "app.train", "--data", str(synth_dataset), "--out", str(tmp_path), *TINY]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    folders = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(folders) == 1 and list_versions(tmp_path) == [folders[0].name]
    assert len(list(folders[0].glob("weights-*.safetensors"))) == 1
    card = json.loads((folders[0] / "model.json").read_text())
    assert card["training"]["summary"]["world_size"] == 2
    train_steps = [
        json.loads(x)["step"]
        for x in (folders[0] / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["kind"] == "train"
    ]
    assert train_steps == list(range(1, 3 * 5 + 1))  # 40 crops per epoch over 2 processes, 4 each per step
    weights = load_file(folders[0] / card["weights"]["file"])
    assert not any(k.startswith("module.") for k in weights)


def test_the_paper_unpadded_network_trains_and_serves(synth_dataset, tmp_path):
    config = TrainConfig(
        data=[str(synth_dataset)],
        out=str(tmp_path),
        version="paper",
        epochs=1,
        epoch_size=8,
        batch_size=4,
        crop=92,
        width=4,
        depth=2,
        paper=True,
        input_size=92,
        val_fraction=0.34,
        tune_thresholds=False,
    )
    Trainer(config).fit()
    predictor = Predictor.from_checkpoint(tmp_path / "paper", InferenceOptions(backend="torch", compile=False))
    assert not predictor.architecture.padded
    assert predictor.predict(np.zeros((100, 130), np.float32)).labels.shape == (100, 130)
    with pytest.raises(ValueError, match="try 572"):
        Trainer(TrainConfig(**{**config.__dict__, "version": "bad", "crop": 90}))


def test_a_centre_model_trains_on_two_folders_and_chooses_its_instance_step(synth_dataset, tmp_path):
    more = write_dataset(tmp_path / "more", images=6, height=128, width=160, seed=8)
    out = tmp_path / "store"
    done = run_train("--data", str(synth_dataset), str(more), "--out", str(out), "--version", "centre", "--centre",
                     *TINY, "--tune-thresholds")  # fmt: skip
    assert done.wait(timeout=300) == 0, done.stdout.read()
    card = json.loads((out / "centre" / "model.json").read_text())
    assert card["architecture"]["centre"] is True
    assert len(card["training"]["data"]["paths"]) == 2 and card["training"]["data"]["images"] == 12
    split = card["training"]["data"]["split"]
    assert len(split["train"]) + len(split["val"]) == 12
    classifier = card["postprocessing"]["cell_type_classifier"]
    type_of = {r.image_id: r.cell_type for folder in (synth_dataset, more) for r in KaggleDataset(folder).records}
    assert classifier["types"] == sorted({type_of[i] for i in split["train"]}) and len(classifier["types"]) >= 2
    predictor = Predictor.from_checkpoint(
        out / "centre", InferenceOptions(device="cpu", backend="torch", compile=False)
    )
    image = KaggleDataset(more).load(0).image
    assert predictor.run_network(predictor.prepare(image).tiles).shape[1] == 4  # the classes and the centre map
    assert predictor.predict(image).cell_type in classifier["types"]

    # --init: another run starts from where this one ended (a lower first loss than from random weights) ...
    ended = str(out / "centre" / STATE_FILE)
    config = TrainConfig.from_dict(
        {
            **card["training"]["args"],
            "version": "longer",
            "init": ended,
            "epochs": 1,
            "threads": 0,
            "tune_thresholds": False,
        }
    )
    Trainer(config).fit()
    first_loss = [
        json.loads((out / v / "metrics.jsonl").read_text().splitlines()[0])["loss"] for v in ("centre", "longer")
    ]
    assert first_loss[1] < 0.8 * first_loss[0]
    # ... or from a model folder, but only from weights of the same architecture.
    with pytest.raises(CheckpointError, match="--width"):
        Trainer(
            TrainConfig.from_dict({**config.__dict__, "version": "wider", "width": 16, "init": str(out / "centre")})
        )


def test_help_explains_every_option():
    text = build_parser().format_help()
    for field in TrainConfig.__dataclass_fields__:
        assert "--" + field.replace("_", "-") in text
    assert "--resume" in text and "torchrun" in text


def test_bad_data_stops_with_a_message_not_a_traceback(tmp_path):
    command = [sys.executable, "-m", "app.train", "--data", str(tmp_path)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "not a labelled folder" in done.stderr and "Traceback" not in done.stderr


def test_oversampling_draws_a_cell_types_images_that_many_times_per_round():
    config = TrainConfig(data=[], oversample="astro=3")
    draws = config.draws(["astro", "cort", "shsy5y", "astro"])
    counts = np.bincount([item.image for item in trainset.EpochSampler(draws, 800, seed=0).items(0)])

    assert draws == [3, 1, 1, 3]
    np.testing.assert_array_equal(counts, [300, 100, 100, 300])  # 100 rounds of 8 draws
    plain = [item.image for item in trainset.EpochSampler(4, 40, seed=0).items(1)]
    assert plain == [item.image for item in trainset.EpochSampler([1, 1, 1, 1], 40, seed=0).items(1)]
    with pytest.raises(ValueError, match="TYPE=TIMES"):
        TrainConfig(data=[], oversample="astro").draws(["astro"])
