"""Experiments on feedback alignment's conservation laws: ``python -m training.fa_theory --help``.

A thin command line over :func:`spikealign.fa_theory.run_experiment` (see docs/fa_theory.md)::

    python -m training.fa_theory min-norm --out runs/min-norm
    python -m training.fa_theory label-noise --out runs/label-noise --data-dir data

Each experiment writes ``OUT/summary.json`` and its PNG figures.
"""

from __future__ import annotations

import argparse
import sys

from spikealign import fa_theory
from spikealign.errors import UserError, exit_on_user_error


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, like the library's UserError."""

    def error(self, message: str):
        sys.stderr.write(f"error: {message}; see {self.prog} --help\n")
        raise SystemExit(2)


def _list(kind):
    """Parse a comma-separated list of ``kind`` values."""

    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind.__name__} values, got {text!r}"
            ) from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    defaults = fa_theory._DEFAULTS
    parser = OneLineParser(
        prog="python -m training.fa_theory",
        description="Conservation laws and implicit regularisation of feedback alignment.",
    )
    parser.add_argument("experiment", choices=fa_theory.EXPERIMENTS)
    parser.add_argument("--out", help="output directory (summary.json and figures); required")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--seeds", type=int, help="number of seeds (default per experiment)")
    parser.add_argument("--epochs", type=int, help="epochs (conservation: steps at the largest lr)")
    parser.add_argument("--data-dir", default="data", help="dataset directory (default data)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--dataset",
        help="conservation: digits; label-noise, n-class: "
        f"{defaults['label-noise']['dataset']} (also cifar100, tiny-imagenet, digits)",
    )
    parser.add_argument(
        "--hidden",
        type=_list(int),
        help="architecture: hidden widths of the ReLU MLP, e.g. 512,512 (default 512,512; "
        "conservation 128,128; min-norm 100)",
    )
    parser.add_argument(
        "--arch",
        choices=("mlp", "convnet"),
        default="mlp",
        help="mlp (default, batched); conservation also convnet (small conv net, no batch norm)",
    )
    parser.add_argument("--rules", type=_list(str), help="e.g. bp,fa,usf")
    parser.add_argument("--recipe", choices=tuple(fa_theory.RECIPES), help="SGD recipe of seed 000")
    parser.add_argument("--lrs", type=_list(float), help="conservation: learning rates")
    parser.add_argument("--scales", type=_list(float), help="min-norm: initial scales")
    parser.add_argument("--subset", type=int, help="label-noise: training examples (4000)")
    parser.add_argument("--classes", type=_list(int), help="n-class: values of n, e.g. 2,5,10")
    parser.add_argument("--eval-every", type=int, help="epochs between evaluations")
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.out is None:
        raise UserError("--out DIR is required: the directory for summary.json and the figures")
    config = fa_theory.TheoryConfig(
        experiment=args.experiment,
        dataset=args.dataset,
        data_dir=args.data_dir,
        device=args.device,
        seed=args.seed,
        seeds=args.seeds,
        epochs=args.epochs,
        recipe=args.recipe,
        hidden=args.hidden,
        rules=args.rules,
        lrs=args.lrs,
        scales=args.scales,
        subset=args.subset,
        classes=args.classes,
        eval_every=args.eval_every,
        arch=args.arch,
        progress=not args.no_progress,
    )
    summary = fa_theory.run_experiment(config, args.out)
    print(f"{args.experiment} written to {args.out} ({summary['wall_s']:.1f} s)")


if __name__ == "__main__":
    main()
