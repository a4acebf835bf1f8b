"""Cost of each learning rule per training step, against plain backprop, on CPU.

One step = forward, cross-entropy loss, zero_grad, backward, SGD step (momentum 0.9),
feedback.step_feedback. Models: the paper's net (batch 32, 3x32x32) and torchvision's resnet18
(batch 16, 3x64x64, 10 classes; --resnet-batch). Every variant (the unconverted model and each
rule) gets its own copy of the same initial network; repetitions are interleaved in a shuffled
order; the ratio reported is the median over rounds of (rule's step / plain backprop's step in
the same round), so slow phases of a shared machine hit both sides of each ratio alike.
Rules that touch every weight once per step (usf/frsf: sign(W) * magnitude; bp: copy of W;
brsf: a fresh random draw) cost a fixed time per parameter, which weighs more on resnet18's 11M
parameters at a small batch than on the paper net.

If a venv with BioTorch 0.0.16 exists at /tmp/biotorch-venv (python -m venv /tmp/biotorch-venv &&
/tmp/biotorch-venv/bin/pip install biotorch==0.0.16), its fa and usf layers are timed on the same
paper net in a subprocess, against plain backprop in that subprocess.

    python benchmarks/rules_overhead.py [--repeats 20] [--threads 2] [--resnet-batch 16]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spikealign.feedback import RULES, convert, step_feedback  # noqa: E402
from spikealign.models import paper_convnet  # noqa: E402

PLAIN = "plain backprop"
CHEAP_RULES = ("fa", "usf", "frsf", "learned")  # speed goal: within 1.10x of plain backprop
GOAL = 1.10
BIOTORCH_PYTHON = Path("/tmp/biotorch-venv/bin/python")
WARMUP = 3


def make_variants(model: nn.Module) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
    variants = {PLAIN: copy.deepcopy(model)}
    for rule in RULES:
        options = {"lr": 0.01} if rule in ("kp", "wm") else {}
        variants[rule] = convert(copy.deepcopy(model), rule, **options)
    return {
        name: (net.train(), torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9))
        for name, net in variants.items()
    }


def step_seconds(model, optimizer, inputs, targets) -> float:
    start = time.perf_counter()
    loss = F.cross_entropy(model(inputs), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    step_feedback(model)
    return time.perf_counter() - start


def time_variants(model: nn.Module, inputs, targets, repeats: int) -> dict[str, list[float]]:
    """Seconds per step of each variant, ``repeats`` samples each."""
    variants = make_variants(model)
    for net, optimizer in variants.values():
        for _ in range(WARMUP):
            step_seconds(net, optimizer, inputs, targets)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for _ in range(repeats):
        random.shuffle(order)
        for name in order:
            samples[name].append(step_seconds(*variants[name], inputs, targets))
    return samples


def print_table(title: str, samples: dict[str, list[float]]) -> None:
    """Median ms/step, and the median over rounds of the ratio to plain backprop in that round.

    Pairing each step with plain backprop's step of the same round cancels load that other
    processes put on the machine for longer than a round; the fastest step is a cross-check
    (such load only ever adds time).
    """
    plain = samples[PLAIN]
    print(f"\n{title}")
    print(f"{'rule':<16}{'ms/step':>10}{'ratio':>8}{'min ms':>10}{'min ratio':>11}")
    ratios = {}
    for name, times in samples.items():
        ratios[name] = statistics.median(t / p for t, p in zip(times, plain, strict=True))
        print(
            f"{name:<16}{1000 * statistics.median(times):>10.1f}{ratios[name]:>8.3f}"
            f"{1000 * min(times):>10.1f}{min(times) / min(plain):>11.3f}"
        )
    verdicts = [
        f"{rule} {'yes' if ratios[rule] <= GOAL else 'NO'} ({ratios[rule]:.3f}x)"
        for rule in CHEAP_RULES
    ]
    print(f"within {GOAL:.2f}x of plain backprop: {', '.join(verdicts)}")


BIOTORCH_SCRIPT = """
import random, statistics, sys, time, copy, contextlib, io
import torch, torch.nn.functional as F
sys.path.insert(0, {repo!r})
from spikealign.models import paper_convnet
from biotorch.module.biomodule import BioModule
torch.set_num_threads({threads})
torch.manual_seed(0)
base = paper_convnet(3, 32, 10)
nets = {{"plain": copy.deepcopy(base)}}
for mode in ("fa", "usf"):
    with contextlib.redirect_stdout(io.StringIO()):  # BioTorch prints a conversion report
        nets[mode] = BioModule(copy.deepcopy(base), mode=mode)
inputs, targets = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
opts = {{k: torch.optim.SGD(n.parameters(), lr=0.01, momentum=0.9) for k, n in nets.items()}}
def step(name):
    start = time.perf_counter()
    loss = F.cross_entropy(nets[name](inputs), targets)
    opts[name].zero_grad(set_to_none=True); loss.backward(); opts[name].step()
    return time.perf_counter() - start
for name in nets:
    for _ in range(3):
        step(name)
samples = {{name: [] for name in nets}}
order = list(nets)
for _ in range({repeats}):
    random.shuffle(order)
    for name in order:
        samples[name].append(step(name))
medians = {{name: statistics.median(s) for name, s in samples.items()}}
plain = samples["plain"]  # ratios paired by round, as in the main benchmark
ratios = {{name: statistics.median(t / p for t, p in zip(s, plain)) for name, s in samples.items()}}
print(torch.__version__, *(f"{{k}}={{medians[k]}},{{ratios[k]}}" for k in nets))
"""


def time_biotorch(repeats: int, threads: int) -> None:
    print("\nBioTorch 0.0.16 on the paper net (batch 32, 3x32x32), in its own venv:")
    if not BIOTORCH_PYTHON.exists():
        print(f"  not found ({BIOTORCH_PYTHON} does not exist); skipped")
        return
    script = BIOTORCH_SCRIPT.format(repo=str(REPO), threads=threads, repeats=repeats)
    result = subprocess.run(
        [str(BIOTORCH_PYTHON), "-c", script], capture_output=True, text=True, timeout=1800
    )
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"  failed: {last_line}")
        return
    version, *fields = result.stdout.split()
    figures = {}
    for field in fields:  # name=median_seconds,ratio
        name, values = field.split("=")
        figures[name] = [float(value) for value in values.split(",")]
    print(f"  (torch {version}) plain backprop {1000 * figures['plain'][0]:.1f} ms/step")
    for mode in ("fa", "usf"):
        seconds, ratio = figures[mode]
        print(f"  biotorch {mode:<4}{1000 * seconds:>8.1f} ms/step {ratio:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--resnet-batch", type=int, default=16, help="resnet18 batch size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, CPU, {args.threads} threads, {args.repeats} repeats (median)"
    )

    torch.manual_seed(0)
    random.seed(0)
    inputs, targets = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    print_table(
        "paper net, batch 32, 3x32x32",
        time_variants(paper_convnet(3, 32, 10), inputs, targets, args.repeats),
    )

    resnet = torchvision.models.resnet18(weights=None, num_classes=10)
    batch = args.resnet_batch
    inputs, targets = torch.randn(batch, 3, 64, 64), torch.randint(0, 10, (batch,))
    samples = time_variants(resnet, inputs, targets, args.repeats)
    print_table(f"resnet18, batch {batch}, 3x64x64", samples)

    time_biotorch(args.repeats, args.threads)


if __name__ == "__main__":
    main()
