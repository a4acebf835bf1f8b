"""Object detection with separate feedback weights: RetinaNet on COCO (METHOD 8).

Data, model, rule conversion and box AP are :mod:`spikealign.detection`'s; the epoch loop, run
directory, checkpoints, exact resume and ``torchrun`` ranks are :mod:`spikealign.trainer.loop`'s
and :mod:`spikealign.trainer.distributed`'s, as for classification. Each epoch ``e = 1..E``:

1. One pass of SGD (momentum 0.9, weight decay 1e-4) over the training images, the global batch
   split over the ranks; loss = focal classification loss + box regression loss (torchvision's
   RetinaNet). After every step :func:`spikealign.feedback.step_feedback` (kp / wm). Learning rate
   of iteration ``i`` (from 0) of epoch ``e`` (torchvision's detection reference)::

       lr(e, i) = lr * gamma^(number of milestones m with e > m) * w(e, i)
       w(1, i)  = f + (1 - f) * i / n   for i < n = min(warmup_iterations, iterations_per_epoch - 1)
       w        = 1                      otherwise

   with f = ``warmup_factor``; the defaults (lr 0.01 at global batch 16, f 0.001, n 1000,
   gamma 0.1 at epochs 16 and 22, 26 epochs) are the recipe of METHOD 8.
2. Box AP on the validation images (each rank detects its share, rank 0 scores with COCOeval):
   AP, AP50, AP75, APs, APm, APl, one column each in ``metrics.csv``.

Reproducibility: model initialisation from ``seed``; the training order from the loop's per-epoch
generator (or DistributedSampler's epoch seed), flips from :func:`spikealign.detection.flip_coin`,
so a resumed run ends with the numbers of an uninterrupted one (same device and ranks).
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from spikealign import detection, feedback
from spikealign.errors import UserError
from spikealign.trainer import distributed, loop
from spikealign.trainer.config import check_finite, check_seed, config_from_dict, epoch_seed

#: Config fields a resumed run may change: where and how it executes, and its length.
DETECT_RUNTIME_FIELDS = ("data_dir", "device", "dist_backend", "workers", "epochs")
#: The --limit-train/--limit-test subsets are drawn with this seed (the same for every run).
SUBSET_SEED = 0
LOSS_KEYS = ("classification", "bbox_regression")
METRIC_COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "train_classification_loss",
    "train_box_loss",
    *detection.AP_KEYS,
    "train_s",
    "eval_s",
)


@dataclass
class DetectConfig:
    """Everything that defines a detection run. Defaults: METHOD 8 (torchvision's reference)."""

    runtime_fields: ClassVar[tuple[str, ...]] = DETECT_RUNTIME_FIELDS

    rule: str  # one of spikealign.detection.DETECTION_RULES
    data_dir: str = "data/coco"  # train2017/, val2017/, annotations/instances_*2017.json
    convert: str = "all"  # "backbone" (ResNet trunk) or "all" (trunk, FPN, heads)
    backbone_checkpoint: str | None = None  # checkpoint.pt of a training.run ResNet-50
    min_size: int = 800  # px, short image side after the model's resize
    max_size: int = 1333  # px, long side at most
    epochs: int = 26
    batch_size: int = 16  # global, split over the torchrun ranks
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iterations: int = 1000  # linear warm-up over the first iterations of epoch 1
    warmup_factor: float = 0.001  # lr factor at iteration 0
    lr_milestones: tuple[int, ...] = (16, 22)  # lr x lr_gamma after these epochs
    lr_gamma: float = 0.1
    feedback_scale: float | None = None  # bound of random feedback (default 1/sqrt(fan_in))
    amp: bool = False  # bf16 autocast in training (evaluation stays float32)
    device: str = "auto"  # "auto" (CUDA when present), "cpu" or "cuda"
    dist_backend: str = "auto"  # under torchrun: "auto" (nccl on CUDA, gloo on CPU), "nccl", "gloo"
    seed: int = 0
    workers: int = 4  # DataLoader worker processes (JPEG decoding)
    limit_train: int | None = None  # train on a fixed random subset of this many images
    limit_test: int | None = None  # evaluate on a fixed random subset of this many images

    def __post_init__(self) -> None:
        self.lr_milestones = tuple(self.lr_milestones)  # config.json stores a list

    def validate(self) -> None:
        """Raise UserError naming the first invalid field."""
        detection.check_rule(self.rule)
        if self.convert not in detection.CONVERT_SCOPES:
            raise UserError(
                f"unknown --convert {self.convert!r}; "
                f"choose one of {', '.join(detection.CONVERT_SCOPES)}"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"unknown device {self.device!r}; choose auto, cpu or cuda")
        if self.dist_backend not in distributed.BACKENDS:
            raise UserError(f"unknown backend {self.dist_backend!r}; choose auto, nccl or gloo")
        check_finite(self)
        for name in ("epochs", "batch_size", "min_size", "max_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_size < self.min_size:
            raise UserError(f"max_size {self.max_size} is below min_size {self.min_size}")
        for name in ("lr", "momentum", "weight_decay", "warmup_iterations", "workers", "seed"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must not be negative, got {getattr(self, name)}")
        check_seed(self.seed)
        if not 0 < self.warmup_factor <= 1:
            raise UserError(f"warmup_factor must lie in (0, 1], got {self.warmup_factor}")
        for name in ("limit_train", "limit_test"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name} must be at least 1 (or unset), got {value}")

    def rule_options(self) -> dict:
        """Keyword options of feedback.convert (kp follows the SGD settings, as in training.run)."""
        options = {} if self.feedback_scale is None else {"feedback_scale": self.feedback_scale}
        if self.rule == "kp":
            options.update(lr=self.lr, weight_decay=self.weight_decay)
        return options

    @classmethod
    def from_dict(cls, values: dict) -> DetectConfig:
        """Build from a dict such as config.json; unknown keys are a UserError."""
        return config_from_dict(
            cls, values, required=("rule",), unknown_hint=": not a detection run's config"
        )


def learning_rate(config: DetectConfig, epoch: int, iteration: int, iterations: int) -> float:
    """lr of ``iteration`` (from 0) of ``epoch`` (from 1) with ``iterations`` per epoch."""
    lr = config.lr * config.lr_gamma ** sum(epoch > m for m in config.lr_milestones)
    warmup = min(config.warmup_iterations, iterations - 1)
    if epoch == 1 and iteration < warmup:
        fraction = iteration / warmup
        lr *= config.warmup_factor * (1 - fraction) + fraction
    return lr


def _subset_ids(image_ids: list[int], limit: int | None) -> list[int]:
    if limit is None or limit >= len(image_ids):
        return image_ids
    order = torch.randperm(len(image_ids), generator=torch.Generator().manual_seed(SUBSET_SEED))
    return [image_ids[i] for i in order[:limit].sort().values.tolist()]


@dataclass
class DetectionData:
    """What a detection run reads before it writes anything: both splits and the trunk."""

    train: detection.CocoBoxes
    test: detection.CocoBoxes
    trunk: dict | None

    @classmethod
    def load(cls, config: DetectConfig) -> DetectionData:
        """Load and check everything (UserError on bad input)."""
        for split in detection.SPLITS:  # both missing paths before the slow json
            detection.coco_paths(config.data_dir, split)
        trunk = None
        if config.backbone_checkpoint is not None:
            trunk = detection.load_trunk(config.backbone_checkpoint)
        train_coco = detection.load_coco(config.data_dir, "train")
        test_coco = detection.load_coco(config.data_dir, "val")
        train = detection.CocoBoxes(train_coco, train=True, seed=config.seed)
        test = detection.CocoBoxes(test_coco, train=False, categories=train.categories)
        test_categories = detection.Categories.from_coco(test_coco.coco.dataset["categories"])
        if test_categories.ids != train.categories.ids:
            raise UserError(
                "train and val annotation files list different categories; use the matching "
                "instances_train2017.json and instances_val2017.json"
            )
        train.image_ids = _subset_ids(train.image_ids, config.limit_train)
        test.image_ids = _subset_ids(test.image_ids, config.limit_test)
        if len(train) < config.batch_size:
            raise UserError(
                f"{len(train)} training images with boxes, fewer than one batch of "
                f"{config.batch_size}; lower --batch-size or raise --limit-train"
            )
        return cls(train, test, trunk)


def _to_device(targets, device) -> list[dict]:
    return [
        {k: v.to(device, non_blocking=True) for k, v in t.items() if k != "image_id"}
        for t in targets
    ]


class Detection(loop.EpochLoop):
    """One RetinaNet run: data, model, optimiser, history. Use :func:`train_detector`."""

    def __init__(
        self, config: DetectConfig, out_dir: Path, progress: bool = True, *, data: DetectionData
    ):
        super().__init__(config, out_dir, progress)
        self.device = distributed.setup(config.device, config.dist_backend)
        self.dist = distributed.current()
        self.progress = progress and self.dist.is_main
        self.data = data
        self.categories = data.train.categories
        local_batch = self.dist.local_batch_size(config.batch_size)
        pin = self.device.type == "cuda"
        if self.dist.enabled:
            self.train_sampler = DistributedSampler(
                data.train, self.dist.world_size, self.dist.rank, shuffle=True, drop_last=True
            )
            order = {"sampler": self.train_sampler}
        else:
            self.train_sampler = None
            order = {"shuffle": True, "generator": self.generator}
        loader = functools.partial(
            DataLoader,
            batch_size=local_batch,
            num_workers=config.workers,
            pin_memory=pin,
            collate_fn=detection.collate,
        )
        self.train_loader = loader(data.train, drop_last=True, **order)
        share = range(self.dist.rank, len(data.test), self.dist.world_size)
        self.test_loader = loader(torch.utils.data.Subset(data.test, share))

        torch.manual_seed(config.seed)
        model = detection.build_retinanet(
            self.categories.num_classes, config.min_size, config.max_size, trunk=data.trunk
        )
        self.model = detection.convert_retinanet(
            model, config.rule, config.convert, **config.rule_options()
        ).to(self.device)
        self.train_model = self.model
        if self.dist.enabled:
            # DDP averages gradients and broadcasts buffers (feedback, batch norm) from rank 0.
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(
            trainable, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )

    def _autocast(self):
        if not self.config.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def data_signature(self) -> dict:
        return {
            "category_ids": list(self.categories.ids),
            "train_images": len(self.data.train),
            "test_images": len(self.data.test),
        }

    def train_epoch(self, epoch: int) -> tuple[dict, float]:
        """One pass; returns (mean losses over the epoch's steps, last lr)."""
        self.train_model.train()
        self.data.train.set_epoch(epoch)
        if self.train_sampler is not None:
            self.train_sampler.set_epoch(epoch_seed(self.config.seed, epoch))
        # loss sums and the step count, on the device until the end (one sync per epoch)
        sums = torch.zeros(len(LOSS_KEYS) + 1, dtype=torch.float64, device=self.device)
        iterations = len(self.train_loader)
        batches = tqdm(
            self.train_loader, desc=f"epoch {epoch}", leave=False, disable=not self.progress
        )
        lr = self.config.lr
        for iteration, (images, targets) in enumerate(batches):
            lr = learning_rate(self.config, epoch, iteration, iterations)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            images = [image.to(self.device, non_blocking=True) for image in images]
            with self._autocast():
                losses = self.train_model(images, _to_device(targets, self.device))
            loss = sum(losses[key] for key in LOSS_KEYS)
            if not torch.isfinite(loss):
                raise UserError(
                    f"the loss became {loss.item()} at epoch {epoch}, step {iteration + 1}: "
                    "training diverged; lower --lr or lengthen the warm-up"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            feedback.step_feedback(self.model)
            sums[:-1] += torch.stack([losses[key].detach().double() for key in LOSS_KEYS])
            sums[-1] += 1
        self.dist.all_reduce(sums)
        # DDP hands rank 0's buffers to the others at each forward pass; after the last one every
        # rank holds its own batch-norm statistics. Rank 0's go to every rank, so all evaluate
        # (and would checkpoint) the same model.
        for buffer in self.model.buffers():
            self.dist.broadcast(buffer)
        steps = sums[-1].item()
        means = {key: sums[i].item() / steps for i, key in enumerate(LOSS_KEYS)}
        return means, lr

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Box AP figures on the test images (the same on every rank)."""
        self.model.eval()
        results = []
        for images, targets in self.test_loader:
            images = [image.to(self.device, non_blocking=True) for image in images]
            # no autocast (as torchvision's reference): bf16 box coordinates are 4 px coarse at 800
            outputs = self.model(images)
            image_ids = [t["image_id"] for t in targets]
            results += detection.detections_to_coco(image_ids, outputs, self.categories)
        results = [r for part in self.dist.all_gather_object(results) for r in part]
        ap = None
        if self.dist.is_main:
            ap = detection.coco_box_ap(
                self.data.test.coco.coco, results, image_ids=self.data.test.image_ids
            )
        return self.dist.broadcast_object(ap)

    def run_epoch(self, epoch: int) -> dict:
        start = time.perf_counter()
        losses, lr = self.train_epoch(epoch)
        trained = time.perf_counter()
        ap = self.evaluate()
        row = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": sum(losses.values()),
            "train_classification_loss": losses["classification"],
            "train_box_loss": losses["bbox_regression"],
            **ap,
            "train_s": trained - start,
            "eval_s": time.perf_counter() - trained,
        }
        return {key: row[key] for key in METRIC_COLUMNS}

    def progress_postfix(self, row: dict) -> dict:
        return {"loss": f"{row['train_loss']:.3f}", "AP": f"{row['AP']:.3f}"}

    def description(self) -> str:
        return f"RetinaNet {self.config.rule}"


def train_detector(
    config: DetectConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Train RetinaNet as ``config`` says, writing to ``out_dir``; returns the metric rows.

    Data, annotations and the backbone checkpoint are read and checked before anything is
    written. ``resume`` and ``overwrite`` as :func:`spikealign.trainer.loop.run`.
    """
    config.validate()
    data = DetectionData.load(config)
    make_loop = functools.partial(Detection, data=data)
    return loop.run(
        make_loop, config, out_dir, resume=resume, overwrite=overwrite, progress=progress
    )
