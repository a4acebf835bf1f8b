"""Image classification with separate feedback weights, alternating with spiking phases.

The network is ``config.arch`` (:func:`spikealign.models.build_model`: the paper's convnet,
ResNet-18 or BN-AlexNet) converted to a learning rule with :func:`spikealign.models.convert_model`
(every conv and linear layer; the last linear layer kept on backprop when ``last_layer="bp"``).
Each epoch ``e = 1..E``:

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
   ``W`` and ``Y``, sign agreement, norm ratio ``|Y| / |W|``. For resnet18 and alexnet_bn the
   alignment of every converted layer goes to ``metrics.jsonl`` (key ``alignment``) and its mean
   over the layers to ``metrics.csv``; ImageFolder datasets add the top-5 error.

The learning rate of epoch ``e`` is ``lr * lr_gamma ** #{milestones < e}`` (set at the start of
the epoch, so resume needs no scheduler state). ``amp`` runs forward and loss under bf16 autocast
(CUDA or CPU; bf16 needs no loss scaling); ``channels_last`` puts model and inputs in that format.

Loss: cross-entropy on the logits (single-label); binary cross-entropy on the logits for multi-label
data (VOC), which is scored by mean average precision (average precision per class, averaged over
the classes with at least one positive example) instead of the error ``1 - accuracy``.

Speed (docs/training.md): datasets held in memory go onto the training device once as uint8 and
are shuffled, cropped, flipped and normalised there in whole batches (:mod:`spikealign.device_data`;
``loader``); the optimiser is fused SGD on CUDA; losses and errors stay on the device until the end
of a pass; ``compile`` runs forward and backward through ``torch.compile``. With ``rdd_overlap``
the spiking phase for epoch e+1 runs in a separate process during epoch e
(:class:`spikealign.phase_process.PhaseProcess`; a thread would share the interpreter lock with
the training loop), from the fc weights and feedback at the start of epoch e (one epoch staler
than the paper's schedule, where it sees the weights at the end of epoch e); its feedback is
applied at the start of epoch e+1, as without overlap. The phase before epoch 1 runs before it,
in this process, as usual.

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
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from spikealign import conservation, data, device_data, feedback, metrics, models
from spikealign.errors import UserError
from spikealign.phase_process import PhaseProcess
from spikealign.trainer import distributed, graphs, loop
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
#: top-k error recorded besides the top-1 error on ImageFolder data (ImageNet's convention)
TOP_K = 5
#: Rules with an update after every optimiser step (feedback.step_feedback).
STEPPED_RULES = ("kp", "wm")
#: most DataLoader workers per process by default (on CUDA)
MAX_DEFAULT_WORKERS = 8
#: torch.compile backend of ``compile``; the tests use "aot_eager" (the same tracing, no codegen).
COMPILE_BACKEND = "inductor"


def metric_columns(multilabel: bool, arch: str = "paper", top_k: bool = False) -> list[str]:
    """Column names of metrics.csv / scalar keys of each metrics.jsonl row.

    The paper net records each fc layer's alignment; other archs the mean over their converted
    layers (``mean_<measure>``), with the per-layer values in metrics.jsonl's ``alignment``.
    """
    score = "map" if multilabel else "error"
    columns = ["epoch", "lr", "train_loss", f"train_{score}", "test_loss", f"test_{score}"]
    if top_k:
        columns += [f"train_top{TOP_K}_error", f"test_top{TOP_K}_error"]
    groups = FC_LAYERS if arch == "paper" else ("mean",)
    columns += [f"{group}_{key}" for group in groups for key in ALIGNMENT_KEYS]
    return columns + ["phase_s", "epoch_s"]


def default_workers(device: torch.device, local_world_size: int = 1) -> int:
    """DataLoader workers when none are asked: up to 8 per GPU, shared CPU cores; 0 on the CPU
    (the model's own threads use the cores)."""
    if device.type != "cuda":
        return 0
    return max(1, min(MAX_DEFAULT_WORKERS, (os.cpu_count() or 1) // max(1, local_world_size)))


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
    """``config.arch`` for ``bundle``'s data converted to ``config.rule``, initialised from seed."""
    torch.manual_seed(config.seed)
    model = models.build_model(
        config.arch, bundle.in_channels, bundle.image_size, bundle.num_classes
    )
    rule = RDD_LAYER_RULES if config.rule == "rdd" else config.rule
    return models.convert_model(
        model, rule, config.last_layer, config.feedback_scales, **config.rule_options()
    )


@torch.no_grad()
def layer_alignment(model: nn.Module) -> dict[str, dict[str, float]]:
    """Alignment of every converted layer's weight with the feedback its next backward pass
    would use (layers without weight-shaped feedback, dfa's hidden ones, are left out)."""
    for _, layer in feedback.feedback_layers(model):
        if layer.rule in REFRESHED_RULES:
            layer.feedback_rule.refresh(layer)  # does not redraw brsf's magnitudes
    return metrics.model_alignment(model)


def fc_alignment(model: nn.Module) -> dict[str, dict[str, float]]:
    """Alignment of each fc layer of the paper net; NaN where the feedback is not weight-shaped
    (dfa's fc1 and fc2 map the output error)."""
    measured = layer_alignment(model)
    return {name: measured.get(name, dict.fromkeys(ALIGNMENT_KEYS, math.nan)) for name in FC_LAYERS}


def mean_alignment(measured: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean of each alignment measure over the layers (NaN entries left out)."""
    means = {}
    for key in ALIGNMENT_KEYS:
        values = [v[key] for v in measured.values() if not math.isnan(v[key])]
        means[key] = sum(values) / len(values) if values else math.nan
    return means


class _RankShare(torch.utils.data.Sampler):
    """Every ``world_size``-th index from ``rank``, in order: each test example once, no padding
    (DistributedSampler repeats examples to even out the shares, which would bias the scores)."""

    def __init__(self, length: int, dist: distributed.Distributed):
        self.indices = range(dist.rank, length, dist.world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class PendingFeedback:
    """A finished spiking phase's feedback of fc1..fc3, to be set before ``epoch``."""

    epoch: int
    feedbacks: list[torch.Tensor]
    wall_s: float  # the phase's own wall time

    @classmethod
    def of_phase(cls, epoch: int, feedbacks, wall_s: float) -> PendingFeedback:
        """From the arrays a phase returns (in this process or the phase process)."""
        return cls(epoch, [torch.from_numpy(np.asarray(f)) for f in feedbacks], wall_s)


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
        elif self.device.type == "cuda":
            # Every batch has one shape: cuDNN times its algorithms once and keeps the fastest
            # (as torchvision's reference scripts do unless asked for determinism).
            torch.backends.cudnn.benchmark = True

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
        self.top_k = config.dataset in data.IMAGE_FOLDER_DATASETS
        self.train_set = _subset(self.bundle.train, config.limit_train)
        self.test_set = _subset(self.bundle.test, config.limit_test)
        if len(self.train_set) < config.batch_size:
            raise UserError(
                f"the training set has {len(self.train_set)} examples, fewer than one batch of "
                f"{config.batch_size}; lower --batch-size or raise --limit-train"
            )
        self.loader_kind = "dataloader"  # or "device", set by _loaders
        self.train_loader, self.test_loader = self._loaders()
        self.loss_fn = nn.BCEWithLogitsLoss() if self.multilabel else nn.CrossEntropyLoss()

        self.model = build_model(config, self.bundle).to(self.device)
        self.memory_format = torch.contiguous_format
        if config.channels_last:
            self.memory_format = torch.channels_last
            self.model = self.model.to(memory_format=self.memory_format)
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
            # one kernel for the whole update on CUDA; the CPU keeps the reference loop
            fused=True if self.device.type == "cuda" else None,
        )
        self.decayed_feedback = [
            layer.feedback
            for _, layer in feedback.feedback_layers(self.model)
            if layer.rule in ("fa", "learned")
        ]
        self.forward_loss = (
            self._forward_loss if config.compile == "off" else self._compiled_forward_loss()
        )
        #: the training pass as CUDA-graph replays (cuda_graph), else None
        self.graphed = self._graphed_pass() if config.cuda_graph else None
        self.phase = self._make_phase() if config.rule == "rdd" else None
        # Q_k(0) of METHOD 9 (restored from the checkpoint on resume), for drift_<layer> columns
        self.conservation = (
            conservation.DriftTracker(self.model) if config.track_conservation else None
        )
        #: rdd_overlap: the process running the phases, started with the first one it runs
        self.phase_process: PhaseProcess | None = None
        #: rdd_overlap: the epoch whose phase runs in the background, and the finished one's result
        self.background_epoch: int | None = None
        self.pending: PendingFeedback | None = None

    def _graphed_pass(self) -> graphs.GraphedPass:
        problem = None
        if self.device.type != "cuda":
            problem = f"needs a CUDA device, and this run trains on {self.device.type}"
        elif self.loader_kind != "device":
            problem = (
                f"needs the training data on the device, and {self.config.dataset} is read by a "
                "DataLoader (files, or --loader dataloader)"
            )
        elif self.dist.enabled:
            problem = "runs in one process, not under torchrun"
        if problem is not None:
            raise UserError(f"--cuda-graph {problem}; leave out --cuda-graph")
        return graphs.GraphedPass(
            self.train_loader,
            lambda inputs, targets: self.train_step(*self._inputs(inputs, targets)),
            TOP_K if self.top_k else None,
        )

    def _loaders(self):
        """(train, test) loaders: on the device when ``loader`` allows and the data fit."""
        config, dist = self.config, self.dist
        batch_size = dist.local_batch_size(config.batch_size)
        if batch_size < 2:
            raise UserError(
                f"batch size {config.batch_size} over {dist.world_size} processes leaves "
                f"{batch_size} example per process; batch norm needs at least 2, so use "
                f"--batch-size {2 * dist.world_size} or more"
            )
        if config.loader != "dataloader":
            loaders = self._device_loaders(batch_size)
            if loaders is not None:
                self.loader_kind = "device"
                return loaders
            if config.loader == "device":
                raise UserError(
                    f"--loader device: {config.dataset} cannot be held on {self.device} (images "
                    "read from files, a transform the batched version lacks, or too large); "
                    "use --loader auto or dataloader"
                )
        return self._data_loaders(batch_size)

    def _device_loaders(self, batch_size: int):
        budget = None
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
            budget = int(device_data.CUDA_MEMORY_SHARE * free)
        train = device_data.device_dataset(self.train_set, self.device, budget)
        if train is None:
            return None
        test = device_data.device_dataset(
            self.test_set, self.device, None if budget is None else budget - train.nbytes
        )
        if test is None:
            return None
        shard = (self.dist.rank, self.dist.world_size)
        self.train_sampler = None
        train_loader = device_data.DeviceLoader(
            train,
            batch_size,
            shuffle=True,
            drop_last=True,  # as the DataLoader (see there)
            augment=True,
            generator=self.generator,
            shard=shard,
        )
        test_loader = device_data.DeviceLoader(test, EVAL_BATCH_SIZE, shard=shard)
        return train_loader, test_loader

    def _data_loaders(self, batch_size: int) -> tuple[DataLoader, DataLoader]:
        config, dist = self.config, self.dist
        pin = self.device.type == "cuda"
        workers = config.workers
        if workers is None:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            workers = default_workers(self.device, local_world)
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
            num_workers=workers,
            pin_memory=pin,
            **train_order,
        )
        test_sampler = _RankShare(len(self.test_set), dist) if dist.enabled else None
        test_loader = DataLoader(
            self.test_set,
            batch_size=EVAL_BATCH_SIZE,
            sampler=test_sampler,
            num_workers=workers,
            pin_memory=pin,
        )
        return train_loader, test_loader

    def _forward_loss(self, inputs: torch.Tensor, targets: torch.Tensor):
        with self._autocast():
            logits = self.train_model(inputs)
            return self.loss_fn(logits, targets), logits

    def _compiled_forward_loss(self):
        """``_forward_loss`` through torch.compile: forward and (AOTAutograd) backward."""
        if self.config.rule == "dfa":
            raise UserError(
                "--compile does not support rule dfa (its output-error hooks run outside the "
                "compiled graph and its gradients would be wrong); leave out --compile"
            )
        if self.device.type == "cpu" and COMPILE_BACKEND == "inductor":
            compilers = [os.environ.get("CXX"), "g++", "c++", "clang++"]
            if not any(name and shutil.which(name) for name in compilers):
                raise UserError(
                    "--compile on the CPU needs a C++ compiler (g++ or clang++) and none was "
                    "found; install one or leave out --compile"
                )
        mode = None if self.config.compile == "default" else self.config.compile
        return torch.compile(self._forward_loss, mode=mode, backend=COMPILE_BACKEND)

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

    def _phase_inputs(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Copies of the fc weights and feedback, as the phase reads them (float64, CPU)."""
        layers = [layer for _, layer in models.fc_layers(self.model)]
        weights = [layer.weight.detach().cpu().double().numpy() for layer in layers]
        feedbacks = [layer.feedback.detach().cpu().double().numpy() for layer in layers]
        return weights, feedbacks

    def _prepare_phase(self, epoch: int) -> Path:
        """Seed the phase for ``epoch``; returns its spike log path (its directory made)."""
        self.phase.config = replace(self.phase.config, seed=epoch_seed(self.config.seed, epoch))
        log_path = spike_log_path(self.out_dir, epoch)
        log_path.parent.mkdir(exist_ok=True)
        return log_path

    def _simulate_phase(self, epoch: int, weights, feedbacks) -> PendingFeedback:
        """Run the phase before ``epoch`` (rank 0) from the given matrices; nothing is applied."""
        log_path = self._prepare_phase(epoch)
        start = time.perf_counter()
        result = self.phase.run(weights=weights, feedbacks=feedbacks, log_path=log_path)
        return PendingFeedback.of_phase(epoch, result.feedbacks, time.perf_counter() - start)

    def _apply_feedback(self, pending: PendingFeedback | None) -> None:
        """Set the fc feedback from ``pending`` (rank 0) and broadcast it to every rank."""
        layers = [layer for _, layer in models.fc_layers(self.model)]
        if pending is not None:
            for layer, new_feedback in zip(layers, pending.feedbacks, strict=True):
                layer.set_feedback(new_feedback)
        for layer in layers:
            self.dist.broadcast(layer.feedback)

    def run_phase(self, epoch: int) -> float:
        """The spiking feedback-training phase before ``epoch``; returns its wall time in s.

        On several ranks rank 0 runs it and every rank receives its feedback. With
        ``rdd_overlap`` the phase has run in the background during the previous epoch (or comes
        from the checkpoint); only the first epoch's phase runs here.
        """
        start = time.perf_counter()
        pending = None
        if self.dist.is_main:
            if self.pending is not None:
                if self.pending.epoch != epoch:
                    raise RuntimeError(f"phase of epoch {self.pending.epoch} before epoch {epoch}")
                pending, self.pending = self.pending, None
            else:
                pending = self._simulate_phase(epoch, *self._phase_inputs())
        self._apply_feedback(pending)
        if pending is not None and self.config.rdd_overlap:
            return pending.wall_s
        return time.perf_counter() - start

    def _inputs(self, inputs: torch.Tensor, targets: torch.Tensor):
        inputs = inputs.to(self.device, non_blocking=True, memory_format=self.memory_format)
        return inputs, targets.to(self.device, non_blocking=True)

    def _autocast(self):
        # The autocast cache of cast weights would outlive a CUDA-graph capture; off for graphs.
        return torch.autocast(
            self.device.type,
            dtype=torch.bfloat16,
            enabled=self.config.amp,
            cache_enabled=False if self.config.cuda_graph else None,
        )

    def _phase_due(self, epoch: int) -> bool:
        return self.phase is not None and (epoch - 1) % self.config.rdd_every == 0

    def _start_background_phase(self, epoch: int) -> None:
        """rdd_overlap: start the phase before ``epoch + 1`` from the matrices as they are now."""
        if not (self.config.rdd_overlap and self.dist.is_main):
            return
        # Also after the last epoch: a run extended later (--resume --epochs) then goes on exactly
        # as an uninterrupted longer run.
        if not self._phase_due(epoch + 1):
            return
        if self.phase_process is None:  # kept for the run: its imports and program load once
            self.phase_process = PhaseProcess()
        log_path = self._prepare_phase(epoch + 1)
        self.phase_process.start(self.phase, *self._phase_inputs(), log_path)
        self.background_epoch = epoch + 1

    def _finish_background_phase(self, keep: bool = True) -> None:
        """Wait for the background phase and keep its feedback for the next epoch; without
        ``keep`` (the epoch failed) stop it and end the phase process."""
        epoch, self.background_epoch = self.background_epoch, None
        if not keep:
            self._close_phase_process(stop=True)
        elif epoch is not None:
            feedbacks, wall_s = self.phase_process.result(self.phase)  # loads the phase's state
            self.pending = PendingFeedback.of_phase(epoch, feedbacks, wall_s)

    def _close_phase_process(self, stop: bool = False) -> None:
        if self.phase_process is not None:
            phase_process, self.phase_process = self.phase_process, None
            phase_process.close(stop=stop)

    def train_epoch(self, epoch: int) -> tuple[float, ...]:
        self.train_model.train()
        if self.train_sampler is not None:
            self.train_sampler.set_epoch(epoch_seed(self.config.seed, epoch))
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr_at(epoch)
        if self.config.rule == "kp":
            # Kolen-Pollack gives B the weight's own update, so B's rate follows the schedule too.
            kp_lr = self.config.rule_options()["lr"] * self.config.lr_factor(epoch)
            for _, layer in feedback.feedback_layers(self.model):
                if layer.rule == "kp":
                    layer.feedback_rule.lr = kp_lr
        keeper = ScoreKeeper(self.multilabel, TOP_K if self.top_k else None)
        bar = tqdm(
            total=len(self.train_loader),
            desc=f"epoch {epoch}",
            leave=False,
            disable=not self.progress,
        )
        with bar:
            if self.graphed is not None:
                self.graphed.run(keeper, bar.update)
            else:
                # No host sync per step: nothing reads a value back (the keeper sums on the device).
                for inputs, targets in self.train_loader:
                    inputs, targets = self._inputs(inputs, targets)
                    loss, logits = self.train_step(inputs, targets)
                    keeper.add(loss, logits, targets)
                    bar.update()
        self.dist.sync_buffers(self.model)
        return keeper.result(dist=self.dist)

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor):
        """One SGD step with the rule's feedback updates; returns (loss, logits), on the device."""
        if self.config.compile == "reduce-overhead":
            # CUDA graphs: the previous step's outputs have been used, their memory may be reused
            torch.compiler.cudagraph_mark_step_begin()
        loss, logits = self.forward_loss(inputs, targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.config.rule in STEPPED_RULES:
            feedback.step_feedback(self.model)
        if self.config.feedback_decay:
            with torch.no_grad():
                torch._foreach_mul_(self.decayed_feedback, 1.0 - self.config.feedback_decay)
        return loss, logits

    @torch.no_grad()
    def evaluate(self) -> tuple[float, ...]:
        self.model.eval()
        keeper = ScoreKeeper(self.multilabel, TOP_K if self.top_k else None)
        for inputs, targets in self.test_loader:
            inputs, targets = self._inputs(inputs, targets)
            with self._autocast():
                logits = self.model(inputs)
                loss = self.loss_fn(logits, targets)
            keeper.add(loss, logits, targets)
        # The test loader keeps the dataset's order, so the mask's rows match the scores.
        ignore = _difficult_only(self.test_set)
        if ignore is not None and self.dist.enabled:
            ignore = ignore[list(self.test_loader.sampler)]
        return keeper.result(ignore=ignore, dist=self.dist)

    def run_epoch(self, epoch: int) -> dict:
        """Phase (rdd), one training pass and the test; returns the epoch's metrics row."""
        start = time.perf_counter()
        phase_s = 0.0
        if self._phase_due(epoch):
            phase_s = self.run_phase(epoch)
        self._start_background_phase(epoch)
        try:
            train = self.train_epoch(epoch)
            test = self.evaluate()
        except BaseException:  # no phase outlives its epoch; the training error is the one raised
            self._finish_background_phase(keep=False)
            raise
        self._finish_background_phase()
        values = [epoch, self.config.lr_at(epoch), train[0], train[1], test[0], test[1]]
        if self.top_k:
            values += [train[2], test[2]]
        if self.config.arch == "paper":
            alignment = fc_alignment(self.model)
            values += [alignment[layer][key] for layer in FC_LAYERS for key in ALIGNMENT_KEYS]
        else:
            alignment = layer_alignment(self.model)
            means = mean_alignment(alignment)
            values += [means[key] for key in ALIGNMENT_KEYS]
        values += [phase_s, time.perf_counter() - start]
        columns = metric_columns(self.multilabel, self.config.arch, self.top_k)
        row = dict(zip(columns, values, strict=True))
        if self.config.arch != "paper":
            row["alignment"] = alignment  # every converted layer; metrics.jsonl only
        if self.conservation is not None:
            row.update(self.conservation.row())
        return row

    def progress_postfix(self, row: dict) -> dict:
        shown = ("test_loss", "test_error", "test_map")
        return {key: f"{row[key]:.3f}" for key in shown if key in row}

    def description(self) -> str:
        return f"{self.config.arch} {self.config.rule} on {self.config.dataset}"

    # -- checkpoint
    def state_dict(self) -> dict:
        pending = None
        if self.pending is not None:  # rdd_overlap: the next epoch's feedback, already computed
            pending = {
                "epoch": self.pending.epoch,
                "feedbacks": self.pending.feedbacks,
                "wall_s": self.pending.wall_s,
            }
        return {
            **super().state_dict(),
            "phase": numpy_to_torch(self.phase.state_dict()) if self.phase else None,
            "conservation": self.conservation.state_dict() if self.conservation else None,
            "pending_phase": pending,
        }

    def load_state_dict(self, checkpoint: dict) -> None:
        super().load_state_dict(checkpoint)
        if self.phase is not None:
            self.phase.load_state_dict(torch_to_numpy(checkpoint["phase"]))
        if self.conservation is not None:
            self.conservation.load_state_dict(checkpoint["conservation"])
        pending = checkpoint.get("pending_phase")
        self.pending = None if pending is None else PendingFeedback(**pending)

    def fit(self) -> list[dict]:
        try:
            return super().fit()
        finally:  # at the end, on an error or an interrupt: no phase process outlives the run
            self._close_phase_process(stop=True)

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
