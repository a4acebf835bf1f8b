"""Experiments on the conservation laws and implicit regularisation of FA (METHOD section 9).

Many small independent networks (seeds x rules x learning rates) are trained side by side as one
*batched* MLP: run r has its own weights W_l[r] (stacked to shape R x out x in), its own feedback
B_l[r] and its own data order, and one step of the batch is one step of every run. Each layer is

    forward     h[r] = a[r] W_l[r]^T + c_l[r]              (a: R x batch x in, or batch x in shared)
    backward    dL/da[r] = delta[r] @ B_l[r]               (the error sent down, as the package)
                dL/dW_l[r] = delta[r]^T a[r],  dL/dc_l[r] = sum_n delta[r, n]

with the package's rules making B (``spikealign.feedback``): each block of consecutive runs with the
same rule is refreshed by that rule's own ``refresh`` (bp copies W, the sign rules write
|M| sign(W)), so the batched nets follow the package layers exactly (tested against them). Runs are
initialised by building the package model (``convert(mlp(...), rule)``) under each run's seed and
stacking its tensors. The loss is the sum over runs of each run's mean loss, so the gradients of
different runs never mix. SGD (torch's update: ``buf = m buf + (g + wd p)``, first step
``buf = g + wd p``; ``p -= lr buf``) runs with one learning rate per run.

Data live on the device as one tensor; a run holds indices into it (its subset) and its own labels
(label noise); minibatches are gathered by index, no DataLoader. Each run draws its epoch order from
its own generator seeded by its seed, so a run does not depend on the other runs of the batch.

Recipes of seed 000 (which experiment uses which is *open*; defaults here: (a) label-noise,
(b) n-class):

    (a) 6,000 epochs, lr 0.05, momentum 0.05, no weight decay, lr x0.1 every 1,000 epochs;
        batch size not given: 256 here (*open*)
    (b) batch 1024, 500 epochs, lr 0.01, momentum 0.9, weight decay 1e-4, lr x0.5 at 100 and 250

Experiments (each writes ``summary.json`` and PNG figures into its output directory):

    conservation   ReLU MLP, full-batch GD at several lr, the same time T = lr * steps for all:
                   drift of Q_k (``spikealign.conservation``) against lr (-> 0 as lr -> 0), and
                   Delta <b_k, v_k> against Delta 0.5 |w_k|^2 (the law: equal)
    min-norm       two-layer linear net W2 W1 on n < d synthetic samples, full-batch GD on
                   0.5 / n |W2 W1 X - Y|^2 from init scale s (weights = s x default init):
                   |W2 W1 - Y X^+|_F / |Y X^+|_F against s
    label-noise    random subset (4,000) with exactly 20 % of labels replaced by another class drawn
                   uniformly: accuracy on noisy train labels, on the clean labels, on the test set
    n-class        random n-class subsets: final test accuracy and W-B angle against n
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from spikealign import conservation, data, feedback, metrics
from spikealign.errors import UserError
from spikealign.trainer.distributed import resolve_device
from spikealign.trainer.rundir import write_atomic

__all__ = [
    "BATCHED_RULES",
    "EXPERIMENTS",
    "RECIPE_A",
    "RECIPE_B",
    "BatchedMLP",
    "Recipe",
    "Sweep",
    "TheoryConfig",
    "batched_sgd_step",
    "class_subset",
    "epoch_order",
    "label_noise",
    "mlp",
    "random_subset",
    "run_experiment",
]

#: Rules the batched MLP runs (their B is fixed or a function of W; kp / wm / dfa need the
#: package model, which ``training.run`` trains).
BATCHED_RULES = ("bp", "fa", "learned", "usf", "frsf", "brsf")
EXPERIMENTS = ("conservation", "min-norm", "label-noise", "n-class")
NOISE_FRACTION = 0.2


# --------------------------------------------------------------------------------------------
# Recipes and configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """SGD schedule: lr x ``gamma`` at each of ``milestones``; ``batch_size`` None: full batch."""

    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int | None
    milestones: tuple[int, ...]
    gamma: float

    def lr_factor(self, epoch: int) -> float:
        """Factor of the base lr during 1-based ``epoch``."""
        return self.gamma ** sum(epoch > milestone for milestone in self.milestones)


RECIPE_A = Recipe(6000, 0.05, 0.05, 0.0, 256, (1000, 2000, 3000, 4000, 5000), 0.1)
RECIPE_B = Recipe(500, 0.01, 0.9, 1e-4, 1024, (100, 250), 0.5)
RECIPES = {"a": RECIPE_A, "b": RECIPE_B}


@dataclass
class TheoryConfig:
    """Settings of one experiment; None means the experiment's documented default."""

    experiment: str
    dataset: str | None = None  # conservation: digits; label-noise: mnist; n-class: mnist
    data_dir: str = "data"
    device: str = "auto"
    seed: int = 0
    seeds: int | None = None  # independent repetitions (seed, seed + 1, ...)
    epochs: int | None = None  # shorten / lengthen the recipe
    recipe: str | None = None  # "a" or "b"
    hidden: tuple[int, ...] | None = None  # MLP hidden widths
    rules: tuple[str, ...] | None = None
    lrs: tuple[float, ...] | None = None  # conservation
    scales: tuple[float, ...] | None = None  # min-norm
    subset: int | None = None  # label-noise: training examples
    classes: tuple[int, ...] | None = None  # n-class: the values of n
    eval_every: int | None = None  # epochs between evaluations
    arch: str = "mlp"  # "mlp" (batched); conservation also "convnet" (small_convnet, one by one)
    progress: bool = True


# --------------------------------------------------------------------------------------------
# Subsets and label noise (reproducible from a seed)
# --------------------------------------------------------------------------------------------


