"""Training loop: forward learning with separate feedback weights, alternating with spiking phases.

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

Reproducibility: the model is initialised from ``seed``; all randomness of epoch ``e`` (shuffling,
augmentation, brsf redraws, the spiking phase's noise) is drawn from generators reseeded with
:func:`epoch_seed` ``(seed, e)`` at the start of the epoch. A run resumed from its checkpoint
therefore ends with exactly the numbers of an uninterrupted run (same device).

Output directory (see docs/training.md): ``config.json``, ``metrics.csv`` and ``metrics.jsonl``
(one row per epoch), ``checkpoint.pt`` (after every epoch), ``spikes/epoch_XXX.h5`` (rule ``rdd``),
and at the end ``error.png`` and ``alignment.png``. Every file is written atomically (temporary
file in the same directory, then ``os.replace``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from spikealign import data, feedback, metrics, models
from spikealign.errors import UserError

FC_LAYERS = models.FC_LAYER_NAMES
#: Rule names the trainer accepts: the rules of :mod:`spikealign.feedback` plus ``rdd``.
TRAIN_RULES = tuple(rule for rule in feedback.RULES if rule != "learned") + ("rdd",)
#: Per-layer rule of ``rdd``: learned feedback on the fully connected layers, fixed random on conv.
RDD_LAYER_RULES = {**dict.fromkeys(FC_LAYERS, "learned"), "default": "fa"}
#: Rules with fixed (fa) or learned feedback, which the feedback weight decay shrinks.
DECAYED_RULES = ("fa", "rdd")
#: Alignment measures recorded per fully connected layer (keys of ``metrics.alignment``).
ALIGNMENT_KEYS = ("angle_deg", "sign_agreement", "norm_ratio")
#: Config fields that describe where and how a run executes, not what it computes; a resumed run
#: may change them (``epochs`` to extend the run).
RUNTIME_FIELDS = ("data_dir", "download", "device", "workers", "epochs")
CHECKPOINT_FORMAT = 1
#: Inference batch size; batch norm uses its running statistics in eval mode, so it does not change
#: the results.
EVAL_BATCH_SIZE = 256
#: The ``--limit-train/--limit-test`` subsets are drawn with this seed, so they are the same for
#: every run seed and rule.
SUBSET_SEED = 0


@dataclass
class TrainConfig:
    """Everything that defines a training run. Defaults are the paper's (METHOD 6)."""

    dataset: str  # one of spikealign.data.DATASETS
    rule: str  # one of TRAIN_RULES
    data_dir: str = "data"
    download: bool = False
    image_size: int | None = None  # None: the dataset's own size
    augment: bool = True  # random crop / flip of the training images (spikealign.data)
    epochs: int = 100
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    feedback_decay: float = 0.0  # lambda: Y <- Y - lambda * Y after every step (fa / learned)
    # Options of feedback.convert; None keeps the rule's default (see rule_options).
    feedback_scale: float | None = None  # bound of randomly drawn feedback (default 1/sqrt(fan_in))
    kp_lr: float | None = None  # kp: learning rate of the feedback update (default: lr)
    kp_weight_decay: float | None = None  # kp: its weight decay (default: weight_decay)
    wm_lr: float | None = None  # wm: learning rate of the mirror update
    wm_weight_decay: float | None = None  # wm: its weight decay
    wm_noise_std: float | None = None  # wm: std of the mirror noise
    wm_batch_size: int | None = None  # wm: noise samples per mirror update
    rdd_every: int = 1  # run the spiking phase before every rdd_every-th epoch
    rdd_time: float = 90.0  # s of simulated time per phase (a third per fc layer)
    estimator: str = "lms"  # RDD estimator: "lms" (reference) or "ols"
    update: str = "rescale"  # feedback update from beta: "rescale" (reference) or "gradient"
    device: str = "auto"  # "auto" (CUDA when present), "cpu" or "cuda"
    seed: int = 0
    deterministic: bool = False  # deterministic algorithms (slower on CUDA)
    workers: int = 0  # DataLoader worker processes
    limit_train: int | None = None  # train on a fixed random subset of this many examples
    limit_test: int | None = None  # test on a fixed random subset of this many examples

    def validate(self) -> None:
        """Raise UserError naming the first invalid field."""
        if self.dataset not in data.DATASETS:
            raise UserError(
                f"unknown dataset {self.dataset!r}; choose one of {', '.join(data.DATASETS)}"
            )
        if self.rule not in TRAIN_RULES:
            raise UserError(f"unknown rule {self.rule!r}; choose one of {', '.join(TRAIN_RULES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"unknown device {self.device!r}; choose auto, cpu or cuda")
        positive = ("epochs", "batch_size", "rdd_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "momentum", "weight_decay", "feedback_decay", "workers", "seed"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.feedback_decay < 1:
            raise UserError(f"feedback_decay must lie in [0, 1), got {self.feedback_decay}")
        if self.feedback_decay and self.rule not in DECAYED_RULES:
            raise UserError(
                f"feedback_decay applies to rules {' and '.join(DECAYED_RULES)}, not {self.rule} "
                "(kp and wm have their own weight decay options)"
            )
        if self.rdd_time <= 0:
            raise UserError(f"rdd_time must be positive, got {self.rdd_time}")
        for name in ("limit_train", "limit_test", "image_size", "wm_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name} must be at least 1 (or unset), got {value}")
        for prefix in ("kp", "wm"):
            given = [
                f.name
                for f in fields(self)
                if f.name.startswith(f"{prefix}_") and getattr(self, f.name) is not None
            ]
            if given and self.rule != prefix:
                raise UserError(
                    f"{', '.join(given)}: only for rule {prefix}, but the rule is {self.rule}"
                )

    def rule_options(self) -> dict:
        """Keyword options of feedback.convert for this rule (kp follows the SGD settings)."""
        options = {} if self.feedback_scale is None else {"feedback_scale": self.feedback_scale}
        if self.rule == "kp":
            # Kolen-Pollack gives the feedback the same update as the weight.
            options["lr"] = self.lr if self.kp_lr is None else self.kp_lr
            options["weight_decay"] = (
                self.weight_decay if self.kp_weight_decay is None else self.kp_weight_decay
            )
        if self.rule == "wm":
            for name in ("lr", "weight_decay", "noise_std", "batch_size"):
                value = getattr(self, f"wm_{name}")
                if value is not None:
                    options[name] = value
        return options

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Build from a dict such as config.json; unknown keys are a UserError."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserError(f"unknown config field(s) {', '.join(unknown)}")
        missing = [name for name in ("dataset", "rule") if values.get(name) is None]
        if missing:
            raise UserError(f"the config needs {' and '.join(missing)}")
        return cls(**values)


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of all randomness of one epoch: a hash of (seed, epoch) below 2**31.

    31 bits because the spiking phase hands its seed to Brian2 as a signed 32-bit integer.
    """
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] >> 1)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without CUDA is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda requested but CUDA is not available; use --device cpu or auto")
    return torch.device(name)


# --------------------------------------------------------------------------------------------------
# Files of a run directory


CONFIG_FILE = "config.json"
METRICS_CSV = "metrics.csv"
METRICS_JSONL = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
SPIKES_DIR = "spikes"
ERROR_FIGURE = "error.png"
ALIGNMENT_FIGURE = "alignment.png"


def spike_log_path(out_dir: str | Path, epoch: int) -> Path:
    return Path(out_dir) / SPIKES_DIR / f"epoch_{epoch:03d}.h5"


def write_atomic(path: Path, write: Callable[[io.IOBase], None], binary: bool = False) -> None:
    """Write with ``write(file)`` into a temporary file beside ``path``, then replace ``path``."""
    # Not tempfile.mkstemp: its files are private (0600); this one gets the user's umask.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb" if binary else "w", newline=None if binary else "") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def metric_columns(multilabel: bool) -> list[str]:
    """Column names of metrics.csv / keys of each metrics.jsonl row."""
    score = "map" if multilabel else "error"
    columns = ["epoch", "train_loss", f"train_{score}", "test_loss", f"test_{score}"]
    columns += [f"{layer}_{key}" for layer in FC_LAYERS for key in ALIGNMENT_KEYS]
    return columns + ["phase_s", "epoch_s"]


def write_metrics(out_dir: Path, rows: Sequence[dict]) -> None:
    """(Re)write metrics.csv and metrics.jsonl from all rows so far."""
    columns = list(rows[0]) if rows else []

    def write_csv(file):
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    write_atomic(out_dir / METRICS_CSV, write_csv)
    # JSON has no NaN: undefined values (dfa's alignment) are written as null.
    json_rows = [{k: None if _is_nan(v) else v for k, v in row.items()} for row in rows]
    write_atomic(
        out_dir / METRICS_JSONL, lambda f: f.writelines(json.dumps(r) + "\n" for r in json_rows)
    )


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def write_config(out_dir: Path, config: TrainConfig) -> None:
    write_atomic(out_dir / CONFIG_FILE, lambda f: json.dump(asdict(config), f, indent=2))


@dataclass
class RunRecord:
    """A run directory as read back: its config and its metric rows (one per finished epoch)."""

    path: Path
    config: TrainConfig
    rows: list[dict]

    @property
    def multilabel(self) -> bool:
        return bool(self.rows) and "test_map" in self.rows[0]

    @property
    def score_key(self) -> str:
        return "test_map" if self.multilabel else "test_error"


def read_run(run_dir: str | Path) -> RunRecord:
    """Read config.json and metrics.jsonl of a run directory (UserError if it is not one)."""
    run_dir = Path(run_dir)
    config_path, metrics_path = run_dir / CONFIG_FILE, run_dir / METRICS_JSONL
    for path in (config_path, metrics_path):
        if not path.is_file():
            raise UserError(
                f"{run_dir} is not a training run directory (no {path.name}); "
                "pass a directory written by python -m training.run --out"
            )
    try:
        config = TrainConfig.from_dict(json.loads(config_path.read_text()))
        rows = [
            {k: math.nan if v is None else v for k, v in json.loads(line).items()}
            for line in metrics_path.read_text().splitlines()
            if line
        ]
    except (json.JSONDecodeError, TypeError) as err:
        raise UserError(f"cannot read the run in {run_dir}: {err}") from None
    return RunRecord(run_dir, config, rows)


# --------------------------------------------------------------------------------------------------
# Checkpoints


def _numpy_to_torch(value):
    """Numpy arrays -> tensors (recursively), so checkpoints load with ``weights_only=True``."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: _numpy_to_torch(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_numpy_to_torch(item) for item in value)
    return value


def _torch_to_numpy(value):
    """Inverse of :func:`_numpy_to_torch`."""
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return {key: _torch_to_numpy(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_torch_to_numpy(item) for item in value)
    return value


def rng_state(loader_generator: torch.Generator) -> dict:
    """States of every random generator the training touches."""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": _numpy_to_torch(numpy_state),
        "python": random.getstate(),
        "loader": loader_generator.get_state(),
    }


def set_rng_state(state: dict, loader_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(_torch_to_numpy(state["numpy"]))
    random.setstate(state["python"])
    loader_generator.set_state(state["loader"])


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    write_atomic(path, lambda file: torch.save(checkpoint, file), binary=True)


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint (``weights_only=True``); UserError if it is missing or unreadable."""
    if not path.is_file():
        raise UserError(f"no checkpoint {path}: nothing to resume; start the run without --resume")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a damaged or foreign file
        raise UserError(
            f"cannot read checkpoint {path} ({type(err).__name__}); delete it"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a spikealign training checkpoint; delete it or pick --out")
    return checkpoint


def resume_config(out_dir: str | Path, overrides: dict | None = None) -> TrainConfig:
    """The config stored in ``out_dir``'s checkpoint with ``overrides`` applied.

    Only :data:`RUNTIME_FIELDS` may differ from the stored values; any other override that differs
    is a UserError (it would make the resumed run a different experiment).
    """
    checkpoint = load_checkpoint(Path(out_dir) / CHECKPOINT_FILE)
    stored = TrainConfig.from_dict(checkpoint["config"])
    overrides = dict(overrides or {})
    _check_same_experiment(stored, replace(stored, **overrides), Path(out_dir))
    return replace(stored, **overrides)


def _check_same_experiment(stored: TrainConfig, asked: TrainConfig, out_dir: Path) -> None:
    stored_values, asked_values = asdict(stored), asdict(asked)
    conflicts = [
        f"{name}: {stored_values[name]!r} in the checkpoint, {asked_values[name]!r} asked"
        for name in stored_values
        if name not in RUNTIME_FIELDS and stored_values[name] != asked_values[name]
    ]
    if conflicts:
        raise UserError(
            f"the checkpoint in {out_dir} is of another run ({'; '.join(conflicts)}); "
            "resume with the run's own settings or choose another --out"
        )


# --------------------------------------------------------------------------------------------------
# Scores


def classification_error(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Number of wrong top-1 predictions (a tensor, so no device sync per batch)."""
    return (logits.argmax(dim=1) != targets).sum()


def mean_average_precision(
    scores: np.ndarray, targets: np.ndarray, ignore: np.ndarray | None = None
) -> float:
    """Mean over classes with at least one positive of sklearn's average precision.

    ``ignore`` (same shape, bool) leaves entries out of their class's score: VOC's images whose
    only objects of a class are marked difficult.
    """
    targets = targets > 0.5
    keep = np.ones_like(targets) if ignore is None else ~np.asarray(ignore, dtype=bool)
    precisions = [
        average_precision_score(targets[keep[:, k], k], scores[keep[:, k], k])
        for k in range(targets.shape[1])
        if targets[keep[:, k], k].any()
    ]
    return float(np.mean(precisions)) if precisions else float("nan")


class ScoreKeeper:
    """Accumulates loss and error (or scores for mAP) over the batches of one pass."""

    def __init__(self, multilabel: bool):
        self.multilabel = multilabel
        self.count = 0
        self._batch_losses: list[torch.Tensor] = []
        self._batch_errors: list[torch.Tensor] = []
        self._scores: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        batch = targets.shape[0]
        self.count += batch
        self._batch_losses.append(loss.detach() * batch)
        if self.multilabel:
            self._scores.append(logits.detach().float().cpu())
            self._targets.append(targets.detach().cpu())
        else:
            self._batch_errors.append(classification_error(logits.detach(), targets))

    def result(self, ignore: torch.Tensor | None = None) -> tuple[float, float]:
        """(mean loss, error) or (mean loss, mAP) for multi-label data, ``ignore`` as in
        :func:`mean_average_precision` (rows in the order the batches came)."""
        count = max(self.count, 1)
        loss = torch.stack(self._batch_losses).sum().item() / count if self._batch_losses else 0.0
        if self.multilabel:
            score = mean_average_precision(
                torch.cat(self._scores).numpy(),
                torch.cat(self._targets).numpy(),
                None if ignore is None else ignore.numpy(),
            )
        else:
            score = torch.stack(self._batch_errors).sum().item() / count
        return loss, score


# --------------------------------------------------------------------------------------------------
# The training run


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


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device
    np.random.seed(seed)
    random.seed(seed)


def build_model(config: TrainConfig, bundle) -> nn.Module:
    """The paper's net for ``bundle``'s data converted to ``config.rule``, initialised from seed."""
    torch.manual_seed(config.seed)
    model = models.paper_convnet(bundle.in_channels, bundle.image_size, bundle.num_classes)
    rule = RDD_LAYER_RULES if config.rule == "rdd" else config.rule
    return feedback.convert(model, rule, **config.rule_options())


#: Rules whose ``.feedback`` buffer holds the copy made at the last backward pass (before the last
#: optimiser step); ``refresh`` recomputes it from the current weight.
REFRESHED_RULES = ("bp", "usf", "frsf", "brsf")


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


class Training:
    """State of one run: data, model, optimiser, spiking phase, history. Use :func:`train`."""

    def __init__(self, config: TrainConfig, out_dir: Path, progress: bool = True):
        self.config = config
        self.out_dir = out_dir
        self.progress = progress
        self.device = resolve_device(config.device)
        if config.deterministic:  # process-wide switches; left as they are otherwise
            # cuBLAS needs this workspace setting for deterministic matrix products on CUDA.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False

        self.bundle = data.load_dataset(
            config.dataset,
            config.data_dir,
            download=config.download,
            image_size=config.image_size,
            augment=config.augment,
        )
        self.multilabel = self.bundle.multilabel
        self.train_set = _subset(self.bundle.train, config.limit_train)
        self.test_set = _subset(self.bundle.test, config.limit_test)
        if len(self.train_set) < config.batch_size:
            raise UserError(
                f"the training set has {len(self.train_set)} examples, fewer than one batch of "
                f"{config.batch_size}; lower --batch-size or raise --limit-train"
            )
        self.loader_generator = torch.Generator()
        pin = self.device.type == "cuda"
        # drop_last: a last batch of one example would break batch norm; the examples left out
        # differ from epoch to epoch.
        self.train_loader = DataLoader(
            self.train_set,
            batch_size=config.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=config.workers,
            generator=self.loader_generator,
            pin_memory=pin,
        )
        self.test_loader = DataLoader(
            self.test_set, batch_size=EVAL_BATCH_SIZE, num_workers=config.workers, pin_memory=pin
        )
        self.loss_fn = nn.BCEWithLogitsLoss() if self.multilabel else nn.CrossEntropyLoss()

        self.model = build_model(config, self.bundle).to(self.device)
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
        self.history: list[dict] = []

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
        from spikealign.phase import FeedbackPhase, PhaseConfig

        fc1, fc2, fc3 = (layer for _, layer in models.fc_layers(self.model))
        sizes = [fc1.in_features, fc1.out_features, fc2.out_features, fc3.out_features]
        phase_config = PhaseConfig(
            duration=self.config.rdd_time,
            estimator=self.config.estimator,
            update=self.config.update,
            seed=self.config.seed,
        )
        return FeedbackPhase(sizes, config=phase_config, progress=self.progress)

    def run_phase(self, epoch: int) -> float:
        """The spiking feedback-training phase before ``epoch``; returns its wall time in s."""
        layers = [layer for _, layer in models.fc_layers(self.model)]
        weights = [layer.weight.detach().cpu().double().numpy() for layer in layers]
        feedbacks = [layer.feedback.detach().cpu().double().numpy() for layer in layers]
        self.phase.config = replace(self.phase.config, seed=epoch_seed(self.config.seed, epoch))
        log_path = spike_log_path(self.out_dir, epoch)
        log_path.parent.mkdir(exist_ok=True)
        start = time.perf_counter()
        result = self.phase.run(weights=weights, feedbacks=feedbacks, log_path=log_path)
        for layer, new_feedback in zip(layers, result.feedbacks, strict=True):
            layer.set_feedback(torch.from_numpy(np.asarray(new_feedback)))
        return time.perf_counter() - start

    def train_epoch(self, bar_label: str) -> tuple[float, float]:
        self.model.train()
        keeper = ScoreKeeper(self.multilabel)
        decay = self.config.feedback_decay
        batches = tqdm(self.train_loader, desc=bar_label, leave=False, disable=not self.progress)
        for inputs, targets in batches:
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            logits = self.model(inputs)
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
        return keeper.result()

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
        return keeper.result(ignore=_difficult_only(self.test_set))

    def run_epoch(self, epoch: int) -> dict:
        """Phase (rdd), one training pass and the test; returns the epoch's metrics row."""
        start = time.perf_counter()
        seed = epoch_seed(self.config.seed, epoch)
        _seed_everything(seed)
        self.loader_generator.manual_seed(seed)
        phase_s = 0.0
        if self.phase is not None and (epoch - 1) % self.config.rdd_every == 0:
            phase_s = self.run_phase(epoch)
        train_loss, train_score = self.train_epoch(f"epoch {epoch}")
        test_loss, test_score = self.evaluate()
        values = [epoch, train_loss, train_score, test_loss, test_score]
        alignment = fc_alignment(self.model)
        values += [alignment[layer][key] for layer in FC_LAYERS for key in ALIGNMENT_KEYS]
        values += [phase_s, time.perf_counter() - start]
        return dict(zip(metric_columns(self.multilabel), values, strict=True))

    # -- checkpoint
    def checkpoint(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": asdict(self.config),
            "data": self.data_signature(),
            "epoch": len(self.history),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "phase": _numpy_to_torch(self.phase.state_dict()) if self.phase else None,
            "rng": rng_state(self.loader_generator),
            "history": self.history,
        }

    def load(self, checkpoint: dict) -> None:
        """Restore from a checkpoint, after checking that it is of this experiment and data."""
        stored = TrainConfig.from_dict(checkpoint["config"])
        _check_same_experiment(stored, self.config, self.out_dir)
        signature = self.data_signature()
        if checkpoint["data"] != signature:
            differences = ", ".join(
                f"{key} {checkpoint['data'].get(key)} in the checkpoint, {value} now"
                for key, value in signature.items()
                if checkpoint["data"].get(key) != value
            )
            raise UserError(
                f"the data does not match the checkpoint's ({differences}); "
                "point --data-dir at the data the run started with"
            )
        try:
            self.model.load_state_dict(checkpoint["model"])
        except RuntimeError as err:
            first_line = str(err).strip().splitlines()[0]
            raise UserError(
                f"the checkpoint's model does not fit this network: {first_line}"
            ) from None
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.phase is not None:
            self.phase.load_state_dict(_torch_to_numpy(checkpoint["phase"]))
        set_rng_state(checkpoint["rng"], self.loader_generator)
        self.history = list(checkpoint["history"])

    def fit(self) -> list[dict]:
        """Run the remaining epochs, saving checkpoint and metrics after each; then the figures."""
        done = len(self.history)
        epochs = tqdm(
            range(done + 1, self.config.epochs + 1),
            desc=f"{self.config.rule} on {self.config.dataset}",
            initial=done,
            total=self.config.epochs,
            disable=not self.progress,
        )
        for epoch in epochs:
            row = self.run_epoch(epoch)
            self.history.append(row)
            save_checkpoint(self.out_dir / CHECKPOINT_FILE, self.checkpoint())
            write_metrics(self.out_dir, self.history)
            epochs.set_postfix({key: f"{row[key]:.3f}" for key in list(row)[3:5]})
        epochs.close()
        plot_runs([RunRecord(self.out_dir, self.config, self.history)], self.out_dir)
        return self.history


def _prepare_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Create ``out_dir`` and check it can be written; refuse to clobber an existing run.

    A new run removes the files of an earlier one (with ``overwrite``, or when that run died
    before its first checkpoint).
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as err:
        raise UserError(
            f"cannot write to output directory {out_dir} ({err.strerror}); choose another --out"
        ) from None
    if resume:
        return
    if (out_dir / CHECKPOINT_FILE).exists() and not overwrite:
        raise UserError(
            f"{out_dir} already holds a run ({CHECKPOINT_FILE}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out"
        )
    run_files = [CONFIG_FILE, METRICS_CSV, METRICS_JSONL, CHECKPOINT_FILE]
    for name in run_files + [ERROR_FIGURE, ALIGNMENT_FIGURE]:
        (out_dir / name).unlink(missing_ok=True)
    for log in (out_dir / SPIKES_DIR).glob("epoch_*.h5*"):
        log.unlink()


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
    :data:`RUNTIME_FIELDS`; see :func:`resume_config`). Without it an existing run in ``out_dir`` is
    refused unless ``overwrite``.
    """
    out_dir = Path(out_dir)
    config.validate()
    checkpoint = load_checkpoint(out_dir / CHECKPOINT_FILE) if resume else None
    if checkpoint is not None and config.epochs < checkpoint["epoch"]:
        raise UserError(
            f"the run in {out_dir} has done {checkpoint['epoch']} epochs, more than the "
            f"{config.epochs} asked; resume with --epochs {checkpoint['epoch']} or more"
        )
    _prepare_out_dir(out_dir, resume, overwrite)
    run = Training(config, out_dir, progress=progress)
    if checkpoint is not None:
        run.load(checkpoint)
    write_config(out_dir, config)
    return run.fit()


# --------------------------------------------------------------------------------------------------
# Figures and the summary table


def _labels(runs: Sequence[RunRecord]) -> list[str]:
    """Rule names, with the directory name added where two runs share a rule."""
    rules = [run.config.rule for run in runs]
    return [
        f"{rule} ({run.path.name})" if rules.count(rule) > 1 else rule
        for rule, run in zip(rules, runs, strict=True)
    ]


def plot_runs(runs: Sequence[RunRecord], fig_dir: str | Path) -> tuple[Path, Path]:
    """Write error.png (test error or mAP, train dashed) and alignment.png into ``fig_dir``."""
    # matplotlib's object API (Agg canvas): no pyplot, so the caller's backend is left alone.
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig_dir = Path(fig_dir)
    try:
        fig_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create figure directory {fig_dir} ({err.strerror})") from None
    labels = _labels(runs)
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = [cycle[index % len(cycle)] for index in range(len(runs))]

    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    for run, label, color in zip(runs, labels, colors, strict=True):
        epochs = [row["epoch"] for row in run.rows]
        test_key = run.score_key
        train_key = test_key.replace("test", "train")
        axes.plot(epochs, [row[test_key] for row in run.rows], color=color, label=f"{label} test")
        axes.plot(epochs, [row[train_key] for row in run.rows], color=color, ls="--", alpha=0.6,
                  label=f"{label} train")  # fmt: skip
    multilabel = [run.multilabel for run in runs]
    ylabel = "mean average precision" if all(multilabel) else "error"
    if any(multilabel) and not all(multilabel):
        ylabel = "error (mAP for multi-label data)"
    axes.set(xlabel="epoch", ylabel=ylabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(fontsize="small")
    error_path = fig_dir / ERROR_FIGURE
    _save_figure(figure, error_path)

    figure = Figure(figsize=(11, 6), layout="constrained")
    axes = figure.subplots(2, len(FC_LAYERS), sharex=True)
    for column, layer in enumerate(FC_LAYERS):
        for run, label, color in zip(runs, labels, colors, strict=True):
            epochs = [row["epoch"] for row in run.rows]
            marker = "." if len(epochs) < 20 else None
            for row_axes, key in zip(axes[:, column], ("angle_deg", "sign_agreement"), strict=True):
                values = [row[f"{layer}_{key}"] for row in run.rows]
                row_axes.plot(epochs, values, color=color, label=label, marker=marker)
        axes[0, column].set_title(layer)
        axes[1, column].set_xlabel("epoch")
        axes[1, column].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].set_ylabel("angle between W and Y (deg)")
    axes[1, 0].set_ylabel("sign agreement (%)")
    axes[0, -1].legend(fontsize="small")
    alignment_path = fig_dir / ALIGNMENT_FIGURE
    _save_figure(figure, alignment_path)
    return error_path, alignment_path


def _save_figure(figure, path: Path) -> None:
    write_atomic(path, lambda file: figure.savefig(file, format="png", dpi=120), binary=True)


def summary_table(runs: Iterable[RunRecord]) -> str:
    """Final figures per run: rule, dataset, epochs, test error (or mAP), fc angle / sign."""
    header = ["run", "rule", "dataset", "epochs", "test score"]
    header += [f"{layer} angle/sign" for layer in FC_LAYERS]
    lines = [header]
    for run in runs:
        if not run.rows:
            lines.append([str(run.path), run.config.rule, run.config.dataset, "0", "-"] + ["-"] * 3)
            continue
        last = run.rows[-1]
        score_name = "mAP" if run.multilabel else "error"
        line = [
            str(run.path),
            run.config.rule,
            run.config.dataset,
            str(last["epoch"]),
            f"{score_name} {last[run.score_key]:.4f}",
        ]
        line += [
            f"{last[f'{layer}_angle_deg']:5.1f} / {last[f'{layer}_sign_agreement']:5.1f}"
            for layer in FC_LAYERS
        ]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
