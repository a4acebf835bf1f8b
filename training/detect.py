"""Train RetinaNet on COCO with one learning rule: ``python -m training.detect --help``.

A thin command line over :func:`spikealign.trainer.detect.train_detector`; flags map one to one
onto the fields of :class:`spikealign.trainer.detect.DetectConfig` (see docs/detection.md)::

    python -m training.detect --data-dir /data/coco --rule usf --out runs/coco-retina-usf
    torchrun --nproc_per_node 8 -m training.detect --data-dir /data/coco --rule usf --out runs/coco8

With ``--resume`` the run's settings come from ``OUT/checkpoint.pt``; only --epochs, --device,
--workers, --data-dir and --dist-backend may change.
"""

from __future__ import annotations

import argparse

from spikealign import detection
from spikealign.errors import OneLineParser, exit_on_user_error
from spikealign.trainer import distributed
from spikealign.trainer.detect import DetectConfig, train_detector
from training.run import config_overrides, start_or_resume

DEFAULTS = DetectConfig(rule="")


def _default(name: str) -> str:
    return f" (default {getattr(DEFAULTS, name)})"


def build_parser() -> argparse.ArgumentParser:
    # Every config flag defaults to None, meaning "not given": a new run takes DetectConfig's
    # default, a resumed run the checkpoint's value.
    parser = OneLineParser(
        prog="python -m training.detect",
        description="Train RetinaNet-R50-FPN on COCO with a learning rule (bp, fa, usf, ...).",
    )
    what = parser.add_argument_group("what to train")
    what.add_argument("--rule", help=f"one of {', '.join(detection.DETECTION_RULES)}")
    what.add_argument(
        "--data-dir",
        help="COCO directory (train2017/, val2017/, annotations/)" + _default("data_dir"),
    )
    what.add_argument(
        "--convert",
        choices=detection.CONVERT_SCOPES,
        help="layers the rule trains: the ResNet trunk, or trunk, FPN and heads"
        + _default("convert"),
    )
    what.add_argument(
        "--backbone-checkpoint",
        help="checkpoint.pt of a ResNet-50 trained by python -m training.run (default: none)",
    )
    what.add_argument("--min-size", type=int, help="short image side, px" + _default("min_size"))
    what.add_argument(
        "--max-size", type=int, help="long image side at most, px" + _default("max_size")
    )
    what.add_argument("--limit-train", type=int, help="train on a fixed random subset of N images")
    what.add_argument(
        "--limit-test", type=int, help="evaluate on a fixed random subset of N images"
    )

    optim = parser.add_argument_group("optimisation (METHOD 8 defaults)")
    optim.add_argument("--epochs", type=int, help="number of epochs" + _default("epochs"))
    optim.add_argument(
        "--batch-size", type=int, help="global batch, split over ranks" + _default("batch_size")
    )
    optim.add_argument("--lr", type=float, help="SGD learning rate" + _default("lr"))
    optim.add_argument("--momentum", type=float, help="SGD momentum" + _default("momentum"))
    optim.add_argument(
        "--weight-decay", type=float, help="SGD weight decay" + _default("weight_decay")
    )
    optim.add_argument(
        "--warmup-iterations",
        type=int,
        help="linear lr warm-up at the start of epoch 1" + _default("warmup_iterations"),
    )
    optim.add_argument(
        "--lr-milestones",
        type=lambda text: tuple(int(v) for v in text.split(",") if v),
        help="epochs after which lr is multiplied by 0.1, comma-separated (default 16,22)",
    )
    optim.add_argument(
        "--feedback-scale",
        type=float,
        help="bound s of random feedback U(-s, s) (default 1/sqrt(fan_in))",
    )
    optim.add_argument("--seed", type=int, help="random seed" + _default("seed"))

    run = parser.add_argument_group("execution")
    run.add_argument("--out", help="output directory of the run")
    run.add_argument("--resume", action="store_true", help="continue the run in --out")
    run.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    run.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), help="auto picks CUDA when present"
    )
    run.add_argument(
        "--amp", action="store_true", default=None, help="bf16 autocast (faster on recent GPUs)"
    )
    run.add_argument(
        "--dist-backend",
        choices=distributed.BACKENDS,
        help="process-group backend under torchrun: auto is nccl on CUDA, gloo on the CPU",
    )
    run.add_argument("--workers", type=int, help="DataLoader workers" + _default("workers"))
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    start_or_resume(
        args,
        config_overrides(args, DetectConfig),
        DetectConfig,
        required=("rule",),
        new_config=lambda overrides: DetectConfig(**overrides),
        train=train_detector,
    )


if __name__ == "__main__":
    main()
