"""What a training run is: :class:`TrainConfig`, its validation, and the per-epoch seeds.

Every flag of ``python -m training.run`` is a field of :class:`TrainConfig`; ``config.json`` of a
run directory is ``asdict(config)``. A config class used by :mod:`spikealign.trainer.loop` needs
``epochs``, ``seed``, ``device``, ``validate()``, ``from_dict()`` and the class variable
``runtime_fields``: the fields that say where and how a run executes, not what it computes, which a
resumed run may change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import numpy as np

from spikealign import data, feedback, models
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
RUNTIME_FIELDS = ("data_dir", "download", "device", "dist_backend", "workers", "epochs")


@dataclass
class TrainConfig:
    """Everything that defines a training run. Defaults are the paper's (METHOD 6)."""

    runtime_fields: ClassVar[tuple[str, ...]] = RUNTIME_FIELDS

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
    # phase schedule: "reference" (a third of rdd_time per fc layer) or "adaptive" (needs ols: the
    # same rdd_time per phase, each segment to the least certain layer below target)
    schedule: str = "reference"
    target: float = 80.0  # adaptive: predicted sign agreement (%) at which a layer stops
    drive_gain: float = 0.2  # W_hat = drive_gain * n_in * W / std(W) in the phase (METHOD 2)
    device: str = "auto"  # "auto" (CUDA when present), "cpu" or "cuda"
    dist_backend: str = "auto"  # under torchrun: "auto" (nccl on CUDA, gloo on CPU), "nccl", "gloo"
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
        if self.dist_backend not in ("auto", "nccl", "gloo"):
            raise UserError(f"unknown backend {self.dist_backend!r}; choose auto, nccl or gloo")
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
        if self.rule == "rdd":
            self.phase_config().validate()
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

    def phase_config(self, seed: int | None = None):
        """The spiking phase's PhaseConfig (rule rdd). Every phase spends the whole rdd_time:
        with the adaptive schedule, on the least certain layer once all are at target."""
        from spikealign.phase import PhaseConfig

        return PhaseConfig(
            duration=self.rdd_time,
            estimator=self.estimator,
            update=self.update,
            schedule=self.schedule,
            target=self.target,
            stop_at_target=False,
            drive_gain=self.drive_gain,
            seed=self.seed if seed is None else seed,
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


def check_same_experiment(stored, asked, where) -> None:
    """UserError unless the configs ``stored`` and ``asked`` agree on every non-runtime field."""
    stored_values, asked_values = asdict(stored), asdict(asked)
    conflicts = [
        f"{name}: {stored_values[name]!r} in the checkpoint, {asked_values[name]!r} asked"
        for name in stored_values
        if name not in type(stored).runtime_fields and stored_values[name] != asked_values[name]
    ]
    if conflicts:
        raise UserError(
            f"the checkpoint in {where} is of another run ({'; '.join(conflicts)}); "
            "resume with the run's own settings or choose another --out"
        )
