"""The training loop behind the `train` entrypoint: one process, or several under torchrun (DDP).

A run lives in model_store/<version>/: model.json + weights of the best validation score so far (written
atomically, servable at any moment), last.pt (everything --resume needs), metrics.jsonl, split.json,
curves.png and overlays.png. Only rank 0 writes.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import app
from app.ml.card import ModelCard, TrainingData, TrainingRecord
from app.ml.celltypes import image_contrast
from app.ml.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    load_checkpoint,
    read_card,
    remove_temp_files,
    save_checkpoint,
    set_default_version,
)
from app.ml.data.kaggle import KaggleFolders, Sample
from app.ml.errors import CheckpointError
from app.ml.postprocess import InstanceConfig
from app.ml.rules import InstanceRules
from app.ml.scoring.evaluation import Evaluation, instance_step_maps, score_maps, tune_rules
from app.ml.serving.predictor import Predictor
from app.ml.serving.runner import native_bfloat16, pick_device
from app.ml.training.augment import AugmentConfig
from app.ml.training.losses import segmentation_loss
from app.ml.training.plots import save_curves, save_overlays
from app.ml.training.trainset import (
    CropDataset,
    EpochSampler,
    Split,
    TargetConfig,
    load_split,
    prepare_example,
    split_by_rows,
    split_by_sample,
)
from app.ml.transforms import PreprocessConfig
from app.ml.unet import NUM_CLASSES, UNet, UNetConfig, center_crop

log = logging.getLogger("cellseg.train")
STATE_FILE = "last.pt"
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainConfig:
    """Every option of `train`; saved in last.pt and model.json, so a run can be resumed and reproduced."""

    data: list[str]
    out: str = "model_store"
    version: str = ""
    seed: int = 0
    epochs: int = 30
    epoch_size: int = 0
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: float = 0.05
    width: int = 16
    depth: int = 4
    paper: bool = False
    input_size: int = 572
    scale: str = "resize"
    reference_size: str = ""
    tile_size: int = 512
    border_width: int = 1
    w0: float = 10.0
    sigma: float = 5.0
    dice_weight: float = 0.0
    centre: bool = False
    centre_weight: float = 1.0
    crop: int = 256
    elastic_std: float = 10.0
    augment: bool = True
    val_fraction: float = 0.2
    holdout_rows: float = 0.0
    val_every: int = 1
    tune_thresholds: bool = True
    device: str = "auto"
    amp: str = "auto"
    workers: int = 0
    torch_threads: int = 0
    checkpoint_every: int = 50
    set_default: bool = False
    init: str = ""
    oversample: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        if isinstance(values.get("data"), str):  # runs saved before several folders were accepted
            values["data"] = [values["data"]]
        return cls(**values)

    def draws(self, cell_types: list[str]) -> list[int]:
        """How often each training image (of these cell types) is drawn per round: --oversample 'astro=3,cort=2'
        draws the images of those types that many times, every other image once."""
        counts = {}
        for part in filter(None, self.oversample.split(",")):
            name, _, times = part.partition("=")
            if not times.strip().isdigit() or int(times) < 1:
                raise ValueError(f"--oversample takes TYPE=TIMES[,TYPE=TIMES...] with whole TIMES >= 1, not {part!r}")
            counts[name.strip()] = int(times)
        return [counts.get(cell_type, 1) for cell_type in cell_types]

    def architecture(self) -> UNetConfig:
        """--paper keeps the paper's unpadded convolutions; batch norm stays on, as it trains faster."""
        return UNetConfig(in_channels=1, num_classes=NUM_CLASSES, base_width=self.width, depth=self.depth,
                          padded=not self.paper, centre=self.centre)  # fmt: skip

    def preprocess(self, first_image_shape: tuple[int, int]) -> PreprocessConfig:
        """Pixel scale: 'resize' trains at the scale the service's resize mode gives images of the reference size
        (default: the first image's own size); 'native' trains at the images' own pixels (for tile mode)."""
        architecture = self.architecture()
        margin = math.ceil(architecture.receptive_radius() / architecture.stride) * architecture.stride
        if self.scale == "native":
            pixel_scale = (1.0, 1.0)
        else:
            ref = parse_size(self.reference_size) if self.reference_size else first_image_shape
            pixel_scale = (self.input_size / ref[0], self.input_size / ref[1])
        return PreprocessConfig(
            input_size=self.input_size, pixel_scale=pixel_scale, tile_size=self.tile_size, tile_margin=margin
        )