def _generator(*seed: int) -> torch.Generator:
    state = np.random.SeedSequence(list(seed)).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def random_subset(total: int, size: int, seed: int) -> Tensor:
    """``size`` distinct indices of ``range(total)``, sorted, drawn from ``seed``."""
    if not 1 <= size <= total:
        raise UserError(f"subset size {size} must lie in 1..{total} (the dataset's size)")
    return torch.randperm(total, generator=_generator(seed, 1))[:size].sort().values


def label_noise(
    labels: Tensor, num_classes: int, seed: int, fraction: float = NOISE_FRACTION
) -> tuple[Tensor, Tensor]:
    """(noisy labels, flipped positions): exactly round(fraction * n) labels replaced.

    Each chosen label becomes another class drawn uniformly from the ``num_classes - 1`` others
    (``(y + u) mod C`` with u uniform in 1..C-1), so a flipped label is never its old class.
    """
    if num_classes < 2:
        raise UserError("label noise needs at least 2 classes")
    count = round(fraction * len(labels))
    generator = _generator(seed, 2)
    flipped = torch.randperm(len(labels), generator=generator)[:count].sort().values
    shift = torch.randint(1, num_classes, (count,), generator=generator)
    noisy = labels.clone()
    noisy[flipped] = (labels[flipped] + shift) % num_classes
    return noisy, flipped


def class_subset(num_classes: int, n: int, seed: int) -> Tensor:
    """``n`` distinct classes of ``range(num_classes)`` drawn from ``seed`` (sorted)."""
    if not 2 <= n <= num_classes:
        raise UserError(f"n-class: n = {n} must lie in 2..{num_classes}")
    return torch.randperm(num_classes, generator=_generator(seed, 3))[:n].sort().values


def epoch_order(generator: torch.Generator, size: int) -> Tensor:
    """The next epoch's example order of one run."""
    return torch.randperm(size, generator=generator)


# --------------------------------------------------------------------------------------------
# The batched MLP
# --------------------------------------------------------------------------------------------


def mlp(in_features: int, hidden: Sequence[int], out_features: int, relu: bool = True,
        bias: bool = True) -> nn.Sequential:  # fmt: skip
    """Linear -> ReLU -> ... -> Linear (identity activations when ``relu`` is False)."""
    sizes = [in_features, *hidden, out_features]
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if index:
            layers.append(nn.ReLU() if relu else nn.Identity())
        layers.append(nn.Linear(fan_in, fan_out, bias=bias))
    return nn.Sequential(*layers)


class BatchedLinearFeedback(torch.autograd.Function):
    """R linear feedback layers at once (see module docstring); ``feedback`` (R, out, in)."""

    @staticmethod
    def forward(ctx, input: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor):
        ctx.save_for_backward(input, feedback)
        ctx.has_bias = bias is not None
        output = torch.matmul(input, weight.transpose(1, 2))  # (R, n, out); input may be shared
        return output if bias is None else output + bias.unsqueeze(1)

    @staticmethod
    def backward(ctx, delta: Tensor):
        input, feedback = ctx.saved_tensors
        grad_input = torch.bmm(delta, feedback) if ctx.needs_input_grad[0] else None
        grad_weight = torch.matmul(delta.transpose(1, 2), input)
        grad_bias = delta.sum(1) if ctx.has_bias else None
        return grad_input, grad_weight, grad_bias, None


@dataclass
class _Block:
    """Consecutive runs [start, stop) of one layer that share a rule."""

    start: int
    stop: int
    rule: feedback.FeedbackRule
    view: SimpleNamespace  # weight / feedback / feedback_magnitude of these runs
    refresh: Callable[[], Tensor] | None


