"""Where one training step's time goes: torch.profiler over the trainer's own step.

Builds :class:`spikealign.trainer.classify.Training` for the paper net on 1x28x28 images (sklearn's
digits upsampled to 28x28: the Fashion-MNIST shape, no files needed), batch 32, with data on the
device, runs ``--warmup`` steps, then profiles ``--steps`` steps of ``Training.train_step`` plus the
loader and the score keeping, and prints the wall time per step and the operators with the most
self CPU time (and CUDA time on a GPU). What is not the model's math shows up here: Python in the
autograd Functions, optimiser, host syncs (``cudaStreamSynchronize`` / ``aten::item``).

    python benchmarks/step_profile.py --rule fa [--device cuda] [--compile reduce-overhead]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spikealign.trainer import TrainConfig, classify  # noqa: E402
from spikealign.trainer.scores import ScoreKeeper  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rule", default="fa")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--compile", default="off", choices=("off", "default", "reduce-overhead"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rows", type=int, default=25, help="operators listed")
    args = parser.parse_args()

    config = TrainConfig(
        dataset="digits", rule=args.rule, device=args.device, batch_size=args.batch_size,
        compile=args.compile,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as out_dir:
        run = classify.Training(config, Path(out_dir), progress=False)
    run.start_epoch(1)
    run.train_model.train()
    cuda = run.device.type == "cuda"
    keeper = ScoreKeeper(False)

    def steps(count: int) -> None:
        batches = itertools.islice(itertools.cycle(run.train_loader), count)
        for inputs, targets in batches:
            loss, logits = run.train_step(inputs, targets)
            keeper.add(loss, logits, targets)

    steps(args.warmup)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    steps(args.steps)
    if cuda:
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - start) / args.steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        steps(args.steps)
        if cuda:
            torch.cuda.synchronize()
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"{name}; rule {args.rule}, batch {args.batch_size}, compile {args.compile}, loader "
        f"{run.loader_kind}: {1000 * per_step:.2f} ms per step (mean of {args.steps})"
    )
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort, row_limit=args.rows))
    sort = "self_cpu_time_total"
    if cuda:
        print(profiler.key_averages().table(sort_by=sort, row_limit=args.rows))


if __name__ == "__main__":
    main()
