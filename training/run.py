"""Train a network with one learning rule: ``python -m training.run --help``.

A thin command line over :func:`spikealign.trainer.train`; flags map one to one onto the fields of
:class:`spikealign.trainer.TrainConfig` (see docs/training.md). Example::

    python -m training.run --dataset digits --rule rdd --epochs 10 --out runs/digits-rdd
    python -m training.run --dataset imagenet --data-dir /data/imagenet --arch resnet18 \
        --rule usf --recipe xiao2019 --amp --channels-last --out runs/in-r18-usf

With ``--resume`` the run's settings come from ``OUT/checkpoint.pt``; flags given on the command
line may only change how the run executes (--epochs, --device, --workers, --loader, --compile,
--cuda-graph, --data-dir, --download); any other flag that differs from the stored run is an
error.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from spikealign import feedback, models, recipes, trainer
from spikealign.data import DATASETS, load_dataset
from spikealign.errors import OneLineParser, UserError, exit_on_user_error
from spikealign.trainer import distributed

DEFAULTS = trainer.TrainConfig(dataset="", rule="")
WEIGHT_MIRROR = feedback.make_rule("wm")  # for its default hyperparameters


def _default(name: str) -> str:
    return f" (default {getattr(DEFAULTS, name)})"


def build_parser() -> argparse.ArgumentParser:
    # Every config flag defaults to None, meaning "not given": a new run takes TrainConfig's
    # default, a resumed run the checkpoint's value.
    parser = OneLineParser(
        prog="python -m training.run",
        description="Train a network with a learning rule (bp, fa, ..., rdd).",
    )
    what = parser.add_argument_group("what to train")
    what.add_argument("--dataset", help=f"one of {', '.join(DATASETS)}")
    what.add_argument("--rule", help=f"one of {', '.join(trainer.TRAIN_RULES)}")
    what.add_argument("--arch", choices=models.ARCHS, help="network" + _default("arch"))
    what.add_argument(
        "--last-layer",
        choices=models.LAST_LAYER_CHOICES,
        help="last linear layer: keep backprop or use the rule (default: rule for paper, bp else)",
    )
    what.add_argument(
        "--recipe",
        help=f"published settings to start from: {', '.join(recipes.RECIPES)} "
        "(flags given override them; see --list-recipes)",
    )
    what.add_argument("--list-recipes", action="store_true", help="print the recipes and exit")
    what.add_argument("--data-dir", help="dataset directory" + _default("data_dir"))
    what.add_argument(
        "--download",
        action="store_true",
        default=None,
        help="fetch a missing dataset into --data-dir",
    )
    what.add_argument("--image-size", type=int, help="resize images to this size (default native)")
    what.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        default=None,
        help="no random crop / flip of the training images",
    )
    what.add_argument(
        "--limit-train", type=int, help="train on a fixed random subset of N examples (quick runs)"
    )
    what.add_argument("--limit-test", type=int, help="test on a fixed random subset of N examples")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, help="number of epochs" + _default("epochs"))
    optim.add_argument("--batch-size", type=int, help="minibatch size" + _default("batch_size"))
    optim.add_argument("--lr", type=float, help="SGD learning rate" + _default("lr"))
    optim.add_argument("--momentum", type=float, help="SGD momentum" + _default("momentum"))
    optim.add_argument(
        "--weight-decay", type=float, help="SGD weight decay" + _default("weight_decay")
    )
    optim.add_argument(
        "--lr-milestones",
        type=int,
        nargs="*",
        help="epochs after which the lr is multiplied by --lr-gamma (default none)",
    )
    optim.add_argument(
        "--lr-gamma", type=float, help="lr factor at each milestone" + _default("lr_gamma")
    )
    optim.add_argument(
        "--feedback-decay",
        type=float,
        help="lambda of Y <- Y - lambda*Y after every step (fa / learned feedback)"
        + _default("feedback_decay"),
    )
    optim.add_argument("--seed", type=int, help="random seed" + _default("seed"))

    rules = parser.add_argument_group("rule hyperparameters (default: the rule's own)")
    rules.add_argument(
        "--feedback-scale",
        type=float,
        help="bound s of random feedback U(-s, s) (default 1/sqrt(fan_in))",
    )
    rules.add_argument(
        "--feedback-scales",
        choices=models.FEEDBACK_SCALES,
        help="usf/fa/frsf feedback scales: the rules' own or Xiao et al.'s (METHOD 8)"
        + _default("feedback_scales"),
    )
    rules.add_argument("--kp-lr", type=float, help="kp: feedback learning rate (default --lr)")
    rules.add_argument(
        "--kp-weight-decay", type=float, help="kp: feedback weight decay (default --weight-decay)"
    )
    wm = WEIGHT_MIRROR
    rules.add_argument("--wm-lr", type=float, help=f"wm: mirror learning rate (default {wm.lr})")
    rules.add_argument(
        "--wm-weight-decay", type=float, help=f"wm: mirror weight decay (default {wm.weight_decay})"
    )
    rules.add_argument(
        "--wm-noise-std", type=float, help=f"wm: mirror noise std (default {wm.noise_std})"
    )
    rules.add_argument(
        "--wm-batch-size", type=int, help=f"wm: noise samples per update (default {wm.batch_size})"
    )

    rdd = parser.add_argument_group("spiking feedback phase (rule rdd)")
    rdd.add_argument(
        "--rdd-every",
        type=int,
        help="run the phase before every N-th epoch" + _default("rdd_every"),
    )
    rdd.add_argument(
        "--rdd-time",
        type=float,
        help="simulated seconds per phase, a third per fc layer" + _default("rdd_time"),
    )
    rdd.add_argument(
        "--estimator", choices=("lms", "ols"), help="RDD estimator" + _default("estimator")
    )
    rdd.add_argument(
        "--update",
        choices=("rescale", "gradient"),
        help="feedback update from beta" + _default("update"),
    )
    rdd.add_argument(
        "--rdd-overlap",
        action="store_true",
        default=None,
        help="run the phase for epoch e+1 in the background during epoch e, from the weights at "
        "the start of epoch e (one epoch staler than the paper's schedule)",
    )
    rdd.add_argument(
        "--schedule",
        choices=("reference", "adaptive"),
        help="phase schedule: a third of --rdd-time per fc layer, or adaptive: each segment to "
        "the least certain layer below --target, fc3 in fc1's segments, no layer below a third "
        "(needs --estimator ols)" + _default("schedule"),
    )
    rdd.add_argument(
        "--target",
        type=float,
        help="adaptive: predicted sign agreement %% at which a layer stops" + _default("target"),
    )
    rdd.add_argument(
        "--drive-gain",
        type=float,
        help="spiking weights W_hat = gain n_in W / std(W)" + _default("drive_gain"),
    )
    rdd.add_argument(
        "--noise-period",
        type=float,
        help="s: the phase's noise-driven subset is redrawn this often" + _default("noise_period"),
    )

    run = parser.add_argument_group("execution")
    run.add_argument(
        "--out", help="output directory of the run (required unless only downloading data)"
    )
    run.add_argument("--resume", action="store_true", help="continue the run in --out")
    run.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    run.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        help="auto picks CUDA when present" + _default("device"),
    )
    run.add_argument(
        "--track-conservation",
        action="store_true",
        default=None,
        help="write each epoch's drift of the conserved quantities per layer (docs/fa_theory.md)",
    )
    run.add_argument(
        "--deterministic",
        action="store_true",
        default=None,
        help="deterministic algorithms (reproducible on CUDA, slower)",
    )
    run.add_argument(
        "--dist-backend",
        choices=distributed.BACKENDS,
        help="process-group backend under torchrun: auto is nccl on CUDA, gloo on the CPU"
        + _default("dist_backend"),
    )
    run.add_argument(
        "--workers",
        type=int,
        help=f"DataLoader workers (default {trainer.classify.MAX_DEFAULT_WORKERS} per GPU as "
        "CPU cores allow, 0 on the CPU)",
    )
    run.add_argument(
        "--amp",
        action="store_true",
        default=None,
        help="bf16 autocast of forward and loss (CUDA and CPU)",
    )
    run.add_argument(
        "--channels-last",
        action="store_true",
        default=None,
        help="model and inputs in channels_last memory format (faster convs on GPUs)",
    )
    run.add_argument(
        "--loader",
        choices=trainer.LOADERS,
        help="device: data on the training device, batched augmentation there; dataloader: "
        "per-image transforms in worker processes; auto: device when the data fit"
        + _default("loader"),
    )
    run.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=trainer.COMPILE_MODES,
        help="torch.compile forward and backward; reduce-overhead adds CUDA graphs "
        "(default off; the flag alone: default)",
    )
    run.add_argument(
        "--cuda-graph",
        action="store_true",
        default=None,
        help="record the whole training step (batch, forward, backward, SGD, feedback update) "
        "as one CUDA graph and replay it per batch: much less launch overhead for small nets "
        "(CUDA, data on the device, one process)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def config_overrides(args: argparse.Namespace, config_class=trainer.TrainConfig) -> dict:
    """The fields of ``config_class`` given on the command line."""
    names = {f.name for f in fields(config_class)}
    return {
        name: value for name, value in vars(args).items() if name in names and value is not None
    }


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.list_recipes:
        print(recipes.describe_recipes())
        return
    overrides = config_overrides(args)
    if args.out is None and args.download and "dataset" in overrides and "rule" not in overrides:
        # download only: the command the missing-data error prints
        data_dir = overrides.get("data_dir", trainer.TrainConfig.data_dir)
        load_dataset(overrides["dataset"], data_dir, download=True)
        print(f"{overrides['dataset']} is in {data_dir}")
        return
    start_or_resume(
        args,
        overrides,
        trainer.TrainConfig,
        required=("dataset", "rule"),
        new_config=trainer.TrainConfig.from_flags,
        train=trainer.train,
    )


def start_or_resume(args, overrides: dict, config_class, required, new_config, train) -> None:
    """The run in ``args.out``: resumed from its checkpoint (``overrides`` may change only the
    runtime fields) or new, ``new_config(overrides)`` once the ``required`` fields are given;
    ``train(config, out, ...)`` runs on every rank and rank 0 reports. Shared by training.run and
    training.detect."""
    if args.out is None:
        raise UserError("--out DIR is required: the directory that holds the run")
    if args.resume:
        config = trainer.resume_config(args.out, overrides, config_class=config_class)
    else:
        missing = [f"--{name}" for name in required if name not in overrides]
        if missing:
            raise UserError(f"{' and '.join(missing)} required to start a run (or pass --resume)")
        config = new_config(overrides)
    is_main = distributed.run_and_leave(
        lambda: train(
            config,
            args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    )
    if is_main:
        print(f"run written to {args.out}")


if __name__ == "__main__":
    main()