class BatchedMLP:
    """R independent package MLPs stacked along a leading run dimension (module docstring).

    Build with :meth:`from_models` from converted ``mlp`` models; ``weights[l]`` (R, out, in) and
    ``biases[l]`` (R, out) are leaf tensors with gradients, ``feedbacks[l]`` (R, out, in).
    """

    def __init__(self, models: Sequence[nn.Module], relu: bool = True):
        layer_lists = [feedback.feedback_layers(model) for model in models]
        if not models or any(len(layers) != len(layer_lists[0]) for layers in layer_lists):
            raise UserError("BatchedMLP needs one or more models with the same layers")
        self.relu = relu
        self.runs = len(models)
        self.weights: list[Tensor] = []
        self.biases: list[Tensor | None] = []
        self.feedbacks: list[Tensor] = []
        self.blocks: list[list[_Block]] = []
        self.rules = [[layer.rule for _, layer in layers] for layers in layer_lists]
        for index in range(len(layer_lists[0])):
            layers = [layers[index][1] for layers in layer_lists]
            for layer in layers:
                if layer.rule not in BATCHED_RULES:
                    raise UserError(
                        f"rule {layer.rule} cannot run batched (it needs the package model); "
                        f"batched rules: {', '.join(BATCHED_RULES)}"
                    )
            weight = torch.stack([layer.weight.detach() for layer in layers]).requires_grad_()
            bias = None
            if layers[0].bias is not None:
                bias = torch.stack([layer.bias.detach() for layer in layers]).requires_grad_()
            stacked_feedback = torch.stack([layer.feedback.detach() for layer in layers])
            self.weights.append(weight)
            self.biases.append(bias)
            self.feedbacks.append(stacked_feedback)
            self.blocks.append(self._blocks(layers, weight, stacked_feedback))

    @staticmethod
    def _blocks(layers, weight: Tensor, stacked_feedback: Tensor) -> list[_Block]:
        blocks, start = [], 0
        for stop in range(1, len(layers) + 1):
            if stop < len(layers) and layers[stop].rule == layers[start].rule:
                continue
            rule = layers[start].feedback_rule
            magnitude = None
            if hasattr(layers[start], "feedback_magnitude"):
                magnitudes = [layer.feedback_magnitude.detach() for layer in layers[start:stop]]
                magnitude = torch.stack(magnitudes)
                if magnitude.dim() == 1:  # usf: one scalar per run, broadcast over (out, in)
                    magnitude = magnitude.view(-1, 1, 1)
            view = SimpleNamespace(
                weight=weight.data[start:stop],
                feedback=stacked_feedback[start:stop],
                feedback_magnitude=magnitude,
            )
            refresh, _ = rule.backward_hooks(view, None)
            blocks.append(_Block(start, stop, rule, view, refresh))
            start = stop
        return blocks

    def to(self, device: torch.device) -> BatchedMLP:
        for index in range(len(self.weights)):
            self.weights[index] = self.weights[index].detach().to(device).requires_grad_()
            if self.biases[index] is not None:
                self.biases[index] = self.biases[index].detach().to(device).requires_grad_()
            self.feedbacks[index] = self.feedbacks[index].to(device)
            for block in self.blocks[index]:
                view = block.view
                view.weight = self.weights[index].data[block.start : block.stop]
                view.feedback = self.feedbacks[index][block.start : block.stop]
                if view.feedback_magnitude is not None:
                    view.feedback_magnitude = view.feedback_magnitude.to(device)
                block.refresh, _ = block.rule.backward_hooks(view, None)
        return self

    def parameters(self) -> list[Tensor]:
        return [
            p for pair in zip(self.weights, self.biases, strict=True) for p in pair if p is not None
        ]

    @torch.no_grad()
    def refresh_feedback(self) -> None:
        """Let each rule rewrite B from the current W (bp, sign rules), as its backward does."""
        for blocks in self.blocks[1:]:  # the first layer's B is never used
            for block in blocks:
                if block.refresh is not None:
                    block.refresh()

    def __call__(self, inputs: Tensor) -> Tensor:
        """Logits (R, n, out) for inputs (R, n, in) or (n, in) shared by all runs."""
        hidden = inputs
        for index, (weight, bias, fb) in enumerate(
            zip(self.weights, self.biases, self.feedbacks, strict=True)
        ):
            if index:
                hidden = F.relu(hidden) if self.relu else hidden
            hidden = BatchedLinearFeedback.apply(hidden, weight, bias, fb)
        return hidden

    @torch.no_grad()
    def quantities(self, run: int) -> conservation.Quantities:
        """conserved_quantities of run ``run`` (layer names '0', '2', ... as in ``mlp``)."""
        result = conservation.Quantities()
        for index in range(len(self.weights) - 1):
            block = next(b for b in self.blocks[index + 1] if b.start <= run < b.stop)
            rule = block.rule.name
            magnitude = block.view.feedback_magnitude
            if magnitude is not None:
                magnitude = magnitude[run - block.start]
                magnitude = magnitude.reshape(()) if magnitude.numel() == 1 else magnitude
            upper = SimpleNamespace(
                weight=self.weights[index + 1][run],
                feedback=self.feedbacks[index + 1][run],
                feedback_magnitude=magnitude,
            )
            name = str(2 * index)
            bias = None if self.biases[index] is None else self.biases[index][run]
            a = conservation.incoming(self.weights[index][run], bias).double().cpu()
            if rule not in conservation.LAW_RULES:
                result.skipped[name] = f"rule {rule} of the layer above has no law"
                continue
            c = conservation.coupling(rule, upper, a.numel()).double().cpu()
            result.incoming[name], result.coupling[name], result[name] = a, c, a - c
            result.rules[name] = rule
        return result

    @torch.no_grad()
    def alignment(self, run: int) -> dict[str, float]:
        """Angle (deg) between W_l and B_l of run ``run`` for layers 2..L (B of layer 1 unused)."""
        return {
            str(2 * index): metrics.alignment(self.weights[index][run], self.feedbacks[index][run])[
                "angle_deg"
            ]
            for index in range(1, len(self.weights))
        }


def build_batched(
    specs: Sequence[tuple[str, int]],
    in_features: int,
    hidden: Sequence[int],
    out_features: int,
    relu: bool = True,
    bias: bool = True,
    init_scales: Sequence[float] | None = None,
) -> tuple[BatchedMLP, list[nn.Module]]:
    """Batched MLP of runs ``specs`` = [(rule, seed)], each built as the package builds it.

    Run r: ``torch.manual_seed(seed)``, ``mlp(...)``, weights times ``init_scales[r]``, then
    ``convert(model, rule)``. Returns the batch and the package models (for checks).
    """
    models = []
    for index, (rule, seed) in enumerate(specs):
        torch.manual_seed(seed)
        model = mlp(in_features, hidden, out_features, relu=relu, bias=bias)
        if init_scales is not None:
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.mul_(init_scales[index])
        models.append(feedback.convert(model, rule))
    return BatchedMLP(models, relu=relu), models


@torch.no_grad()
def batched_sgd_step(
    params: Sequence[Tensor],
    buffers: list[Tensor | None],
    lr: Tensor,
    momentum: float,
    weight_decay: float,
) -> None:
    """torch.optim.SGD's update (dampening 0, no nesterov) with one lr per run (``lr``: (R,))."""
    for index, param in enumerate(params):
        grad = param.grad
        if weight_decay:
            grad = grad.add(param, alpha=weight_decay)
        if momentum:
            if buffers[index] is None:
                buffers[index] = grad.clone()
            else:
                buffers[index].mul_(momentum).add_(grad)
            grad = buffers[index]
        param.sub_(lr.view(-1, *[1] * (param.dim() - 1)) * grad)
        param.grad = None


# --------------------------------------------------------------------------------------------
# A sweep: R runs of one batched MLP on data held on the device
# --------------------------------------------------------------------------------------------


