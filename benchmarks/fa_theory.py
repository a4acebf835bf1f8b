"""Wall time of the label-noise sweep of ``python -m training.fa_theory`` (METHOD 9).

The sweep: 3 rules (bp, fa, usf) x 3 seeds trained side by side as one batched MLP 784-512-512-10
on a 4,000-example subset, recipe (a) (batch 256, 6,000 epochs), evaluated on the 4,000 training
and 10,000 test examples every 100 epochs. The data are random MNIST-shaped tensors (60,000 +
10,000 images of 784 values, 10 classes), so no download is needed; the work per epoch is the real
one. ``--epochs N`` times N epochs and projects to the full 6,000 (the per-epoch cost is constant:
same shapes every epoch). Example::

    python benchmarks/fa_theory.py --device cpu --epochs 2
    python benchmarks/fa_theory.py --device cuda            # the full sweep
"""

from __future__ import annotations

import argparse
import time

import torch

from spikealign import fa_theory
from spikealign.errors import exit_on_user_error

FULL_EPOCHS = fa_theory.RECIPE_A.epochs
EVAL_EVERY = FULL_EPOCHS // fa_theory.EVALUATIONS  # the experiment's default


def mnist_shaped(seed: int = 0) -> fa_theory.FlatData:
    generator = torch.Generator().manual_seed(seed)
    return fa_theory.FlatData(
        train_x=torch.rand(60000, 784, generator=generator) * 2 - 1,
        train_y=torch.randint(0, 10, (60000,), generator=generator),
        test_x=torch.rand(10000, 784, generator=generator) * 2 - 1,
        test_y=torch.randint(0, 10, (10000,), generator=generator),
        num_classes=10,
    )


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--epochs", type=int, default=FULL_EPOCHS, help="epochs to time")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    config = fa_theory.resolved(
        fa_theory.TheoryConfig(
            "label-noise",
            device=args.device,
            epochs=args.epochs,
            progress=not args.no_progress,
            eval_every=args.epochs,
        )  # fmt: skip
    )
    device = fa_theory.resolve_device(config.device)
    start = time.perf_counter()
    sweep, specs, _ = fa_theory.label_noise_sweep(config, mnist_shaped(), device)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    fa_theory.train_sweep(sweep, config.progress, "label-noise sweep")  # evaluates at 0 and end
    synchronize(device)
    wall = time.perf_counter() - start
    start = time.perf_counter()
    fa_theory._evaluate(sweep, args.epochs, None)
    synchronize(device)
    evaluation = time.perf_counter() - start
    per_epoch = max(wall - 2 * evaluation, 0.0) / args.epochs
    evaluations = FULL_EPOCHS // EVAL_EVERY + 1
    full = per_epoch * FULL_EPOCHS + evaluation * evaluations
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {device} ({name}), torch threads {torch.get_num_threads()}")
    print(f"runs: {len(specs)} ({', '.join(config.rules)} x {config.seeds} seeds), "
          f"MLP 784-{'-'.join(map(str, config.hidden))}-10, {config.subset} examples, "
          f"batch {sweep.recipe.batch_size}")  # fmt: skip
    print(f"setup (init, data to device): {setup:.1f} s")
    print(f"{args.epochs} epochs + 2 evaluations: {wall:.1f} s")
    print(f"training: {per_epoch * 1000:.1f} ms per epoch; one evaluation "
          f"(train, clean, flipped, test sets): {evaluation * 1000:.1f} ms")  # fmt: skip
    print(f"full sweep ({FULL_EPOCHS} epochs, {evaluations} evaluations): {full / 60:.1f} min"
          + (" (measured)" if args.epochs == FULL_EPOCHS else " (projected)"))  # fmt: skip


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
