"""Image classification with separate feedback weights, alternating with spiking phases.

The network is :func:`spikealign.models.paper_convnet` converted to a learning rule with
:func:`spikealign.feedback.convert`. Each epoch ``e = 1..E``:

1. rule ``rdd`` only, every ``rdd_every`` epochs: the spiking feedback-training phase
   (:class:`spikealign.phase.FeedbackPhase`) is built from the current fully connected weights
   ``W1, W2, W3``; it estimates by regression discontinuity the causal effects ``beta`` and sets the
   feedback ``Y`` of ``fc1..fc3`` from them (METHOD 1, 3-5). The convolutional layers keep fixed
   random feedback (``fa``).
2. One pass of SGD with momentum over the training set. The backward pass of every converted layer
   uses its feedback ``Y`` instead of ``W^T``. After every optimiser step
   :func:`spikealign.feedback.step_feedback` runs (kp / wm feedback updates) and the feedback weight
   decay of METHOD 5 shrinks fixed and learned feedback: ``Y <- Y - lambda * Y``.
3. Test loss and error, and the alignment of each fully connected layer (METHOD 7): angle between
   ``W`` and ``Y``, sign agreement, norm ratio ``|Y| / |W|``.

Loss: cross-entropy on the logits (single-label); binary cross-entropy on the logits for multi-label
data (VOC), which is scored by mean average precision (average precision per class, averaged over
the classes with at least one positive example) instead of the error ``1 - accuracy``.

The epoch loop, checkpoints, exact resume and the run directory are
:mod:`spikealign.trainer.loop`'s; several processes under ``torchrun`` are
:mod:`spikealign.trainer.distributed`'s. With rule ``rdd`` on several processes, rank 0 runs the
spiking phase and broadcasts the new feedback (the phase is one CPU program; splitting it would
change its results), so every rank trains with the same feedback.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from spikealign import data, feedback, metrics, models
from spikealign.errors import UserError
from spikealign.trainer import distributed, loop
from spikealign.trainer.config import (
    ALIGNMENT_KEYS,
    FC_LAYERS,
    RDD_LAYER_RULES,
    TrainConfig,
    epoch_seed,
)
from spikealign.trainer.plots import plot_runs
from spikealign.trainer.rundir import (
    RunRecord,
    numpy_to_torch,
    spike_log_path,
    torch_to_numpy,
)
from spikealign.trainer.scores import ScoreKeeper

#: Inference batch size; batch norm uses its running statistics in eval mode, so it does not change
#: the results.
EVAL_BATCH_SIZE = 256
#: The ``--limit-train/--limit-test`` subsets are drawn with this seed, so they are the same for
#: every run seed and rule.
SUBSET_SEED = 0
#: Rules whose ``.feedback`` buffer holds the copy made at the last backward pass (before the last
#: optimiser step); ``refresh`` recomputes it from the current weight.
REFRESHED_RULES = ("bp", "usf", "frsf", "brsf")


def metric_columns(multilabel: bool) -> list[str]:
    """Column names of metrics.csv / keys of each metrics.jsonl row."""
    score = "map" if multilabel else "error"
    columns = ["epoch", "train_loss", f"train_{score}", "test_loss", f"test_{score}"]
    columns += [f"{layer}_{key}" for layer in FC_LAYERS for key in ALIGNMENT_KEYS]
    return columns + ["phase_s", "epoch_s"]


def _subset(dataset: Dataset, limit: int | None) -> Dataset:
    if limit is None or limit >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(SUBSET_SEED))
    return Subset(dataset, order[:limit].sort().values.tolist())


def _difficult_only(dataset: Dataset) -> torch.Tensor | None:
    """VOC's mask of (image, class) entries whose only objects are difficult; None for others."""
    if isinstance(dataset, Subset):
        mask = _difficult_only(dataset.dataset)
        return None if mask is None else mask[dataset.indices]
    return getattr(dataset, "difficult_only", None)


def build_model(config: TrainConfig, bundle) -> nn.Module:
    """The paper's net for ``bundle``'s data converted to ``config.rule``, initialised from seed."""
    torch.manual_seed(config.seed)
    model = models.paper_convnet(bundle.in_channels, bundle.image_size, bundle.num_classes)
    rule = RDD_LAYER_RULES if config.rule == "rdd" else config.rule
    return feedback.convert(model, rule, **config.rule_options())