@dataclass
class Sweep:
    """What one batched training needs. Shapes: R runs, N examples per run.

    ``inputs`` (total, features) on the device; ``train_index`` (R, N) rows of ``inputs`` per run;
    ``train_labels`` (R, N) the labels trained on; ``evals``: {name: (index (R, M), labels (R, M))}
    accuracy sets evaluated every ``eval_every`` epochs (index into ``inputs`` too).
    """

    model: BatchedMLP
    inputs: Tensor
    train_index: Tensor
    train_labels: Tensor
    recipe: Recipe
    seeds: Sequence[int]
    lrs: Tensor | None = None  # (R,) base lr per run, default recipe.lr
    evals: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    eval_every: int = 1
    loss: str = "cross_entropy"  # or "mse" (targets are then float (R, N, out))
    track_conservation: bool = False
    stop_epoch: Tensor | None = None  # (R,) a run's lr is 0 after this epoch (None: all epochs)


@torch.no_grad()
def _predictions(model: BatchedMLP, inputs: Tensor, index: Tensor) -> Tensor:
    """Predicted class (R, M) of the examples ``inputs[index]``, in chunks of ~16 MB of input."""
    chunk = max(1, 2**22 // max(inputs.shape[1], 1) // index.shape[0])
    return torch.cat(
        [
            model(inputs[index[:, start : start + chunk]]).argmax(-1)
            for start in range(0, index.shape[1], chunk)
        ],
        dim=1,
    )


def _run_loss(kind: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """Sum over runs of each run's mean loss."""
    if kind == "mse":
        return 0.5 * (outputs - targets).pow(2).sum(-1).mean(1).sum()
    runs, batch, classes = outputs.shape
    per_example = F.cross_entropy(
        outputs.reshape(-1, classes), targets.reshape(-1), reduction="none"
    )
    return per_example.view(runs, batch).mean(1).sum()


def train_sweep(sweep: Sweep, progress: bool = True, label: str = "") -> list[dict]:
    """Train every run of ``sweep``; returns one history row per evaluation (epoch 0 included).

    A row: {"epoch", name: [accuracy per run] for each eval set, and with ``track_conservation``
    "drift": [{layer: drift} per run], "alignment": [{layer: angle} per run]}.
    """
    model, recipe = sweep.model, sweep.recipe
    device = sweep.inputs.device
    runs, size = sweep.train_index.shape
    base_lr = (
        torch.full((runs,), recipe.lr, device=device)
        if sweep.lrs is None
        else sweep.lrs.to(device=device, dtype=torch.float32)
    )
    generators = [_generator(seed, 4) for seed in sweep.seeds]
    batch = size if recipe.batch_size is None else min(recipe.batch_size, size)
    params = model.parameters()
    buffers: list[Tensor | None] = [None] * len(params)
    start_quantities = (
        [model.quantities(run) for run in range(runs)] if sweep.track_conservation else None
    )
    history = [_evaluate(sweep, 0, start_quantities)]
    run_index = torch.arange(runs, device=device).unsqueeze(1)
    epochs = tqdm(range(1, recipe.epochs + 1), desc=label, disable=not progress, leave=False)
    for epoch in epochs:
        lr = base_lr * recipe.lr_factor(epoch)
        if sweep.stop_epoch is not None:
            lr = torch.where(sweep.stop_epoch.to(device) >= epoch, lr, torch.zeros_like(lr))
        order = torch.stack([epoch_order(g, size) for g in generators]).to(device)
        for begin in range(0, size, batch):
            positions = order[:, begin : begin + batch]
            rows = torch.gather(sweep.train_index, 1, positions)
            targets = sweep.train_labels[run_index, positions]
            model.refresh_feedback()
            loss = _run_loss(sweep.loss, model(sweep.inputs[rows]), targets)
            loss.backward()
            batched_sgd_step(params, buffers, lr, recipe.momentum, recipe.weight_decay)
        if epoch % sweep.eval_every == 0 or epoch == recipe.epochs:
            history.append(_evaluate(sweep, epoch, start_quantities))
    return history


def _evaluate(sweep: Sweep, epoch: int, start_quantities) -> dict:
    model = sweep.model
    row: dict = {"epoch": epoch}
    predicted: dict[int, Tensor] = {}  # sets sharing an index tensor share the forward pass
    for name, (index, labels) in sweep.evals.items():
        if id(index) not in predicted:
            predicted[id(index)] = _predictions(model, sweep.inputs, index)
        row[name] = (predicted[id(index)] == labels).float().mean(1).tolist()
    if start_quantities is not None:
        model.refresh_feedback()
        now = [model.quantities(run) for run in range(model.runs)]
        row["drift"] = [
            conservation.drift(start_quantities[run], now[run]) for run in range(model.runs)
        ]
        row["incoming"] = [{k: float(v.mean()) for k, v in q.incoming.items()} for q in now]
        row["alignment"] = [model.alignment(run) for run in range(model.runs)]
    return row


# --------------------------------------------------------------------------------------------
# Data as tensors on the device
# --------------------------------------------------------------------------------------------


@dataclass
class FlatData:
    """A dataset's two splits as flat float tensors (CPU) and int64 labels."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) of the flattened images


def _stack(dataset) -> tuple[Tensor, Tensor]:
    if isinstance(dataset, torch.utils.data.TensorDataset):
        images, labels = dataset.tensors
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_size=1024)
        parts = list(loader)
        images = torch.cat([images for images, _ in parts])
        labels = torch.cat([torch.as_tensor(labels) for _, labels in parts])
    return images.reshape(len(images), -1).float(), labels.long()


def _load(name: str, data_dir: str, image_size: int | None = None) -> FlatData:
    bundle = data.load_dataset(name, data_dir, image_size=image_size, augment=False)
    if bundle.multilabel:
        raise UserError(f"dataset {name} is multi-label; these experiments need single labels")
    train_x, train_y = _stack(bundle.train)
    test_x, test_y = _stack(bundle.test)
    shape = (bundle.in_channels, bundle.image_size, bundle.image_size)
    return FlatData(train_x, train_y, test_x, test_y, bundle.num_classes, shape)


# --------------------------------------------------------------------------------------------
# Experiments
# --------------------------------------------------------------------------------------------

_DEFAULTS = {
    "conservation": dict(dataset="digits", hidden=(128, 128), rules=("fa", "usf", "bp"),
                         lrs=(0.2, 0.1, 0.05, 0.02), epochs=100, seeds=1),
    "min-norm": dict(rules=("fa", "bp"), scales=(1e-4, 1e-3, 1e-2, 1e-1, 1.0), epochs=2000,
                     seeds=1, hidden=(100,)),
    "label-noise": dict(dataset="mnist", hidden=(512, 512), rules=("bp", "fa", "usf"), seeds=3,
                        subset=4000, recipe="a"),
    "n-class": dict(dataset="mnist", hidden=(512, 512), rules=("bp", "fa"), seeds=1, recipe="b"),
}  # fmt: skip
#: n-class: the values of n per dataset (all classes last)
N_CLASS_VALUES = {
    "digits": (2, 4, 6, 8, 10),
    "mnist": (2, 4, 6, 8, 10),
    "cifar100": (2, 5, 10, 20, 50, 100),
    "tiny-imagenet": (2, 10, 50, 100, 200),
}
#: min-norm synthetic problem: samples n < input dimension d, outputs
MIN_NORM_SHAPE = dict(samples=20, inputs=100, outputs=5)
MIN_NORM_LR = 0.5
#: conservation: full-batch gradient descent, no momentum or weight decay (gradient flow)
EVALUATIONS = 60


def resolved(config: TheoryConfig) -> TheoryConfig:
    """``config`` with the experiment's defaults filled in, validated (UserError if not)."""
    if config.experiment not in EXPERIMENTS:
        raise UserError(
            f"unknown experiment {config.experiment!r}; choose one of {', '.join(EXPERIMENTS)}"
        )
    values = {k: v for k, v in asdict(config).items() if v is not None}
    full = TheoryConfig(**{**_DEFAULTS[config.experiment], **values})
    if full.recipe is not None and full.recipe not in RECIPES:
        raise UserError(f"unknown recipe {full.recipe!r}; choose a or b")
    for name in ("epochs", "seeds", "subset", "eval_every"):
        value = getattr(full, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if full.seed < 0:
        raise UserError(f"--seed must not be negative, got {full.seed}")
    if full.hidden is not None and (not full.hidden or min(full.hidden) < 1):
        raise UserError(f"--hidden needs positive widths, got {full.hidden}")
    for rule in full.rules or ():
        if rule not in BATCHED_RULES:
            raise UserError(
                f"unknown or unbatched rule {rule!r}; choose from {', '.join(BATCHED_RULES)}"
            )
    if full.lrs is not None and min(full.lrs) <= 0:
        raise UserError(f"--lrs must be positive, got {full.lrs}")
    if full.scales is not None and min(full.scales) <= 0:
        raise UserError(f"--scales must be positive, got {full.scales}")
    if full.arch not in ("mlp", "convnet") or (
        full.arch == "convnet" and full.experiment != "conservation"
    ):
        raise UserError(
            f"--arch {full.arch}: the experiments run the mlp; conservation also runs 'convnet'"
        )
    if full.dataset is not None and full.dataset not in data.DATASETS:
        raise UserError(
            f"unknown dataset {full.dataset!r}; choose one of {', '.join(data.DATASETS)}"
        )
    resolve_device(full.device)
    return full


def _recipe(config: TheoryConfig) -> Recipe:
    recipe = RECIPES[config.recipe]
    return recipe if config.epochs is None else replace(recipe, epochs=config.epochs)


def _eval_every(config: TheoryConfig, epochs: int) -> int:
    return config.eval_every or max(1, epochs // EVALUATIONS)


def run_experiment(config: TheoryConfig, out_dir: str | Path) -> dict:
    """Run ``config.experiment``; write ``out_dir/summary.json`` and figures; return the summary."""
    config = resolved(config)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create output directory {out_dir} ({err.strerror})") from None
    device = resolve_device(config.device)
    start = time.perf_counter()
    experiment = {
        "conservation": _conservation,
        "min-norm": _min_norm,
        "label-noise": _label_noise,
        "n-class": _n_class,
    }[config.experiment]
    summary, figures = experiment(config, device)
    summary = {
        "experiment": config.experiment,
        "config": asdict(config),
        "device": str(device),
        "wall_s": time.perf_counter() - start,
        **summary,
    }
    _write_json(out_dir / "summary.json", summary)
    for name, figure in figures.items():
        _save_figure(figure, out_dir / name)
    return summary


def _write_json(path: Path, value) -> None:
    write_atomic(path, lambda file: json.dump(value, file, indent=1, default=_json_default))


def _json_default(value):
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(type(value).__name__)


def _save_figure(figure, path: Path) -> None:
    write_atomic(path, lambda file: figure.savefig(file, format="png", dpi=120), binary=True)


def _figure(columns: int = 1, width: float = 5.0):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * columns, 3.8), layout="constrained")
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, axes


def _nan_to_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


# ---- conservation


def _conservation(config: TheoryConfig, device: torch.device):
    image_size = 8 if config.dataset == "digits" else None
    dataset = _load(config.dataset, config.data_dir, image_size)
    lrs = sorted(config.lrs, reverse=True)
    seeds = [config.seed + offset for offset in range(config.seeds)]
    specs, run_lrs, steps = [], [], []
    for rule in config.rules:
        for seed in seeds:
            for lr in lrs:
                specs.append((rule, seed))
                run_lrs.append(lr)
                steps.append(round(config.epochs * lrs[0] / lr))  # same time T = lr * steps
    if config.arch == "convnet":
        return _conservation_convnet(config, device, dataset, specs, run_lrs, steps)
    model, _ = build_batched(specs, dataset.train_x.shape[1], config.hidden, dataset.num_classes)
    model.to(device)
    inputs = dataset.train_x.to(device)
    size = len(inputs)
    runs = len(specs)
    index = torch.arange(size, device=device).expand(runs, size)
    labels = dataset.train_y.to(device).expand(runs, size)
    total = max(steps)
    recipe = Recipe(total, 1.0, 0.0, 0.0, None, (), 1.0)
    start_weights = [w.detach().clone() for w in model.weights]
    sweep = Sweep(
        model,
        inputs,
        index,
        labels,
        recipe,
        [seed for _, seed in specs],
        lrs=torch.tensor(run_lrs),
        evals={"train": (index, labels)},
        eval_every=_eval_every(config, total),
        track_conservation=True,
        stop_epoch=torch.tensor(steps),
    )
    start_quantities = [model.quantities(run) for run in range(runs)]
    history = train_sweep(sweep, config.progress, "conservation")
    final = [model.quantities(run) for run in range(runs)]
    results = []
    for run, ((rule, seed), lr, count) in enumerate(zip(specs, run_lrs, steps, strict=True)):
        moved = {
            str(2 * layer): float(
                (model.weights[layer][run].detach() - start_weights[layer][run]).norm()
                / start_weights[layer][run].norm()
            )
            for layer in range(len(model.weights))
        }
        drift = conservation.drift(start_quantities[run], final[run])
        results.append(
            dict(
                rule=rule,
                seed=seed,
                lr=lr,
                steps=count,
                time=lr * count,
                drift=drift,
                max_drift=max(drift.values()),
                weight_change=moved,
                train_accuracy=history[-1]["train"][run],
            )
        )
    figures = _conservation_figures(
        config, specs, run_lrs, results, start_quantities, final, history
    )
    summary = {"runs": results, "drift_lr_slope": _slopes(config, results)}
    return {**summary, "history": _nan_to_none(history)}, figures


def _slopes(config: TheoryConfig, results: list[dict]) -> dict[str, float | None]:
    """Log-log slope of the max drift against lr per rule (1: drift proportional to lr)."""
    slopes = {}
    for rule in config.rules:
        chosen = [r for r in results if r["rule"] == rule]
        x = np.log([r["lr"] for r in chosen])
        y = np.log([max(r["max_drift"], 1e-300) for r in chosen])
        slopes[rule] = float(np.polyfit(x, y, 1)[0]) if len(set(x)) > 1 else None
    return slopes


def small_convnet(in_channels: int, image_size: int, num_classes: int) -> nn.Sequential:
    """conv 3x3 (pad 1) C->8, relu, maxpool 2, conv 3x3 8->16, relu, maxpool 2, flatten, linear.

    No batch norm, so both conv -> conv and conv -> linear (through the flatten) have a law.
    """
    side = image_size // 4
    if side < 1:
        raise UserError(f"small_convnet needs images of at least 4x4 pixels, got {image_size}")
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * side * side, num_classes),
    )  # fmt: skip


