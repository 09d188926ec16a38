"""The companion entrypoints `evaluate`, `tune` and `predict`, run as a user runs them."""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest

from app.config import load_settings, worker_threads
from app.evaluate import main as evaluate
from app.ml import rle
from app.predict import main as predict
from app.tune import main as tune

pytestmark = pytest.mark.slow


def test_predict_on_the_real_test_images_writes_a_valid_submission(trained_model, sartorius, tmp_path, capsys):
    out = tmp_path / "submission.csv"
    predict(["--model", str(trained_model), "--images", str(sartorius / "test"), "--out", str(out)])
    with out.open() as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["id", "predicted"]
        rows = list(reader)
    ids = sorted({p.stem for p in (sartorius / "test").glob("*.png")})
    assert sorted({r["id"] for r in rows}) == ids
    for image_id in ids:
        covered = np.zeros((520, 704), dtype=bool)
        for row in (r for r in rows if r["id"] == image_id and r["predicted"]):
            mask = rle.decode(row["predicted"], (520, 704))
            assert mask.any() and not (covered & mask).any(), "masks of one image must not overlap"
            covered |= mask
    assert "wrote" in capsys.readouterr().out


def test_predict_writes_the_lab_formats_per_image_and_names_skips_and_counts_bad_files(
    trained_model, sartorius, tmp_path, capsys
):
    images = tmp_path / "plate"
    shutil.copytree(sartorius / "test", images)
    (images / "broken.png").write_bytes(b"not a png at all")
    out_dir = tmp_path / "cells"
    with pytest.raises(SystemExit) as exit_info:
        predict(["--model", str(trained_model), "--images", str(images), "--out", str(tmp_path / "s.csv"),
                 "--formats", "tiff", "geojson", "--out-dir", str(out_dir), "--no-compile"])  # fmt: skip
    assert exit_info.value.code == 1, "a skipped file makes the exit code say so"
    assert "skipped 1 of 4 files" in capsys.readouterr().err
    good = sorted(p.stem for p in (sartorius / "test").glob("*.png"))
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        [f"{stem}-labels.tif" for stem in good] + [f"{stem}.geojson" for stem in good]
    )
    with (tmp_path / "s.csv").open() as handle:
        assert {row["id"] for row in csv.DictReader(handle)} == set(good)


def test_evaluate_reproduces_the_validation_score_recorded_in_model_json(
    trained_model, synth_train_data, tmp_path, capsys
):
    report = tmp_path / "evaluation.json"
    evaluate(["--model", str(trained_model), "--data", str(synth_train_data), "--subset", "validation",
              "--json", str(report)])  # fmt: skip
    card = json.loads((trained_model / "model.json").read_text())
    result = json.loads(report.read_text())
    assert result["score"] == pytest.approx(card["metrics"]["validation"]["score"], abs=1e-9)
    assert result["per_cell_type"] == pytest.approx(card["metrics"]["validation"]["per_cell_type"])
    printed = capsys.readouterr().out
    assert f"score {result['score']:.4f}" in printed and "per IoU threshold" in printed


def test_evaluate_on_every_image_reports_each_cell_type(trained_model, synth_train_data, capsys):
    evaluate(["--model", str(trained_model), "--data", str(synth_train_data)])
    printed = capsys.readouterr().out
    assert "on 18 image(s)" in printed
    for cell_type in ("shsy5y", "astro", "cort"):
        assert cell_type in printed


def assert_same_instance_step(chosen: dict, card: dict) -> None:
    """The card's thresholds, per cell type too, and its classifier; the classifier's statistics to float rounding
    (a thousandth of a feature's spread): train reads its maps from the network as it trains (eager, float32), tune
    from the service's (compiled), and a pixel on a threshold may fall either way."""
    expected = card["postprocessing"]
    classifier, expected_classifier = chosen.pop("cell_type_classifier"), dict(expected["cell_type_classifier"])
    assert chosen == {k: v for k, v in expected.items() if k != "cell_type_classifier"}
    for name in ("centroids", "mean", "scale"):
        np.testing.assert_allclose(classifier.pop(name), expected_classifier.pop(name), rtol=1e-3, atol=1e-3)
    assert classifier == expected_classifier


