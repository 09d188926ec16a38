"""Teaching a trained model a lab's cells: the defaults a fine-tuning run picks, cross-validation's folds, and labels
that leave out the cells the image's edge cuts."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from app.evaluate import main as evaluate
from app.ml.data.kaggle import Sample
from app.ml.data.labelled import open_labelled
from app.ml.data.split import Split, load_split
from app.ml.errors import CheckpointError, DatasetError
from app.ml.training.config import TrainConfig
from app.ml.training.finetune import MAX_STEPS, MIN_STEPS, LabelledSet, finetune_plan, plan_for
from app.ml.training.folds import fold_splits
from app.ml.training.trainset import TargetConfig, median_cell_diameter, prepare_example
from app.train import main as train
from app.tune import main as tune
from tests.conftest import MODEL_STORE, disk

DEFAULT_MODEL = MODEL_STORE / "sartorius-w16-v3"


@dataclass
class Record:
    image_id: str
    sample_id: str
    cell_type: str


def cells_of(radius: float, centres: list[tuple[int, int]], shape: tuple[int, int] = (200, 200)) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.int32)
    for number, centre in enumerate(centres, start=1):
        labels[disk(shape, centre, radius)] = number
    return labels


def test_the_median_cell_diameter_is_that_of_a_disk_of_the_median_area():
    labels = cells_of(20, [(40, 40), (120, 120)])
    assert median_cell_diameter([labels]) == pytest.approx(40, rel=0.03)
    assert median_cell_diameter([np.zeros((8, 8), dtype=np.int32)]) == 0.0


def test_folds_hold_out_every_sample_exactly_once_and_deal_each_type_round_the_folds():
    records = [Record(f"a{i}", f"a{i // 2}", "astro") for i in range(6)] + [
        Record(f"c{i}", f"c{i}", "cort") for i in range(4)
    ]
    splits = fold_splits(records, 3, seed=1)
    held_out = [i for split in splits for i in split.val_ids]
    assert sorted(held_out) == sorted(r.image_id for r in records)  # each image once
    for split in splits:
        assert set(split.train_ids).isdisjoint(split.val_ids)
        assert {r.sample_id for r in records if r.image_id in split.val_ids}.isdisjoint(
            {r.sample_id for r in records if r.image_id in split.train_ids}
        )  # whole samples
        assert {r.cell_type for r in records if r.image_id in split.val_ids} == {"astro", "cort"}
    assert fold_splits(records, 3, seed=1) == splits  # same seed, same folds
    with pytest.raises(ValueError, match="between 2 and 7"):
        fold_splits(records, 8, seed=1)


def test_leave_one_out_for_five_images_and_steps_from_the_cells_within_bounds():
    few = finetune_plan(16.0, LabelledSet(images=5, cells=28, cell_diameter=64.0), batch_size=8)
    assert few["folds"] == 5 and few["scale"] == "cells" and few["cell_diameter"] == 16.0
    assert few["epochs"] * few["epoch_size"] / 8 == MIN_STEPS  # 280 cells' steps are under the minimum
    many = finetune_plan(16.0, LabelledSet(images=40, cells=4000, cell_diameter=20.0), batch_size=8)
    assert many["folds"] == 0  # a held-out split is enough, and cheaper
    assert many["epochs"] * many["epoch_size"] / 8 == MAX_STEPS
    assert finetune_plan(16.0, LabelledSet(images=1, cells=9, cell_diameter=20.0), batch_size=8)["folds"] == 0


def test_crops_are_a_few_cells_wide_but_never_larger_than_the_images_at_the_working_scale():
    small_cells = finetune_plan(16.0, LabelledSet(images=5, cells=300, cell_diameter=16.0, shortest_side=520), 8)
    assert small_cells["crop"] == 128
    large_cells = finetune_plan(16.0, LabelledSet(images=5, cells=60, cell_diameter=112.0, shortest_side=512), 8)
    assert large_cells["crop"] == 80  # 512 px at 16 / 112 are 73 px: a larger crop would be padding


def test_the_plan_reads_the_models_cell_size_from_its_card_and_keeps_every_option_the_command_gave():
    config = TrainConfig(data=[], init=str(DEFAULT_MODEL), epochs=7, lr=1e-3)
    labels = [cells_of(30, [(50, 50), (140, 140)]) for _ in range(4)]
    planned = plan_for(config, {"data", "init", "epochs"}, labels)
    assert planned.epochs == 7  # given
    assert planned.lr != 1e-3 and planned.scale == "cells" and planned.folds == 4 and planned.unlabelled_edges
    recorded = json.loads((DEFAULT_MODEL / "model.json").read_text())["training"]["data"]["cell_diameter"]
    assert planned.cell_diameter == recorded
    # The working scale brings the lab's cells (60 px across) to the size the model learnt cells at.
    scale = planned.preprocess((200, 200), median_cell_diameter(labels)).pixel_scale
    assert scale[0] == scale[1] == pytest.approx(recorded / 60, rel=0.03)


def test_a_model_whose_card_has_no_cell_size_asks_for_one(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    card = json.loads((DEFAULT_MODEL / "model.json").read_text())
    card["training"]["data"].pop("cell_diameter")
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="--cell-diameter"):
        plan_for(TrainConfig(data=[], init=str(folder)), {"init"}, [cells_of(30, [(50, 50)])])


def test_unlabelled_edges_teach_no_background_along_the_edge_but_every_labelled_pixel():
    labels = cells_of(12, [(10, 100), (100, 100)])  # the first touches the top edge
    sample = Sample("s", np.random.default_rng(0).random((200, 200), dtype=np.float32), labels, ["lab"] * 2, {})
    plain = prepare_example(sample, (1.0, 1.0), TargetConfig())
    careful = prepare_example(sample, (1.0, 1.0), TargetConfig(), unknown_edge=15)
    band = np.ones((200, 200), dtype=bool)
    band[15:-15, 15:-15] = False
    assert np.all(plain.weights > 0)
    assert np.all(careful.weights[band & (labels == 0)] == 0)
    assert np.array_equal(careful.weights[labels > 0], plain.weights[labels > 0])
    assert np.array_equal(careful.weights[~band], plain.weights[~band])


@pytest.mark.slow
def test_fine_tuning_with_cross_validation_records_where_it_started_and_its_out_of_fold_score(
    trained_model: Path, tmp_path: Path, capsys
):
    from app.ml.data.synth import write_dataset  # noqa: PLC0415

    lab = write_dataset(tmp_path / "lab", images=4, height=160, width=160, seed=11)
    store = tmp_path / "store"
    tiny = "--epochs 2 --epoch-size 16 --batch-size 4 --torch-threads 1 --width 8 --depth 3"
    tiny += " --input-size 256 --tile-size 256"
    train([*f"--init {trained_model} --data {lab} --out {store} --version lab-v1 --folds 2".split(), *tiny.split()])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["version"] == "lab-v1" and summary["validation_kind"] == "out-of-fold" and 0 <= summary["seg"] <= 1
    card = json.loads((store / "lab-v1" / "model.json").read_text())
    base = json.loads((trained_model / "model.json").read_text())
    assert card["training"]["started_from"] == {"version": "synth-v1", "weights_sha256": base["weights"]["sha256"]}
    assert card["training"]["args"]["scale"] == "cells" and card["training"]["args"]["unlabelled_edges"]
    assert card["training"]["data"]["split"]["kind"] == "all" and card["training"]["data"]["split"]["val"] == []
    assert card["training"]["data"]["cell_diameter"] == pytest.approx(base["training"]["data"]["cell_diameter"], 0.05)
    validation = card["metrics"]["validation"]
    assert validation["kind"] == "out-of-fold" and validation["images"] == 4  # every image, each by a fold model
    assert [fold["images"] for fold in validation["folds"]] == [2, 2]
    assert set(validation["spread_across_folds"]) == {"score_std", "seg_std"}
    assert sorted(p.name for p in (store / "lab-v1" / "folds").iterdir()) == ["fold-1", "fold-2"]
    assert (store / "lab-v1" / "overlays.png").is_file()
    # evaluate and tune read the same folds: each image through the fold model that held it out.
    report = tmp_path / "evaluation.json"
    evaluate(["--model", str(store / "lab-v1"), "--data", str(lab), "--subset", "validation", "--json", str(report)])
    assert json.loads(report.read_text())["score"] == pytest.approx(validation["score"], abs=1e-6)
    assert json.loads(report.read_text())["seg"] == pytest.approx(validation["seg"], abs=1e-6)
    capsys.readouterr()
    tune(["--model", str(store / "lab-v1"), "--data", str(lab)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["validation"] == pytest.approx(
        validation["score"], abs=1e-3
    )


def test_a_split_naming_images_the_folders_lack_says_which_and_what_to_give(synth_dataset):
    data = open_labelled([synth_dataset])
    with pytest.raises(DatasetError, match=r"1 image\(s\) these folders do not hold, e.g. \['elsewhere'\]"):
        load_split(data, Split("sample", data.image_ids[:2], ["elsewhere"]))
