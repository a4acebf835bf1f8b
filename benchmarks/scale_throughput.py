"""Training images per second at ImageNet scale: every rule against plain backprop, one run.

One training step = forward (under bf16 autocast with --amp), loss, zero_grad, backward, SGD step
(momentum 0.9, weight decay 1e-4), ``feedback.step_feedback``. The batch is synthetic, made once
on the device (224 x 224 by default), so the figures are the model's, not the data loader's.

Variants of each model: the unconverted network ("plain backprop") and the network converted with
every rule in RULES (all conv and linear layers, the last one too). They are built from the same
initial weights and timed in interleaved rounds (order shuffled per round); a variant's ratio is
the median over rounds of (plain backprop's step time / the variant's) in the same round, i.e.
its throughput as a fraction of plain backprop's. Settings: float32, --amp (bf16 autocast),
--channels-last, and both; by default every one.

Goal: usf, frsf, fa and learned at >= 0.90 of plain backprop in every setting.

RetinaNet (``--models retinanet``, METHOD 8): torchvision's RetinaNet ResNet-50-FPN, 91 classes,
every conv of trunk, FPN and heads converted; its batch is a list of ``--image-size`` x
``5/3 --image-size`` images (800 x 1333 on a GPU, 256 x 426 on the CPU) with 4 random boxes each,
and its loss is torchvision's (focal + box regression). Batch 8 on a GPU, 1 on the CPU.

Clock: wall time on a GPU (synchronised). On the CPU the default is the process's CPU time
(``--clock cpu``) with one torch thread: on a machine shared with other jobs, wall time mostly
measures the neighbours, while the CPU time a step costs is what a rule adds or saves.

Models are a table (MODELS): to add one (e.g. a detector), give a builder, a synthetic batch
maker and a loss; everything else is shared.

    python benchmarks/scale_throughput.py                      # GPU: batch 256, < 3 min on an H100
    python benchmarks/scale_throughput.py --batch 8 --rounds 3 # CPU
    python benchmarks/scale_throughput.py --models resnet18 --settings amp+channels_last
    python benchmarks/scale_throughput.py --models retinanet --settings fp32 amp --steps 2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spikealign import detection  # noqa: E402
from spikealign.feedback import step_feedback  # noqa: E402
from spikealign.models import alexnet_bn, convert_model, resnet18  # noqa: E402

PLAIN = "plain bp"
RULES = ("bp", "usf", "fa", "frsf", "brsf", "learned")
GOAL_RULES = ("usf", "frsf", "fa", "learned")
GOAL = 0.90
SETTINGS = ("fp32", "amp", "channels_last", "amp+channels_last")
NUM_CLASSES = 1000
COCO_CLASSES = 91  # as torchvision's COCO detectors
BOXES_PER_IMAGE = 4


def classification_batch(batch: int, image_size: int, device) -> tuple[Tensor, Tensor]:
    inputs = torch.randn(batch, 3, image_size, image_size, device=device)
    return inputs, torch.randint(0, NUM_CLASSES, (batch,), device=device)


def classification_loss(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(model(inputs), targets)


def detection_width(image_size: int) -> int:
    """Long side of the detection images: 1333 for 800, COCO's usual bounds."""
    return image_size * 5 // 3


def build_retinanet(image_size: int) -> nn.Module:
    # resize bounds equal to the synthetic images' size: the model's transform keeps them as is
    return detection.build_retinanet(COCO_CLASSES, image_size, detection_width(image_size))


def detection_batch(batch: int, image_size: int, device) -> tuple[list, list]:
    """Random images in [0, 1] with random boxes (at least 16 px a side) and labels."""
    height, width = image_size, detection_width(image_size)
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, height, width, device=device))
        corner = torch.rand(BOXES_PER_IMAGE, 2) * torch.tensor([width - 16, height - 16])
        size = 16 + torch.rand(BOXES_PER_IMAGE, 2) * (torch.tensor([width, height]) - 16 - corner)
        boxes = torch.cat([corner, corner + size], dim=1)
        labels = torch.randint(1, COCO_CLASSES, (BOXES_PER_IMAGE,))
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images, targets


def detection_loss(model: nn.Module, images: list, targets: list) -> Tensor:
    """RetinaNet's training loss: focal classification loss + box regression loss."""
    return sum(model(images, targets).values())


@dataclass(frozen=True)
class BenchModel:
    """One row of the model table: builder (given the image size), batch maker, loss, defaults."""

    build: Callable[[int], nn.Module]
    batch: Callable[[int, int, torch.device], tuple] = classification_batch
    loss: Callable[..., Tensor] = classification_loss
    gpu_batch: int = 256
    cpu_batch: int = 8
    gpu_image_size: int = 224
    cpu_image_size: int = 224


MODELS: dict[str, BenchModel] = {
    "resnet18": BenchModel(lambda size: resnet18(NUM_CLASSES)),
    "alexnet_bn": BenchModel(lambda size: alexnet_bn(NUM_CLASSES)),
    "retinanet": BenchModel(
        build_retinanet,
        detection_batch,
        detection_loss,
        8,
        1,
        gpu_image_size=800,
        cpu_image_size=256,
    ),  # fmt: skip
}
#: Models timed when --models is not given (RetinaNet takes minutes of its own; ask for it).
DEFAULT_MODELS = ("resnet18", "alexnet_bn")