def test_tune_chooses_the_instance_step_again_and_evaluate_reproduces_its_score(
    trained_model, synth_train_data, tmp_path, capsys
):
    model = tmp_path / "copy"
    shutil.copytree(trained_model, model)
    card = json.loads((model / "model.json").read_text())
    card["postprocessing"] = {}  # as if trained with --no-tune-thresholds
    (model / "model.json").write_text(json.dumps(card))
    tune(["--model", str(model), "--data", str(synth_train_data)])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    retuned = json.loads((model / "model.json").read_text())
    assert_same_instance_step(retuned["postprocessing"], json.loads((trained_model / "model.json").read_text()))
    assert printed["validation"] == pytest.approx(retuned["metrics"]["validation"]["score"])
    evaluate(["--model", str(model), "--data", str(synth_train_data), "--subset", "validation"])
    assert f"score {printed['validation']:.4f}" in capsys.readouterr().out


def test_tune_with_tta_keeps_its_choice_beside_the_one_without_and_evaluate_with_tta_reproduces_its_score(
    trained_model, synth_train_data, tmp_path, capsys
):
    model = tmp_path / "copy"
    shutil.copytree(trained_model, model)
    before = json.loads((model / "model.json").read_text())
    tune(["--model", str(model), "--data", str(synth_train_data), "--tta", "4", "--no-compile"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    card = json.loads((model / "model.json").read_text())
    assert printed["tta"] == 4
    assert card["postprocessing"] == before["postprocessing"]  # the choice without TTA is untouched
    assert card["metrics"]["validation"] == before["metrics"]["validation"]
    assert set(card["postprocessing_by_tta"]) == {"4"}
    assert printed["validation"] == pytest.approx(card["metrics"]["validation_tta_4"]["score"])
    evaluate(
        ["--model", str(model), "--data", str(synth_train_data), "--subset", "validation", "--tta", "4", "--no-compile"]
    )
    assert f"score {printed['validation']:.4f}" in capsys.readouterr().out


def test_a_model_that_does_not_exist_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        evaluate(["--model", str(tmp_path / "nope"), "--data", str(tmp_path)])
    assert info.value.code == 2
    assert "model folder" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["app.evaluate", "app.tune", "app.predict"])
def test_the_entrypoints_inference_options_have_the_services_names_and_defaults_scoring_in_float32(module):
    from importlib import import_module  # noqa: PLC0415 - one parser per parametrized entrypoint

    from app.cli import inference_options  # noqa: PLC0415
    from app.config import Settings  # noqa: PLC0415
    from app.ml.options import OPTION_NAMES  # noqa: PLC0415

    parser = import_module(module).build_parser()
    required = {"app.evaluate": ["--data", "x"], "app.tune": ["--data", "x"], "app.predict": ["--images", "x"]}
    args = parser.parse_args(required[module])
    service = Settings()
    scoring = module != "app.predict"  # evaluate and tune compute in float32, as train validates
    for name in OPTION_NAMES:
        expected = False if scoring and name == "half_precision" else getattr(service, name)
        assert getattr(args, name) == expected, name
    assert inference_options(args) == replace(service.inference, half_precision=not scoring)
    assert parser.parse_args([*required[module], "--half-precision"]).half_precision is True
    assert parser.parse_args([*required[module], "--no-half-precision", "--no-compile"]).compile is False


def test_settings_read_numbers_and_choices_from_environment_text(monkeypatch):
    """Environment variables are text: CELLSEG_TTA=4 is the choice 4, CELLSEG_WORKERS=2 two workers, each of them
    sharing out the CPUs this process may use."""
    monkeypatch.setenv("CELLSEG_TTA", "4")
    monkeypatch.setenv("CELLSEG_WORKERS", "2")
    monkeypatch.setenv("CELLSEG_STEPS_ON_DEVICE", "resize")
    settings = load_settings()
    assert (settings.tta, settings.workers, settings.steps_on_device) == (4, 2, "resize")
    assert worker_threads(settings) == max(1, len(os.sched_getaffinity(0)) // 2)