@torch.no_grad()
def fc_alignment(model: nn.Module) -> dict[str, dict[str, float]]:
    """Alignment of each fc layer's weight with the feedback its next backward pass would use.

    NaN where the feedback is not weight-shaped (dfa's fc1 and fc2 map the output error).
    """
    for _, layer in models.fc_layers(model):
        if layer.rule in REFRESHED_RULES:
            layer.feedback_rule.refresh(layer)  # does not redraw brsf's magnitudes
    measured = metrics.model_alignment(model)
    return {name: measured.get(name, dict.fromkeys(ALIGNMENT_KEYS, math.nan)) for name in FC_LAYERS}


class _RankShare(torch.utils.data.Sampler):
    """Every ``world_size``-th index from ``rank``, in order: each test example once, no padding
    (DistributedSampler repeats examples to even out the shares, which would bias the scores)."""

    def __init__(self, length: int, dist: distributed.Distributed):
        self.indices = range(dist.rank, length, dist.world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class Training(loop.EpochLoop):
    """State of one run: data, model, optimiser, spiking phase, history. Use :func:`train`."""

    def __init__(self, config: TrainConfig, out_dir: Path, progress: bool = True):
        super().__init__(config, out_dir, progress)
        self.device = distributed.setup(config.device)
        self.dist = distributed.current()
        self.progress = progress and self.dist.is_main
        if config.deterministic:  # process-wide switches; left as they are otherwise
            # cuBLAS needs this workspace setting for deterministic matrix products on CUDA.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False

        load = functools.partial(
            data.load_dataset,
            config.dataset,
            config.data_dir,
            image_size=config.image_size,
            augment=config.augment,
        )
        if config.download and self.dist.enabled:
            # One rank downloads; the others wait and read what it wrote.
            self.dist.on_main(lambda: load(download=True))
        self.bundle = load(download=config.download and not self.dist.enabled)
        self.multilabel = self.bundle.multilabel
        self.train_set = _subset(self.bundle.train, config.limit_train)
        self.test_set = _subset(self.bundle.test, config.limit_test)
        if len(self.train_set) < config.batch_size:
            raise UserError(
                f"the training set has {len(self.train_set)} examples, fewer than one batch of "
                f"{config.batch_size}; lower --batch-size or raise --limit-train"
            )
        self.train_loader, self.test_loader = self._loaders()
        self.loss_fn = nn.BCEWithLogitsLoss() if self.multilabel else nn.CrossEntropyLoss()

        self.model = build_model(config, self.bundle).to(self.device)
        # The model that trains: wrapped for gradient averaging when there are several ranks.
        # DDP also broadcasts buffers (feedback, batch-norm statistics) from rank 0 at every
        # forward pass, so redrawn or updated feedback cannot drift apart between ranks.
        self.train_model = self.model
        if self.dist.enabled:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        self.decayed_feedback = [
            layer.feedback
            for _, layer in feedback.feedback_layers(self.model)
            if layer.rule in ("fa", "learned")
        ]
        self.phase = self._make_phase() if config.rule == "rdd" else None

    def _loaders(self) -> tuple[DataLoader, DataLoader]:
        config, dist = self.config, self.dist
        pin = self.device.type == "cuda"
        batch_size = dist.local_batch_size(config.batch_size)
        # drop_last: a last batch of one example would break batch norm; the examples left out
        # differ from epoch to epoch.
        if dist.enabled:
            # Seeded by the epoch (set_epoch), so every rank draws the same permutation.
            self.train_sampler = DistributedSampler(
                self.train_set, dist.world_size, dist.rank, shuffle=True, drop_last=True
            )
            train_order = {"sampler": self.train_sampler}
        else:
            self.train_sampler = None
            train_order = {"shuffle": True, "generator": self.generator}
        train_loader = DataLoader(
            self.train_set,
            batch_size=batch_size,
            drop_last=True,
            num_workers=config.workers,
            pin_memory=pin,
            **train_order,
        )
        test_sampler = _RankShare(len(self.test_set), dist) if dist.enabled else None
        test_loader = DataLoader(
            self.test_set,
            batch_size=EVAL_BATCH_SIZE,
            sampler=test_sampler,
            num_workers=config.workers,
            pin_memory=pin,
        )
        return train_loader, test_loader

    # -- data description stored in the checkpoint, to refuse resuming on other data
    def data_signature(self) -> dict:
        return {
            "in_channels": self.bundle.in_channels,
            "image_size": self.bundle.image_size,
            "num_classes": self.bundle.num_classes,
            "multilabel": self.multilabel,
            "train_examples": len(self.train_set),
            "test_examples": len(self.test_set),
        }

    def _make_phase(self):
        # Imported here: Brian2 takes a while to import and only this rule needs it.
        from spikealign.phase import FeedbackPhase

        fc1, fc2, fc3 = (layer for _, layer in models.fc_layers(self.model))
        sizes = [fc1.in_features, fc1.out_features, fc2.out_features, fc3.out_features]
        return FeedbackPhase(sizes, config=self.config.phase_config(), progress=self.progress)

    def run_phase(self, epoch: int) -> float:
        """The spiking feedback-training phase before ``epoch``; returns its wall time in s.

        On several ranks rank 0 runs it and every rank receives its feedback.
        """
        layers = [layer for _, layer in models.fc_layers(self.model)]
        start = time.perf_counter()
        if self.dist.is_main:
            weights = [layer.weight.detach().cpu().double().numpy() for layer in layers]
            feedbacks = [layer.feedback.detach().cpu().double().numpy() for layer in layers]
            self.phase.config = replace(self.phase.config, seed=epoch_seed(self.config.seed, epoch))
            log_path = spike_log_path(self.out_dir, epoch)
            log_path.parent.mkdir(exist_ok=True)
            result = self.phase.run(weights=weights, feedbacks=feedbacks, log_path=log_path)
            for layer, new_feedback in zip(layers, result.feedbacks, strict=True):
                layer.set_feedback(torch.from_numpy(np.asarray(new_feedback)))
        for layer in layers:
            self.dist.broadcast(layer.feedback)
        return time.perf_counter() - start

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        self.train_model.train()
        if self.train_sampler is not None:
            self.train_sampler.set_epoch(epoch_seed(self.config.seed, epoch))
        keeper = ScoreKeeper(self.multilabel)
        decay = self.config.feedback_decay
        batches = tqdm(
            self.train_loader, desc=f"epoch {epoch}", leave=False, disable=not self.progress
        )
        for inputs, targets in batches:
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            logits = self.train_model(inputs)
            loss = self.loss_fn(logits, targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            feedback.step_feedback(self.model)
            if decay:
                with torch.no_grad():
                    for decayed in self.decayed_feedback:
                        decayed.mul_(1.0 - decay)
            keeper.add(loss, logits, targets)
        self.dist.sync_buffers(self.model)
        return keeper.result(dist=self.dist)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        self.model.eval()
        keeper = ScoreKeeper(self.multilabel)
        for inputs, targets in self.test_loader:
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            logits = self.model(inputs)
            keeper.add(self.loss_fn(logits, targets), logits, targets)
        # The test loader keeps the dataset's order, so the mask's rows match the scores.
        ignore = _difficult_only(self.test_set)
        if ignore is not None and self.dist.enabled:
            ignore = ignore[list(self.test_loader.sampler)]
        return keeper.result(ignore=ignore, dist=self.dist)

    def run_epoch(self, epoch: int) -> dict:
        """Phase (rdd), one training pass and the test; returns the epoch's metrics row."""
        start = time.perf_counter()
        phase_s = 0.0
        if self.phase is not None and (epoch - 1) % self.config.rdd_every == 0:
            phase_s = self.run_phase(epoch)
        train_loss, train_score = self.train_epoch(epoch)
        test_loss, test_score = self.evaluate()
        values = [epoch, train_loss, train_score, test_loss, test_score]
        alignment = fc_alignment(self.model)
        values += [alignment[layer][key] for layer in FC_LAYERS for key in ALIGNMENT_KEYS]
        values += [phase_s, time.perf_counter() - start]
        return dict(zip(metric_columns(self.multilabel), values, strict=True))

    def progress_postfix(self, row: dict) -> dict:
        return {key: f"{row[key]:.3f}" for key in list(row)[3:5]}

    def description(self) -> str:
        return f"{self.config.rule} on {self.config.dataset}"

    # -- checkpoint
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "phase": numpy_to_torch(self.phase.state_dict()) if self.phase else None,
        }

    def load_state_dict(self, checkpoint: dict) -> None:
        try:
            self.model.load_state_dict(checkpoint["model"])
        except RuntimeError as err:
            first_line = str(err).strip().splitlines()[0]
            raise UserError(
                f"the checkpoint's model does not fit this network: {first_line}"
            ) from None
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.phase is not None:
            self.phase.load_state_dict(torch_to_numpy(checkpoint["phase"]))

    def finish(self) -> None:
        plot_runs([RunRecord(self.out_dir, self.config, self.history)], self.out_dir)


def train(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Train as ``config`` says, writing everything to ``out_dir``; returns the metric rows.

    ``resume``: continue from ``out_dir/checkpoint.pt`` (``config`` must be the stored one, up to
    :data:`~spikealign.trainer.config.RUNTIME_FIELDS`; see
    :func:`~spikealign.trainer.rundir.resume_config`). Without it an existing run in ``out_dir`` is
    refused unless ``overwrite``.
    """
    return loop.run(
        Training, config, out_dir, resume=resume, overwrite=overwrite, progress=progress
    )
