"""The training loop behind the `train` entrypoint: one process, or several under torchrun (DDP).

Read top to bottom: the data (a split of labelled images, their targets computed once), the model and its
optimizer, the loop, validation with the service's own instance step, and the instance step chosen at the end.
The run's files are RunFiles' job; choosing thresholds is scoring's.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from app.ml.card import ModelCard, TrainingData, TrainingRecord
from app.ml.celltypes import image_contrast
from app.ml.checkpoint import load_checkpoint, read_card
from app.ml.data.labelled import LabelledFolders, open_labelled
from app.ml.data.split import Split, load_split, split_by_rows, split_by_sample
from app.ml.options import InferenceOptions
from app.ml.rules import InstanceRules
from app.ml.scoring.evaluation import Evaluation, instance_step_maps, score_maps
from app.ml.scoring.tuning import Scored, tune_model
from app.ml.serving.predictor import Predictor
from app.ml.serving.runner import native_bfloat16, pick_device
from app.ml.training.augment import AugmentConfig, Example
from app.ml.training.config import TrainConfig
from app.ml.training.losses import segmentation_loss
from app.ml.training.run_files import Overlay, RunFiles, code_version, initial_weights
from app.ml.training.trainset import CropDataset, EpochSampler, TargetConfig, median_cell_diameter, prepare_example
from app.ml.unet import UNet, center_crop

log = logging.getLogger("cellseg.train")


@dataclass
class RunState:
    """What changes while training; with the model and optimizer, all that --resume needs."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best_score: float = -1.0
    best_epoch: int = -1
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class ChosenStep:
    """An instance step chosen outside the run (on cross-validation's out-of-fold maps), with its evaluation and
    the maps it was scored on: the card of a run that has no validation images of its own records these."""

    rules: InstanceRules
    evaluation: Evaluation
    scored: Scored
    figures: dict[str, Any] = field(default_factory=dict)  # more for the card to keep: each fold's figures


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Distributed:
    """Join the torchrun process group when started by torchrun (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


class Trainer:
    """Owns one run: its data, model, optimizer and loop; RunFiles writes its folder.

    `split` overrides the split the options describe (cross-validation's folds, or every image with none held out);
    a run without validation images records `chosen`, the instance step chosen for it elsewhere. `dataset` is the
    options' data, already opened.
    """

    def __init__(
        self,
        config: TrainConfig,
        resume_state: dict[str, Any] | None = None,
        split: Split | None = None,
        chosen: ChosenStep | None = None,
        progress_label: str = "",
        dataset: LabelledFolders | None = None,
    ) -> None:
        self.dist = init_distributed()
        self.config, self.chosen, self.progress_label = config, chosen, progress_label
        if not config.version:
            config.version = _shared_version(self.dist)
        self.files = RunFiles(_run_folder(config), self.dist.is_main)
        self.device = _device_for(config.device, self.dist)
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        # The data
        self.dataset = dataset or open_labelled(config.data, config.cell_type or None)
        self.split = _choose_split(self.dataset, config, resume_state, split)
        self.train_samples, self.val_samples = load_split(self.dataset, self.split)
        if not self.val_samples and chosen is None:
            raise ValueError("a run without validation images needs an instance step chosen elsewhere")
        self.cell_diameter = median_cell_diameter([s.labels for s in self.train_samples])
        self.preprocess = config.preprocess(self.dataset.load(0).image.shape, self.cell_diameter)
        self.examples = self._examples()
        self.fingerprint = self.dataset.fingerprint() if self.dist.is_main else ""
        # The model and its optimizer
        torch.manual_seed(config.seed)
        self.architecture = config.architecture()
        self.architecture.output_size(config.crop)  # an unpadded network refuses crops it cannot take, with a hint
        self.model = UNet(self.architecture)
        if config.init:
            self.model.load_state_dict(initial_weights(config.init, self.architecture))
        self.model = self.model.to(self.device)
        self.net = self._parallel(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        draws = config.draws([sample.cell_type for sample in self.train_samples])
        epoch_size = config.epoch_size or len(self.examples)
        self.sampler = EpochSampler(draws, epoch_size, config.seed, self.dist.rank, self.dist.world)
        self.steps_per_epoch = math.ceil(len(self.sampler.items(0)) / config.batch_size)
        schedule = _warmup_cosine(config.epochs * self.steps_per_epoch, config.warmup)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.amp_dtype, self.use_amp = _amp_settings(config.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.loader = self._loader()
        self.state = RunState()
        self.kept = "best"  # which weights the model folder holds; _finish may switch to the last ones
        self.last_scored: Scored = []  # the validation maps of the latest validation
        if resume_state is not None:
            self._restore(resume_state)

    def _examples(self) -> list[Example]:
        cfg = self.config
        targets = TargetConfig(cfg.border_width, cfg.w0, cfg.sigma)
        # Labels that leave out the cells cut by the image's edge teach nothing there: half a cell of background
        # along the edge (at the network's scale) is not counted as background.
        edge = round(self.cell_diameter * math.sqrt(math.prod(self.preprocess.pixel_scale)) / 2)
        progress = tqdm(self.train_samples, desc="targets", unit="img", disable=not self.dist.is_main, leave=False)
        return [
            prepare_example(s, self.preprocess.pixel_scale, targets, edge if cfg.unlabelled_edges else 0)
            for s in progress
        ]

    def _parallel(self, model: UNet) -> torch.nn.Module:
        if self.dist.world == 1:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def _loader(self) -> DataLoader:
        cfg = self.config
        augment = AugmentConfig(crop=cfg.crop, elastic_std=cfg.elastic_std)
        crops = CropDataset(self.examples, augment, cfg.seed, enabled=cfg.augment)
        return DataLoader(
            crops,
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            num_workers=cfg.workers,
            pin_memory=self.device.type == "cuda",
        )

    def _restore(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        self.state = RunState(**json.loads(saved["run_state"]))

    # ------------------------------------------------------------------ the loop

    def fit(self) -> ModelCard | None:
        """Train to the end; returns the final model card on rank 0."""
        self.files.start(self.split.to_dict(), self.state.history)
        cfg = self.config
        bar = tqdm(
            total=cfg.epochs * self.steps_per_epoch,
            initial=self.state.step,
            desc=f"{self.progress_label or cfg.version}: train",
            unit="step",
            disable=not self.dist.is_main,
        )
        with bar:
            while self.state.epoch < cfg.epochs:
                self._train_epoch(bar)
                last_epoch = self.state.epoch + 1 == cfg.epochs
                if self.val_samples and ((self.state.epoch + 1) % cfg.val_every == 0 or last_epoch):
                    self._validate()
                self.state.epoch, self.state.batch = self.state.epoch + 1, 0
                self._save_state()
        card = self._finish() if self.dist.is_main else None
        if self.dist.world > 1:
            dist.barrier()
            dist.destroy_process_group()
        return card

    def _train_epoch(self, bar: tqdm) -> None:
        self.sampler.set_epoch(self.state.epoch, skip=self.state.batch * self.config.batch_size)
        self.net.train()
        for images, classes, weights, centre in self.loader:
            started = time.perf_counter()
            loss = self._step(images, classes, weights, centre)
            elapsed = time.perf_counter() - started
            self.state.batch += 1
            self.state.step += 1
            self.state.seconds += elapsed
            record = {
                "kind": "train",
                "epoch": self.state.epoch,
                "step": self.state.step,
                "loss": loss,
                "lr": self.scheduler.get_last_lr()[0],
                "images_per_s": len(images) * self.dist.world / elapsed,
            }
            self._log(record)
            bar.update()
            bar.set_postfix(epoch=f"{self.state.epoch + 1}/{self.config.epochs}", loss=f"{loss:.4f}")
            if self.state.step % self.config.checkpoint_every == 0:
                self._save_state()

    def _step(self, images: torch.Tensor, *targets: torch.Tensor) -> float:
        images = images.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            logits = self.net(images)
        # The paper's unpadded network answers for the centre of its input only: score that centre.
        classes, weights, centre = (
            center_crop(t.to(self.device, non_blocking=True), logits.shape[-2:]) for t in targets
        )
        loss = segmentation_loss(logits, classes, weights, centre, self.config.dice_weight, self.config.centre_weight)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        loss = loss.detach()
        if self.dist.world > 1:  # report the mean over processes, so the log is the same whoever writes it
            loss = loss.clone()
            dist.all_reduce(loss)
            loss /= self.dist.world
        return float(loss)

    # ------------------------------------------------------------------ validation and the model's files

    def _validate(self) -> None:
        if self.dist.is_main:
            self.last_scored = self._val_maps()
            evaluation = score_maps(self.last_scored, InstanceRules())
            self._log({"kind": "val", "epoch": self.state.epoch, "step": self.state.step, **_figures(evaluation)})
            log.info(
                "epoch %d: validation score %.4f, SEG %.4f %s",
                self.state.epoch + 1,
                evaluation.score,
                evaluation.seg,
                evaluation.per_cell_type,
            )
            if evaluation.score > self.state.best_score:
                self.state.best_score, self.state.best_epoch = evaluation.score, self.state.epoch
                self._save_model(InstanceRules(), evaluation, self.last_scored)
            self.files.save_curves(self.state.history)
        if self.dist.world > 1:
            dist.barrier()

    def _val_maps(self) -> Scored:
        predictor = self._predictor()
        try:
            return [(sample, instance_step_maps(predictor, sample.image)) for sample in self.val_samples]
        finally:
            self.model.train()

    def _predictor(self) -> Predictor:
        """The model as it is now, run as the service runs it (in float32, as validation scores it)."""
        return Predictor(
            self.model, self.preprocess, InstanceRules(), InferenceOptions.float32(self.device), channels_last=False
        )

    def _finish(self) -> ModelCard:
        """The final card. With an instance step chosen elsewhere (cross-validation), the last weights with it.
        Otherwise the instance step (thresholds, per cell type, and the type classifier) is chosen on the split's
        images for two sets of weights, those of the best validation score with the default thresholds and those
        where the schedule ended, and the better of the two is kept: the score with default thresholds is a noisy
        guide, and weights that score lower with them can score higher with thresholds of their own."""
        if self.chosen is not None:
            self.kept = "last"
            step = self.chosen
            return self._save_model(step.rules, step.evaluation, step.scored, step.figures, kind="out-of-fold")
        card = read_card(self.files.folder)
        if not self.config.tune_thresholds:
            return card
        best = Predictor.from_checkpoint(self.files.folder, InferenceOptions.float32(self.device))
        tuned = {
            name: tune_model(predictor, self.train_samples, self.val_samples)
            for name, predictor in (("best", best), ("last", self._predictor()))
        }
        self.kept = max(tuned, key=lambda name: tuned[name][1].score)
        other = min(t[1].score for t in tuned.values())
        log.info(
            "kept the %s weights: tuned validation score %.4f (the other: %.4f)",
            self.kept,
            tuned[self.kept][1].score,
            other,
        )
        if self.kept == "best":
            self.model.load_state_dict(best.runner.model.state_dict())
        rules, evaluation, scored = tuned[self.kept]
        return self._save_model(rules, evaluation, scored, untuned=card.metrics["validation"])

    def _save_model(
        self,
        rules: InstanceRules,
        evaluation: Evaluation,
        scored: Scored,
        figures: dict[str, Any] | None = None,
        untuned: dict | None = None,
        kind: str = "held-out",
    ) -> ModelCard:
        metrics = {"validation": {"kind": kind, **evaluation.to_dict(), **(figures or {})}}
        if untuned is not None:
            metrics["validation_default_thresholds"] = untuned
        overlays: list[Overlay] = [
            (s.image_id, s.image, s.labels, rules.find(maps, image_contrast(s.image)).labels) for s, maps in scored[:3]
        ]
        store_default = self.config.out if self.config.set_default else ""
        return self.files.save_model(self.model.state_dict(), self._card(rules, metrics), overlays, store_default)

    def _card(self, rules: InstanceRules, metrics: dict[str, Any]) -> ModelCard:
        scale = math.sqrt(math.prod(self.preprocess.pixel_scale))
        data = TrainingData(
            paths=[str(folder) for folder in self.config.data],  # as given: the host's layout stays out of the card
            fingerprint=self.fingerprint,
            images=len(self.dataset),
            train_cells=sum(int(s.labels.max()) for s in self.train_samples),
            split=self.split.to_dict(),
            cell_diameter=round(self.cell_diameter * scale, 2),
            layouts=dict(self.dataset.layouts),
        )
        return ModelCard(
            version=self.config.version,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            code_version=code_version(),
            architecture=self.architecture,
            preprocessing=self.preprocess,
            postprocessing=rules,
            training=TrainingRecord(
                args=asdict(self.config),
                data=data,
                summary=self._summary(),
                started_from=_started_from(self.config.init),
            ),
            metrics=metrics,
        )

    def _summary(self) -> dict[str, Any]:
        return {
            "epochs_done": min(self.state.epoch + 1, self.config.epochs),
            "steps": self.state.step,
            "train_seconds": round(self.state.seconds, 1),
            "best_epoch": self.state.best_epoch + 1,
            "weights": {
                "best": f"of the best validation score, epoch {self.state.best_epoch + 1}",
                "last": "where the schedule ended",
            }.get(self.kept, "of the best validation score"),
            "device": str(self.device),
            "world_size": self.dist.world,
            "amp": str(self.amp_dtype).removeprefix("torch.") if self.use_amp else "off",
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }

    def _log(self, record: dict) -> None:
        if self.dist.is_main:
            self.state.history.append(record)
            self.files.log(record)

    def _save_state(self) -> None:
        self.files.save_state(
            {
                "config": json.dumps(asdict(self.config)),
                "split": self.split.to_dict(),
                "run_state": json.dumps(asdict(self.state)),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
            }
        )


def _figures(evaluation: Evaluation) -> dict[str, Any]:
    """What metrics.jsonl keeps of a validation."""
    keep = ("score", "per_cell_type", "per_threshold", "seg", "seg_per_cell_type")
    return {key: value for key, value in evaluation.to_dict().items() if key in keep}


def _choose_split(
    dataset: LabelledFolders, config: TrainConfig, resume_state: dict[str, Any] | None, split: Split | None
) -> Split:
    if split is not None:
        return split
    if resume_state is not None:
        return Split.from_dict(resume_state["split"])
    if config.holdout_rows:
        return split_by_rows(dataset, config.holdout_rows)
    return split_by_sample(dataset, config.val_fraction, config.seed)


def _started_from(init: str) -> dict[str, str]:
    """The model a fine-tuned run started from: its version and the sha256 of its weights."""
    if not init or init.endswith(".pt"):
        return {"path": init} if init else {}
    card = load_checkpoint(init).card
    return {"version": card.version, "weights_sha256": card.weights.sha256 if card.weights else ""}


def _run_folder(config: TrainConfig) -> Path:
    return Path(config.out) / config.version


def _warmup_cosine(total_steps: int, warmup: float) -> Callable[[int], float]:
    warmup_steps = max(1, round(total_steps * warmup))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _amp_settings(amp: str, device: torch.device) -> tuple[torch.dtype, bool]:
    """Mixed precision by default where the hardware computes it natively: on CUDA (bfloat16 where supported, else
    float16 with loss scaling) and on CPUs with native bfloat16, where a training step takes about half as long
    (docs/training.md); elsewhere on the CPU bfloat16 is emulated, and float32 is faster."""
    native = device.type == "cuda" or (device.type == "cpu" and native_bfloat16())
    enabled = amp == "on" or (amp == "auto" and native)
    if device.type == "cuda":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16), enabled
    return torch.bfloat16, enabled


def _device_for(requested: str, distributed: Distributed) -> torch.device:
    device = pick_device(requested)
    if device.type == "cuda" and distributed.world > 1:
        torch.cuda.set_device(distributed.local_rank)
        return torch.device("cuda", distributed.local_rank)
    return device


def _shared_version(distributed: Distributed) -> str:
    """A timestamped version name, the same in every process."""
    names = [datetime.now(UTC).strftime("unet-%Y%m%d-%H%M%S")]
    if distributed.world > 1:
        dist.broadcast_object_list(names, src=0)
    return names[0]
