"""What a training run is: :class:`TrainConfig`, its validation, and the per-epoch seeds.

Every flag of ``python -m training.run`` is a field of :class:`TrainConfig`; ``config.json`` of a
run directory is ``asdict(config)``. A config class used by :mod:`spikealign.trainer.loop` needs
``epochs``, ``seed``, ``device``, ``validate()``, ``from_dict()`` and the class variable
``runtime_fields``: the fields that say where and how a run executes, not what it computes, which a
resumed run may change.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

import numpy as np

from spikealign import data, feedback, models, recipes
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
#: Settings of the spiking feedback phase: given for another rule they would be silently unused.
PHASE_FIELDS = (
    "rdd_every", "rdd_time", "estimator", "update", "schedule", "target", "drive_gain",
    "noise_period",
)  # fmt: skip
#: Config fields that describe where and how a run executes, not what it computes; a resumed run
#: may change them (``epochs`` to extend the run).
RUNTIME_FIELDS = (
    "data_dir", "download", "device", "dist_backend", "workers", "epochs", "loader", "compile",
    "cuda_graph",
)  # fmt: skip
#: Seeds lie in [0, MAX_SEED): torch.manual_seed takes 64-bit integers, JSON readers int64.
MAX_SEED = 2**63
#: Where the training data are batched: "device" (spikealign.device_data: uint8 images on the
#: training device, batched augmentation there), "dataloader" (per-image transforms in DataLoader
#: workers), "auto" (device when the dataset is held in memory and fits, else dataloader).
LOADERS = ("auto", "device", "dataloader")
#: ``compile``: "off" (eager) or a torch.compile mode ("reduce-overhead" adds CUDA graphs).
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
#: Compile modes that make CUDA graphs themselves (so not together with ``cuda_graph``).
GRAPHING_COMPILE_MODES = ("reduce-overhead", "max-autotune")


@dataclass
class TrainConfig:
    """Everything that defines a training run. Defaults are the paper's (METHOD 6)."""

    runtime_fields: ClassVar[tuple[str, ...]] = RUNTIME_FIELDS

    dataset: str  # one of spikealign.data.DATASETS
    rule: str  # one of TRAIN_RULES
    arch: str = "paper"  # one of spikealign.models.ARCHS
    # last linear layer: "bp" (kept, the authors' default) or "rule"; None: "rule" for the paper
    # net (all its layers learn with the rule), "bp" for the others
    last_layer: str | None = None
    feedback_scales: str = "default"  # "default" (the rules' own) or "xiao2019" (METHOD 8)
    recipe: str | None = None  # spikealign.recipes entry whose values were applied (record only)
    data_dir: str = "data"
    download: bool = False
    image_size: int | None = None  # None: the dataset's own size
    augment: bool = True  # random crop / flip of the training images (spikealign.data)
    epochs: int = 100
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    # the learning rate is multiplied by lr_gamma after each of these epochs
    lr_milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    feedback_decay: float = 0.0  # lambda: Y <- Y - lambda * Y after every step (fa / learned)
    # Options of feedback.convert; None keeps the rule's default (see rule_options).
    feedback_scale: float | None = None  # bound of randomly drawn feedback (default 1/sqrt(fan_in))
    kp_lr: float | None = None  # kp: learning rate of the feedback update (default: lr); it
    # follows the lr schedule as the weights' rate does
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
    noise_period: float = 0.1  # s, the phase's noise-driven subset is redrawn this often (METHOD 2)
    device: str = "auto"  # "auto" (CUDA when present), "cpu" or "cuda"
    dist_backend: str = "auto"  # under torchrun: "auto" (nccl on CUDA, gloo on CPU), "nccl", "gloo"
    seed: int = 0
    deterministic: bool = False  # deterministic algorithms (slower on CUDA)
    workers: int | None = None  # DataLoader worker processes; None: 8 per GPU (CPU cores
    # allowing), 0 on the CPU
    amp: bool = False  # bf16 autocast of forward and loss (CUDA and CPU)
    channels_last: bool = False  # model and inputs in channels_last memory format
    loader: str = "auto"  # one of LOADERS
    compile: str = "off"  # torch.compile mode of forward + backward, one of COMPILE_MODES
    cuda_graph: bool = False  # replay one CUDA graph of the whole training step (trainer.graphs)
    rdd_overlap: bool = False  # rdd: run the phase for epoch e+1 in the background during epoch e
    limit_train: int | None = None  # train on a fixed random subset of this many examples
    limit_test: int | None = None  # test on a fixed random subset of this many examples
    track_conservation: bool = False  # drift of the conserved quantities per layer in the metrics

    def __post_init__(self) -> None:
        self.lr_milestones = list(self.lr_milestones)  # JSON and recipes give lists, flags tuples
        if self.last_layer is None:
            self.last_layer = "rule" if self.arch == "paper" else "bp"

    @classmethod
    def from_flags(cls, values: dict) -> TrainConfig:
        """A new run's config: ``values`` (the flags given) over the values of ``values['recipe']``
        (if any) over the defaults."""
        phase_flags = [f"--{n.replace('_', '-')}" for n in PHASE_FIELDS if n in values]
        if phase_flags and values.get("rule", "rdd") != "rdd":
            raise UserError(
                f"{', '.join(phase_flags)}: only for rule rdd (the spiking phase), but the rule is "
                f"{values['rule']}"
            )
        name = values.get("recipe")
        if name is None:
            return cls(**values)
        arch = values.get("arch", cls.arch)
        return cls(**{**recipes.recipe_values(name, arch, values.get("rule")), **values})

    def validate(self) -> None:
        """Raise UserError naming the first invalid field."""
        if self.dataset not in data.DATASETS:
            raise UserError(
                f"unknown dataset {self.dataset!r}; choose one of {', '.join(data.DATASETS)}"
            )
        if self.rule not in TRAIN_RULES:
            raise UserError(f"unknown rule {self.rule!r}; choose one of {', '.join(TRAIN_RULES)}")
        if self.arch not in models.ARCHS:
            raise UserError(f"unknown arch {self.arch!r}; choose one of {', '.join(models.ARCHS)}")
        if self.last_layer not in models.LAST_LAYER_CHOICES:
            raise UserError(
                f"unknown last_layer {self.last_layer!r}; choose one of "
                f"{', '.join(models.LAST_LAYER_CHOICES)}"
            )
        if self.feedback_scales not in models.FEEDBACK_SCALES:
            raise UserError(
                f"unknown feedback_scales {self.feedback_scales!r}; choose one of "
                f"{', '.join(models.FEEDBACK_SCALES)}"
            )
        if self.feedback_scales != "default" and self.feedback_scale is not None:
            raise UserError(
                f"feedback_scale and feedback_scales {self.feedback_scales} both set the feedback "
                "scale; give one of them"
            )
        if self.arch != "paper" and self.rule == "rdd":
            raise UserError(
                f"rule rdd learns the feedback of the paper net's fc layers; use --arch paper, "
                f"or another rule with --arch {self.arch}"
            )
        if self.rule == "rdd" and self.last_layer != "rule":
            raise UserError(
                "rule rdd learns the feedback of fc1, fc2 and fc3, so fc3 cannot stay on "
                "backprop; use --last-layer rule (the default for --arch paper)"
            )
        if self.recipe is not None and self.recipe not in recipes.RECIPES:
            raise UserError(
                f"unknown recipe {self.recipe!r}; choose one of {', '.join(recipes.RECIPES)}"
            )
        if any(m < 1 for m in self.lr_milestones) or self.lr_milestones != sorted(
            set(self.lr_milestones)
        ):
            raise UserError(
                f"lr_milestones must be increasing epochs >= 1, got {self.lr_milestones}"
            )
        if not 0 < self.lr_gamma <= 1:
            raise UserError(f"lr_gamma must lie in (0, 1], got {self.lr_gamma}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"unknown device {self.device!r}; choose auto, cpu or cuda")
        if self.dist_backend not in ("auto", "nccl", "gloo"):
            raise UserError(f"unknown backend {self.dist_backend!r}; choose auto, nccl or gloo")
        check_finite(self)
        positive = ("epochs", "batch_size", "rdd_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise UserError(
                "batch_size must be at least 2: the network's batch norm needs more than one "
                "example per batch to compute its statistics"
            )
        for name in ("lr", "momentum", "weight_decay", "feedback_decay", "workers"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise UserError(f"{name} must not be negative, got {getattr(self, name)}")
        check_seed(self.seed)
        if self.momentum >= 1:
            raise UserError(f"momentum must lie in [0, 1), got {self.momentum} (SGD diverges)")
        if self.feedback_scale is not None and not self.feedback_scale > 0:
            raise UserError(
                f"feedback_scale must be positive (the bound s of U(-s, s)), got "
                f"{self.feedback_scale}"
            )
        for name in ("kp_lr", "kp_weight_decay", "wm_lr", "wm_weight_decay", "wm_noise_std"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UserError(f"{name} must not be negative, got {value}")
        if not 0 <= self.feedback_decay < 1:
            raise UserError(f"feedback_decay must lie in [0, 1), got {self.feedback_decay}")
        if self.feedback_decay and self.rule not in DECAYED_RULES:
            raise UserError(
                f"feedback_decay applies to rules {' and '.join(DECAYED_RULES)}, not {self.rule} "
                "(kp and wm have their own weight decay options)"
            )
        if self.loader not in LOADERS:
            raise UserError(f"unknown loader {self.loader!r}; choose one of {', '.join(LOADERS)}")
        if self.compile not in COMPILE_MODES:
            raise UserError(
                f"unknown compile mode {self.compile!r}; choose one of {', '.join(COMPILE_MODES)}"
            )
        if self.cuda_graph and self.compile in GRAPHING_COMPILE_MODES:
            raise UserError(
                f"cuda_graph and compile mode {self.compile} both make CUDA graphs; use compile "
                "default or off with --cuda-graph"
            )
        if self.cuda_graph and self.rule == "dfa":
            raise UserError(
                "cuda_graph does not support rule dfa (its output-error hooks run outside the "
                "recorded step); leave out --cuda-graph"
            )
        if self.rdd_overlap and self.rule != "rdd":
            raise UserError(f"rdd_overlap applies to rule rdd only, but the rule is {self.rule}")
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

    def lr_factor(self, epoch: int) -> float:
        """lr_gamma per milestone already passed at ``epoch`` (1-based): the schedule's factor."""
        return self.lr_gamma ** sum(m < epoch for m in self.lr_milestones)

    def lr_at(self, epoch: int) -> float:
        """Learning rate of ``epoch`` (1-based): lr times the schedule's factor."""
        return self.lr * self.lr_factor(epoch)

    def phase_config(self, seed: int | None = None):
        """The spiking phase's PhaseConfig (rule rdd). Every phase spends the whole rdd_time:
        with the adaptive schedule no layer gets less than the reference's share, and the rest
        goes to the least certain layer."""
        from spikealign.lif import LIFParams
        from spikealign.phase import PhaseConfig

        return PhaseConfig(
            duration=self.rdd_time,
            estimator=self.estimator,
            update=self.update,
            schedule=self.schedule,
            target=self.target,
            stop_at_target=False,
            drive_gain=self.drive_gain,
            lif=LIFParams(noise_period=self.noise_period),
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
        return config_from_dict(cls, values, required=("dataset", "rule"))


def config_from_dict(cls, values: dict, required: tuple[str, ...], unknown_hint: str = ""):
    """``cls(**values)`` for a config dataclass, after checking that every key is a field, the
    ``required`` ones are given and each value fits its field's type (UserError otherwise)."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"unknown config field(s) {', '.join(unknown)}{unknown_hint}")
    missing = [name for name in required if values.get(name) is None]
    if missing:
        raise UserError(f"the config needs {' and '.join(missing)}")
    for f in fields(cls):
        if f.name in values and not _has_type(values[f.name], str(f.type)):
            raise UserError(f"config field {f.name} = {values[f.name]!r} is not of type {f.type}")
    return cls(**values)


def check_finite(config) -> None:
    """UserError naming the first float field of ``config`` that is NaN or infinite (NaN passes
    every range comparison, so this comes before them)."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{f.name} must be a finite number, got {value}")


def check_seed(seed: int) -> None:
    if not 0 <= seed < MAX_SEED:
        raise UserError(f"seed must lie in [0, 2**63), got {seed}")


def _has_type(value, annotation: str) -> bool:
    """Whether a JSON value fits a field annotation such as ``float`` or ``int | None``."""
    kinds = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "bool": lambda v: isinstance(v, bool),
        "None": lambda v: v is None,
    }
    names = [name.strip() for name in annotation.split("|")]
    return any(kinds.get(name, lambda v: True)(value) for name in names)


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