def parse_size(text: str) -> tuple[int, int]:
    """'520x704' (height x width) -> (520, 704)."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"expected a size as HEIGHTxWIDTH such as 520x704, got {text!r}") from None
    return height, width


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
    """Owns one run: data, model, optimizer, and the files in its folder."""

    def __init__(self, config: TrainConfig, resume_state: dict[str, Any] | None = None) -> None:
        self.dist = init_distributed()
        self.config = config
        if not config.version:
            config.version = _shared_version(self.dist)
        self.folder = Path(config.out) / config.version
        self.device = _device_for(config.device, self.dist)
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        self._load_data(resume_state)
        self._build_model()
        self.state = RunState()
        self.kept = "best"  # which weights the model folder holds; _finish may switch to the last ones
        if resume_state is not None:
            self._restore(resume_state)

    # ------------------------------------------------------------------ setup

    def _load_data(self, resume_state: dict[str, Any] | None) -> None:
        cfg = self.config
        self.dataset = KaggleFolders(cfg.data)
        if resume_state is not None:
            self.split = Split.from_dict(resume_state["split"])
        elif cfg.holdout_rows:
            self.split = split_by_rows(self.dataset, cfg.holdout_rows)
        else:
            self.split = split_by_sample(self.dataset, cfg.val_fraction, cfg.seed)
        self.train_samples, self.val_samples = load_split(self.dataset, self.split)
        self.preprocess = cfg.preprocess(self.dataset.load(0).image.shape)
        targets = TargetConfig(cfg.border_width, cfg.w0, cfg.sigma)
        progress = tqdm(self.train_samples, desc="targets", unit="img", disable=not self.dist.is_main, leave=False)
        self.examples = [prepare_example(s, self.preprocess.pixel_scale, targets) for s in progress]
        self.train_cells = sum(int(s.labels.max()) for s in self.train_samples)
        self.fingerprint = self.dataset.fingerprint() if self.dist.is_main else ""

    def _build_model(self) -> None:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        self.architecture = cfg.architecture()
        self.architecture.output_size(cfg.crop)  # an unpadded network refuses crops it cannot take, with a hint
        self.model = UNet(self.architecture)
        if cfg.init:
            self.model.load_state_dict(_initial_weights(cfg.init, self.architecture))
        self.model = self.model.to(self.device)
        self.net = self.model
        if self.dist.world > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=device_ids)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        epoch_size = cfg.epoch_size or len(self.examples)
        draws = cfg.draws([sample.cell_type for sample in self.train_samples])
        self.sampler = EpochSampler(draws, epoch_size, cfg.seed, self.dist.rank, self.dist.world)
        self.steps_per_epoch = math.ceil(len(self.sampler.items(0)) / cfg.batch_size)
        total = cfg.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _warmup_cosine(total, cfg.warmup))
        self.amp_dtype, self.use_amp = _amp_settings(cfg.amp, self.device)
        scaler_on = self.use_amp and self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=scaler_on)
        crops = CropDataset(
            self.examples, AugmentConfig(crop=cfg.crop, elastic_std=cfg.elastic_std), cfg.seed, enabled=cfg.augment
        )
        self.loader = DataLoader(
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

    def fit(self) -> dict[str, Any] | None:
        """Train to the end; returns the final model card on rank 0."""
        if self.dist.is_main:
            self._start_files()
        cfg = self.config
        while self.state.epoch < cfg.epochs:
            self._train_epoch()
            if (self.state.epoch + 1) % cfg.val_every == 0 or self.state.epoch + 1 == cfg.epochs:
                self._validate()
            self.state.epoch, self.state.batch = self.state.epoch + 1, 0
            self._save_state()
        card = self._finish() if self.dist.is_main else None
        if self.dist.world > 1:
            dist.barrier()
            dist.destroy_process_group()
        return card

    def _train_epoch(self) -> None:
        self.sampler.set_epoch(self.state.epoch, skip=self.state.batch * self.config.batch_size)
        self.net.train()
        bar = tqdm(
            self.loader,
            desc=f"epoch {self.state.epoch + 1}/{self.config.epochs}",
            unit="batch",
            initial=self.state.batch,
            total=self.steps_per_epoch,
            disable=not self.dist.is_main,
        )
        for images, classes, weights, centre in bar:
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
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{record['images_per_s']:.1f}")
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

    # ------------------------------------------------------------------ validation and files

    def _validate(self) -> None:
        if self.dist.is_main:
            scored = self._val_probabilities()
            evaluation = score_maps(scored, InstanceRules())
            self._log(
                {
                    "kind": "val",
                    "epoch": self.state.epoch,
                    "step": self.state.step,
                    "score": evaluation.score,
                    "per_cell_type": evaluation.per_cell_type,
                    "per_threshold": evaluation.per_threshold,
                }
            )
            log.info(
                "epoch %d: validation score %.4f %s", self.state.epoch + 1, evaluation.score, evaluation.per_cell_type
            )
            if evaluation.score > self.state.best_score:
                self.state.best_score, self.state.best_epoch = evaluation.score, self.state.epoch
                self._write_model(InstanceRules(), evaluation, scored)
            save_curves(self.state.history, self.folder / "curves.png")
        if self.dist.world > 1:
            dist.barrier()

    def _val_probabilities(self) -> list[tuple[Sample, np.ndarray]]:
        predictor = Predictor(self.model, self.preprocess, InstanceRules(), device=self.device, channels_last=False)
        try:
            return [(sample, instance_step_maps(predictor, sample.image)) for sample in self.val_samples]
        finally:
            self.model.train()

    def _finish(self) -> ModelCard:
        """Choose the instance step (thresholds, per cell type, and the type classifier) on the split's images for
        two sets of weights, those of the best validation score with the default thresholds and those where the
        schedule ended, and keep the better of the two as tuned; then write the final card.

        Both compete because the score with default thresholds is a noisy guide: weights that score lower with
        them can score higher with thresholds of their own."""
        card = read_card(self.folder)
        if not self.config.tune_thresholds:
            return card
        last = Predictor(self.model, self.preprocess, InstanceRules(), device=self.device, channels_last=False)
        best = Predictor.from_checkpoint(self.folder, device=str(self.device), half_precision=False)
        tuned = {
            name: tune_model(p, self.train_samples, self.val_samples) for name, p in (("best", best), ("last", last))
        }
        self.kept = max(tuned, key=lambda name: tuned[name][1].score)
        log.info("kept the %s weights: tuned validation score %.4f (the other: %.4f)", self.kept,
                 tuned[self.kept][1].score, min(t[1].score for t in tuned.values()))  # fmt: skip
        if self.kept == "best":
            self.model.load_state_dict(best.runner.model.state_dict())
        rules, evaluation, scored = tuned[self.kept]
        return self._write_model(rules, evaluation, scored, untuned=card.metrics["validation"])

    def _write_model(
        self,
        instances: InstanceRules,
        evaluation: Evaluation,
        scored: list[tuple[Sample, np.ndarray]],
        untuned: dict | None = None,
    ) -> ModelCard:
        card = self._card(instances, evaluation, untuned)
        card = save_checkpoint(self.folder, self.model.state_dict(), card)
        overlays = [
            (s.image_id, s.image, s.labels, instances.find(maps, image_contrast(s.image)).labels)
            for s, maps in scored[:3]
        ]
        save_overlays(overlays, self.folder / "overlays.png")
        if self.config.set_default:
            set_default_version(self.config.out, self.config.version)
        return card

    def _card(self, instances: InstanceRules, evaluation: Evaluation, untuned: dict | None) -> ModelCard:
        metrics = {"validation": evaluation.to_dict()}
        if untuned is not None:
            metrics["validation_default_thresholds"] = untuned
        data = TrainingData(
            paths=[str(folder) for folder in self.config.data],  # as given: the host's layout stays out of the card
            fingerprint=self.fingerprint,
            images=len(self.dataset),
            train_cells=self.train_cells,
            split=self.split.to_dict(),
        )
        return ModelCard(
            version=self.config.version,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            code_version=code_version(),
            architecture=self.architecture,
            preprocessing=self.preprocess,
            postprocessing=instances,
            training=TrainingRecord(args=asdict(self.config), data=data, summary=self._summary()),
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

    def _start_files(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_temp_files(self.folder)  # a run killed inside an atomic write leaves its temp file behind
        atomic_write_json(self.folder / "split.json", self.split.to_dict())
        # A resumed run replays from its saved step: later lines of the killed run are dropped.
        kept = [json.dumps(h) + "\n" for h in self.state.history]
        atomic_write_bytes(self.folder / METRICS_FILE, "".join(kept).encode())

    def _log(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        self.state.history.append(record)
        with (self.folder / METRICS_FILE).open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _save_state(self) -> None:
        if not self.dist.is_main:
            return
        state = {
            "config": json.dumps(asdict(self.config)),
            "split": self.split.to_dict(),
            "run_state": json.dumps(asdict(self.state)),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.folder / STATE_FILE, buffer.getvalue())


def tune_model(
    predictor: Predictor, train: list[Sample], validation: list[Sample]
) -> tuple[InstanceRules, Evaluation, list[tuple[Sample, np.ndarray]]]:
    """tune_rules for a trained model: its probabilities on both sets, then the chosen rules, their evaluation on
    validation, and the validation probabilities (for overlays)."""
    bar = partial(tqdm, unit="img", leave=False)
    train_scored = [(s, instance_step_maps(predictor, s.image)) for s in bar(train, desc="tune: training images")]
    val_scored = [(s, instance_step_maps(predictor, s.image)) for s in bar(validation, desc="tune: validation images")]
    rules, evaluation = tune_rules(train_scored, val_scored, InstanceConfig())
    log.info("instance step chosen on validation: %s -> score %.4f %s", rules.to_dict(), evaluation.score,
             evaluation.per_cell_type)  # fmt: skip
    return rules, evaluation, val_scored


def load_resume_state(folder: str | Path) -> tuple[TrainConfig, dict[str, Any]]:
    """Read last.pt of a run folder without executing pickled code (weights_only)."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --resume takes a run folder such as model_store/<version>")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return TrainConfig.from_dict(json.loads(saved["config"])), saved


def code_version() -> str:
    """The package version, plus the git commit when run from a checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{app.__version__}+{commit}" if commit else app.__version__


def _initial_weights(source: str, architecture: UNetConfig) -> dict[str, torch.Tensor]:
    """The weights to start from (--init): a model folder's, or a run's last weights (its last.pt, which holds
    where its schedule ended rather than its best validation). Their architecture must be the one asked for."""
    if Path(source).name == STATE_FILE:
        config, saved = load_resume_state(Path(source).parent)
        found, weights = config.architecture(), saved["model"]
    else:
        checkpoint = load_checkpoint(source)
        found, weights = checkpoint.architecture, checkpoint.state_dict
    if found != architecture:
        raise CheckpointError(
            f"--init {source} is a {found} but this run trains a {architecture}: "
            "give the same --width, --depth, --paper and --centre"
        )
    return weights


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