class Variant:
    """A model copy with its optimiser, timed step by step."""

    def __init__(self, model: nn.Module, spec: BenchModel, amp: bool, device: torch.device, clock):
        self.model, self.spec, self.amp, self.device = model.train(), spec, amp, device
        self.clock = clock
        self.optimizer = torch.optim.SGD(
            model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4
        )

    def step(self, batch) -> None:
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.amp
            else contextlib.nullcontext()
        )
        with autocast:
            loss = self.spec.loss(self.model, *batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        step_feedback(self.model)

    def seconds(self, batch, steps: int) -> float:
        synchronize(self.device)
        start = self.clock()
        for _ in range(steps):
            self.step(batch)
        synchronize(self.device)
        return (self.clock() - start) / steps


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def make_variants(
    name: str, setting: str, image_size: int, device: torch.device, clock
) -> dict[str, Variant]:
    spec = MODELS[name]
    torch.manual_seed(0)
    base = spec.build(image_size)
    models = {PLAIN: copy.deepcopy(base)}
    for rule in RULES:
        models[rule] = convert_model(copy.deepcopy(base), rule, last_layer="rule")
    amp = "amp" in setting
    variants = {}
    for variant, model in models.items():
        model = model.to(device)
        if "channels_last" in setting:
            model = model.to(memory_format=torch.channels_last)
        variants[variant] = Variant(model, spec, amp, device, clock)
    return variants


def time_setting(
    name: str, setting: str, batch_size: int, image_size: int, args, device
) -> dict[str, list[float]]:
    """Seconds per step of every variant, one sample per round."""
    variants = make_variants(name, setting, image_size, device, CLOCKS[args.clock])
    inputs, *rest = MODELS[name].batch(batch_size, image_size, device)
    if "channels_last" in setting and isinstance(inputs, Tensor):
        # (a detector batches its image list itself; its channels_last weights set the layout)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    batch = (inputs, *rest)
    for variant in variants.values():
        variant.seconds(batch, args.warmup)
    samples: dict[str, list[float]] = {variant: [] for variant in variants}
    order = list(variants)
    for _ in range(args.rounds):
        random.shuffle(order)
        for variant in order:
            samples[variant].append(variants[variant].seconds(batch, args.steps))
    del variants
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return samples


def report(name: str, setting: str, samples: dict[str, list[float]], batch: int) -> list[str]:
    """Print the table of one (model, setting); return the goal rules that missed."""
    plain = samples[PLAIN]
    print(f"\n{name}, {setting}, batch {batch}")
    print(f"{'variant':<10}{'images/s':>10}{'ratio':>8}")  # images/s: per CPU-second on cpu clock
    missed = []
    for variant, times in samples.items():
        ratio = statistics.median(p / t for t, p in zip(times, plain, strict=True))
        print(f"{variant:<10}{batch / statistics.median(times):>10.1f}{ratio:>8.3f}")
        if variant in GOAL_RULES and ratio < GOAL:
            missed.append(f"{name}/{setting}/{variant} {ratio:.3f}")
    return missed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--batch", type=int, help="batch size (default 256 on GPU, 8 on CPU; retinanet 8, 1)"
    )
    parser.add_argument(
        "--image-size", type=int, help="image side (default 224; retinanet 800 on GPU, 256 on CPU)"
    )
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(MODELS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--rounds", type=int, help="timed rounds (default 5 on GPU, 3 on CPU)")
    parser.add_argument("--steps", type=int, help="steps per round (default 4 on GPU, 1 on CPU)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--clock", choices=list(CLOCKS), help="default: wall on GPU, cpu on CPU")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default 1 on CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.clock = args.clock or ("wall" if gpu else "cpu")
    if args.clock == "cpu" and gpu:
        parser.error("--clock cpu measures the CPU only; use wall on a GPU")
    if args.threads or not gpu:
        torch.set_num_threads(args.threads or 1)
    args.rounds = args.rounds or (5 if gpu else 3)
    args.steps = args.steps or (4 if gpu else 1)
    if gpu:
        torch.backends.cudnn.benchmark = True
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, synthetic batches, "
          f"{args.rounds} rounds x {args.steps} steps, {args.clock} clock")  # fmt: skip
    random.seed(0)
    start = time.perf_counter()
    missed = []
    for name in args.models:
        spec = MODELS[name]
        batch = args.batch or (spec.gpu_batch if gpu else spec.cpu_batch)
        image_size = args.image_size or (spec.gpu_image_size if gpu else spec.cpu_image_size)
        for setting in args.settings:
            samples = time_setting(name, setting, batch, image_size, args, device)
            missed += report(f"{name} {image_size} px", setting, samples, batch)
    goal = ", ".join(GOAL_RULES)
    verdict = "met" if not missed else f"NOT met: {'; '.join(missed)}"
    print(f"\ngoal {goal} >= {GOAL:.2f} of plain backprop: {verdict}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