def _conservation_convnet(config, device, dataset: FlatData, specs, run_lrs, steps):
    """The conservation experiment on ``small_convnet``: package models trained one by one."""
    channels, height, width = dataset.image_shape
    inputs = dataset.train_x.view(-1, channels, height, width).to(device)
    labels = dataset.train_y.to(device)
    results, start_quantities, final = [], [], []
    for (rule, seed), lr, count in tqdm(
        list(zip(specs, run_lrs, steps, strict=True)), desc="conservation (convnet)",
        disable=not config.progress, leave=False,
    ):  # fmt: skip
        torch.manual_seed(seed)
        model = feedback.convert(small_convnet(channels, height, dataset.num_classes), rule)
        model.to(device)
        pairs = conservation.layer_pairs(model)
        start = conservation.conserved_quantities(model, pairs)
        weights = {name: layer.weight.detach().clone() for name, layer in
                   feedback.feedback_layers(model)}  # fmt: skip
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(count):  # full-batch gradient descent
            loss = F.cross_entropy(model(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        now = conservation.conserved_quantities(model, pairs)
        drift = conservation.drift(start, now)
        with torch.no_grad():
            accuracy = float((model(inputs).argmax(1) == labels).float().mean())
        moved = {
            name: float((layer.weight.detach() - weights[name]).norm() / weights[name].norm())
            for name, layer in feedback.feedback_layers(model)
        }
        results.append(dict(rule=rule, seed=seed, lr=lr, steps=count, time=lr * count,
                            drift=drift, max_drift=max(drift.values()), weight_change=moved,
                            train_accuracy=accuracy, skipped=start.skipped))  # fmt: skip
        start_quantities.append(start)
        final.append(now)
    figures = _conservation_figures(config, specs, run_lrs, results, start_quantities, final, None)
    return {"runs": results, "drift_lr_slope": _slopes(config, results)}, figures


def _conservation_figures(config, specs, run_lrs, results, start_q, final_q, history):
    figure, (axes,) = _figure()
    for rule in config.rules:
        chosen = [r for r in results if r["rule"] == rule]
        axes.loglog([r["lr"] for r in chosen], [r["max_drift"] for r in chosen], "o-", label=rule)
    axes.set(
        xlabel="learning rate (same time lr x steps)",
        ylabel="max relative drift of Q_k",
        title="drift -> 0 as lr -> 0",
    )
    axes.legend()
    figures = {"conservation_drift.png": figure}

    smallest = min(run_lrs)
    figure, axes = _figure(len(config.rules))
    for column, rule in enumerate(config.rules):
        run = next(
            i
            for i, ((r, _), lr) in enumerate(zip(specs, run_lrs, strict=True))
            if r == rule and lr == smallest
        )
        for name in final_q[run]:
            d_in = final_q[run].incoming[name] - start_q[run].incoming[name]
            d_c = final_q[run].coupling[name] - start_q[run].coupling[name]
            axes[column].scatter(d_in, d_c, s=6, label=f"layer {name}")
        low, high = axes[column].get_xlim()
        axes[column].plot([low, high], [low, high], "k--", lw=0.8)
        axes[column].set(
            xlabel="change of 0.5 |w_k|^2",
            ylabel="change of coupling C_k",
            title=f"{rule}, lr {smallest:g}",
        )
        axes[column].legend(fontsize="small")
    figures["conservation_law.png"] = figure
    if history is None:
        return figures

    figure, (axes,) = _figure()
    for run, ((rule, _), lr) in enumerate(zip(specs, run_lrs, strict=True)):
        if rule != "fa" or lr != smallest:
            continue
        for name in ("0",):
            key = str(int(name) + 2)
            norms = [row["incoming"][run][name] for row in history]
            angles = [row["alignment"][run][key] for row in history]
            axes.plot(norms, angles, "o-", ms=3, label=f"fa: W/B of layer {key} vs layer {name}")
    axes.set(
        xlabel="mean 0.5 |w_k|^2 of the lower layer",
        ylabel="angle W-B above (deg)",
        title="alignment grows with the incoming norm",
    )
    axes.legend(fontsize="small")
    figures["conservation_alignment.png"] = figure
    return figures


# ---- min-norm


def min_norm_problem(seed: int) -> tuple[Tensor, Tensor]:
    """(X: samples x inputs, Y: samples x outputs), Gaussian, X rows scaled to norm ~1."""
    generator = _generator(seed, 5)
    shape = MIN_NORM_SHAPE
    inputs = torch.randn(shape["samples"], shape["inputs"], generator=generator)
    inputs /= math.sqrt(shape["inputs"])
    targets = torch.randn(shape["samples"], shape["outputs"], generator=generator)
    return inputs, targets


def _min_norm(config: TheoryConfig, device: torch.device):
    scales = list(config.scales)
    results = []
    seeds = [config.seed + offset for offset in range(config.seeds)]
    specs, run_scales = [], []
    for rule in config.rules:
        for seed in seeds:
            for scale in scales:
                specs.append((rule, seed))
                run_scales.append(scale)
    figure, (axes,) = _figure()
    distances = []
    for seed in seeds:
        chosen = [i for i, (_, s) in enumerate(specs) if s == seed]
        inputs, targets = min_norm_problem(seed)
        model, _ = build_batched(
            [specs[i] for i in chosen],
            inputs.shape[1],
            config.hidden,
            targets.shape[1],
            relu=False,
            bias=False,
            init_scales=[run_scales[i] for i in chosen],
        )
        model.to(device)
        runs, size = len(chosen), len(inputs)
        index = torch.arange(size, device=device).expand(runs, size)
        recipe = Recipe(config.epochs, MIN_NORM_LR, 0.0, 0.0, None, (), 1.0)
        sweep = Sweep(
            model,
            inputs.to(device),
            index,
            targets.to(device).expand(runs, -1, -1),
            recipe,
            [seed] * runs,
            loss="mse",
            eval_every=config.epochs,
        )
        train_sweep(sweep, config.progress, f"min-norm seed {seed}")
        solution = targets.T.double() @ torch.linalg.pinv(inputs.T.double())  # Y X^+ (out, in)
        with torch.no_grad():
            for position, run in enumerate(chosen):
                product = model.weights[0][position].double().cpu()
                for weight in model.weights[1:]:
                    product = weight[position].double().cpu() @ product
                residual = (product @ inputs.T.double() - targets.T.double()).norm()
                distance = float((product - solution).norm() / solution.norm())
                distances.append(distance)
                results.append(
                    dict(
                        rule=specs[run][0],
                        seed=seed,
                        scale=run_scales[run],
                        relative_distance=distance,
                        relative_residual=float(residual / targets.norm()),
                    )
                )
    for rule in config.rules:
        chosen = [r for r in results if r["rule"] == rule]
        axes.loglog(
            [r["scale"] for r in chosen], [r["relative_distance"] for r in chosen], "o", label=rule
        )
    axes.set(
        xlabel="initial scale",
        ylabel="|W2 W1 - Y X^+| / |Y X^+|",
        title="distance to the minimum-norm solution",
    )
    axes.legend()
    return {"runs": results, "problem": MIN_NORM_SHAPE, "lr": MIN_NORM_LR}, {"min_norm.png": figure}


# ---- label noise


def noisy_subset(labels: Tensor, num_classes: int, size: int, seed: int) -> dict:
    """The record of one seed's subset: indices, flipped positions, clean and noisy labels."""
    indices = random_subset(len(labels), size, seed)
    clean = labels[indices]
    noisy, flipped = label_noise(clean, num_classes, seed)
    return dict(indices=indices, flipped=flipped, clean_labels=clean, noisy_labels=noisy)


def _label_noise(config: TheoryConfig, device: torch.device):
    dataset = _load(config.dataset, config.data_dir)
    sweep, specs, records = label_noise_sweep(config, dataset, device)
    recipe, evals = sweep.recipe, sweep.evals
    history = train_sweep(sweep, config.progress, "label-noise")
    return _label_noise_results(config, specs, records, recipe, evals, history)


def label_noise_sweep(config: TheoryConfig, dataset: FlatData, device: torch.device):
    """(sweep, [(rule, seed)], {seed: noisy_subset record}) of the label-noise experiment.

    ``config`` must be :func:`resolved`; ``dataset`` may be any flat data (the benchmark uses
    random MNIST-shaped data).
    """
    recipe = _recipe(config)
    seeds = [config.seed + offset for offset in range(config.seeds)]
    records = {
        seed: noisy_subset(dataset.train_y, dataset.num_classes, config.subset, seed)
        for seed in seeds
    }
    specs = [(rule, seed) for rule in config.rules for seed in seeds]
    model, _ = build_batched(specs, dataset.train_x.shape[1], config.hidden, dataset.num_classes)
    model.to(device)
    inputs = torch.cat([dataset.train_x, dataset.test_x]).to(device)
    train_index = torch.stack([records[seed]["indices"] for _, seed in specs]).to(device)
    noisy = torch.stack([records[seed]["noisy_labels"] for _, seed in specs]).to(device)
    clean = torch.stack([records[seed]["clean_labels"] for _, seed in specs]).to(device)
    flipped = torch.stack([records[seed]["flipped"] for _, seed in specs]).to(device)
    test_index = torch.arange(len(dataset.test_y), device=device) + len(dataset.train_y)
    test_index = test_index.expand(len(specs), -1)
    test_labels = dataset.test_y.to(device).expand(len(specs), -1)
    evals = {
        "train_noisy": (train_index, noisy),
        "train_clean": (train_index, clean),
        "flipped_memorised": (
            torch.gather(train_index, 1, flipped),
            torch.gather(noisy, 1, flipped),
        ),
        "test": (test_index, test_labels),
    }
    sweep = Sweep(
        model,
        inputs,
        train_index,
        noisy,
        recipe,
        [seed for _, seed in specs],
        evals=evals,
        eval_every=_eval_every(config, recipe.epochs),
    )
    return sweep, specs, records


def _label_noise_results(config, specs, records, recipe, evals, history):
    final = {
        name: {
            rule: [history[-1][name][i] for i, (r, _) in enumerate(specs) if r == rule]
            for rule in config.rules
        }
        for name in evals
    }
    summary = {
        "recipe": asdict(recipe),
        "runs": [dict(rule=rule, seed=seed) for rule, seed in specs],
        "final": final,
        "history": history,
        "subsets": {
            str(seed): {k: v.tolist() for k, v in record.items()}
            for seed, record in records.items()
        },
        "noise_fraction": NOISE_FRACTION,
    }
    return summary, {"label_noise.png": _curves_figure(specs, config.rules, history, evals)}


def _curves_figure(specs, rules, history, names):
    titles = {
        "train_noisy": "train accuracy (noisy labels)",
        "train_clean": "train accuracy (clean labels)",
        "flipped_memorised": "flipped examples fitted",
        "test": "test accuracy",
    }
    figure, axes = _figure(len(names), width=4.0)
    epochs = [row["epoch"] for row in history]
    for column, name in enumerate(names):
        for rule in rules:
            runs = [i for i, (r, _) in enumerate(specs) if r == rule]
            values = np.array([[row[name][i] for i in runs] for row in history])
            line = axes[column].plot(epochs, values.mean(1), label=rule)[0]
            axes[column].fill_between(
                epochs, values.min(1), values.max(1), alpha=0.2, color=line.get_color()
            )
        axes[column].set(xlabel="epoch", title=titles.get(name, name), ylim=(0, 1.02))
    axes[0].legend()
    return figure


# ---- n-class


def _n_class(config: TheoryConfig, device: torch.device):
    dataset = _load(config.dataset, config.data_dir)
    values = config.classes or tuple(
        n
        for n in N_CLASS_VALUES.get(config.dataset, (2, dataset.num_classes))
        if n <= dataset.num_classes
    )
    recipe = _recipe(config)
    seeds = [config.seed + offset for offset in range(config.seeds)]
    inputs = torch.cat([dataset.train_x, dataset.test_x]).to(device)
    results = []
    for n in values:
        for seed in seeds:
            classes = class_subset(dataset.num_classes, n, seed)
            remap = torch.full((dataset.num_classes,), -1, dtype=torch.long)
            remap[classes] = torch.arange(n)
            train_rows = torch.nonzero(remap[dataset.train_y] >= 0).squeeze(1)
            test_rows = torch.nonzero(remap[dataset.test_y] >= 0).squeeze(1)
            specs = [(rule, seed) for rule in config.rules]
            runs = len(specs)
            model, _ = build_batched(specs, inputs.shape[1], config.hidden, n)
            model.to(device)
            train_index = train_rows.to(device).expand(runs, -1)
            train_labels = remap[dataset.train_y[train_rows]].to(device).expand(runs, -1)
            test_index = (test_rows + len(dataset.train_y)).to(device).expand(runs, -1)
            test_labels = remap[dataset.test_y[test_rows]].to(device).expand(runs, -1)
            sweep = Sweep(
                model,
                inputs,
                train_index,
                train_labels,
                recipe,
                [seed] * runs,
                evals={"test": (test_index, test_labels), "train": (train_index, train_labels)},
                eval_every=recipe.epochs,
            )
            history = train_sweep(sweep, config.progress, f"n-class n={n} seed {seed}")
            model.refresh_feedback()
            for run, (rule, _) in enumerate(specs):
                angles = model.alignment(run)
                results.append(
                    dict(
                        n=int(n),
                        seed=seed,
                        rule=rule,
                        classes=classes.tolist(),
                        test_accuracy=history[-1]["test"][run],
                        train_accuracy=history[-1]["train"][run],
                        angle_deg=angles,
                        mean_angle_deg=float(np.mean(list(angles.values()))),
                    )
                )
    figure, axes = _figure(2)
    for rule in config.rules:
        chosen = [r for r in results if r["rule"] == rule]
        ns = sorted({r["n"] for r in chosen})
        for column, key in enumerate(("test_accuracy", "mean_angle_deg")):
            means = [np.mean([r[key] for r in chosen if r["n"] == n]) for n in ns]
            axes[column].plot(ns, means, "o-", label=rule)
    axes[0].set(xlabel="number of classes n", ylabel="test accuracy", xscale="log")
    axes[1].set(xlabel="number of classes n", ylabel="mean angle W-B (deg)", xscale="log")
    axes[0].legend()
    return {"recipe": asdict(recipe), "runs": _nan_to_none(results)}, {"n_class.png": figure}
