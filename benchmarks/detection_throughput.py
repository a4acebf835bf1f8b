"""RetinaNet-R50-FPN training throughput per learning rule, against plain backprop (METHOD 8).

One step = forward with targets (torchvision computes focal and box losses), zero_grad, backward,
SGD step (momentum 0.9, weight decay 1e-4), feedback.step_feedback. Input: a synthetic batch of
``batch_size`` images of ``min_size x max_size`` pixels (so the model's resize keeps them as
they are) with 4 random boxes each, 91 classes as torchvision's COCO models, already on the
device. Variants: the unconverted model ("plain") and the model with every conv converted
(``--convert all``) to each rule, each its own copy of one initial network. Repetitions are
interleaved in a shuffled order; the ratio reported is the median over rounds of (plain's step
time / the rule's step time in the same round), i.e. the rule's images/s as a fraction of plain
backprop's. ``--amp`` adds bf16 autocast runs (ratios against plain under autocast too).
Goal: usf, frsf and fa at >= 0.90 of plain backprop.

    python benchmarks/detection_throughput.py                         # CPU: batch 2, 256x320
    python benchmarks/detection_throughput.py --device cuda --batch-size 8 --min-size 800 \
        --max-size 1333 --amp                                         # the METHOD 8 setting

:func:`retinanet_throughput` is the measurement; ``benchmarks/scale_throughput.py`` can call it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spikealign import detection, feedback  # noqa: E402

PLAIN = "plain"
GOAL_RULES = ("fa", "usf", "frsf")
GOAL = 0.90
NUM_CLASSES = 91
BOXES_PER_IMAGE = 4


def synthetic_batch(batch_size: int, height: int, width: int, device, seed: int = 0):
    """Random images in [0, 1] and random boxes (at least 16 px a side) with random labels."""
    generator = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(batch_size):
        images.append(torch.rand(3, height, width, generator=generator).to(device))
        corner = torch.rand(BOXES_PER_IMAGE, 2, generator=generator) * torch.tensor(
            [width - 16, height - 16]
        )
        size = 16 + torch.rand(BOXES_PER_IMAGE, 2, generator=generator) * (
            torch.tensor([width, height]) - 16 - corner
        )
        boxes = torch.cat([corner, corner + size], dim=1)
        labels = torch.randint(1, NUM_CLASSES, (BOXES_PER_IMAGE,), generator=generator)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images, targets


def detection_loss(model, images, targets):
    """RetinaNet's training loss: focal classification loss + box regression loss."""
    return sum(model(images, targets).values())


def _step(model, optimizer, images, targets, amp: bool, device) -> float:
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with autocast:
        loss = detection_loss(model, images, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    feedback.step_feedback(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def retinanet_throughput(
    device: str = "cpu",
    batch_size: int = 2,
    min_size: int = 256,
    max_size: int = 320,
    rules: tuple[str, ...] = ("bp", *GOAL_RULES, "brsf"),
    amp: bool = False,
    repeats: int = 5,
    warmup: int = 2,
) -> dict[str, dict[str, float]]:
    """{variant: {images_per_s, ratio}} for plain backprop and each rule (see module docstring).

    A rule whose step raises a RuntimeError gets NaN figures and ``error`` (its first line).

    ``images_per_s`` is the median over rounds; ``ratio`` the median of the per-round ratios
    plain step time / variant step time (1.0 for plain).
    """
    device = torch.device(device)
    torch.manual_seed(0)
    base = detection.build_retinanet(NUM_CLASSES, min_size, max_size)
    variants = {PLAIN: base}
    for rule in rules:
        options = {"lr": 0.01} if rule in ("kp", "wm") else {}
        model = copy.deepcopy(base)
        # rule bp: converted with B = W (detection.convert_retinanet leaves bp unconverted)
        variants[rule] = feedback.convert(model, rule, **options)
    prepared = {}
    for name, model in variants.items():
        model.to(device).train()
        prepared[name] = (model, torch.optim.SGD(model.parameters(), 0.01, 0.9, weight_decay=1e-4))
    images, targets = synthetic_batch(batch_size, min_size, max_size, device)
    failed = {}
    for name, (model, optimizer) in list(prepared.items()):
        try:
            for _ in range(warmup):
                _step(model, optimizer, images, targets, amp, device)
        except RuntimeError as err:  # e.g. a rule's layers under autocast: report, time the rest
            if name == PLAIN:
                raise
            failed[name] = str(err).strip().splitlines()[0][:120]
            del prepared[name]
    seconds = {name: [] for name in prepared}
    order = list(prepared)
    for _ in range(repeats):
        random.shuffle(order)
        for name in order:
            seconds[name].append(_step(*prepared[name], images, targets, amp, device))
    result = {}
    for name, samples in seconds.items():
        ratios = [p / s for p, s in zip(seconds[PLAIN], samples, strict=True)]
        result[name] = {
            "images_per_s": batch_size / statistics.median(samples),
            "ratio": statistics.median(ratios),
        }
    for name, message in failed.items():
        result[name] = {"images_per_s": math.nan, "ratio": math.nan, "error": message}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--min-size", type=int, default=256)
    parser.add_argument("--max-size", type=int, default=320)
    parser.add_argument("--rules", default="bp,fa,usf,frsf,brsf")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--amp", action="store_true", help="also time under bf16 autocast")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rules = tuple(r for r in args.rules.split(",") if r)
    for rule in rules:
        detection.check_rule(rule)
    print(
        f"RetinaNet-R50-FPN training, batch {args.batch_size} at {args.min_size}x{args.max_size}, "
        f"{args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}), "
        f"median of {args.repeats} interleaved rounds"
    )
    print(f"{'variant':<8} {'amp':<5} {'images/s':>9} {'vs plain':>9}  goal")
    for amp in (False, True) if args.amp else (False,):
        result = retinanet_throughput(
            args.device, args.batch_size, args.min_size, args.max_size, rules, amp, args.repeats
        )
        for name, figures in result.items():
            goal = ""
            if "error" in figures:
                goal = f"failed: {figures['error']}"
            elif name in GOAL_RULES:
                goal = "ok" if figures["ratio"] >= GOAL else f"BELOW {GOAL:.2f}"
            print(
                f"{name:<8} {'bf16' if amp else 'fp32':<5} {figures['images_per_s']:>9.2f} "
                f"{figures['ratio']:>9.3f}  {goal}"
            )


if __name__ == "__main__":
    main()
