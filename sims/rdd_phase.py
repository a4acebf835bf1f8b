"""Run one spiking feedback-training phase: ``python -m sims.rdd_phase``.

Weights come from ``--weights FILE.npz`` (W1..Wn out x in, optional Y1..Yn), from a training
checkpoint (``--checkpoint``), or are random Kaiming-uniform matrices of ``--sizes``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from spikealign.errors import OneLineParser, UserError, exit_on_user_error
from spikealign.lif import LIFParams
from spikealign.outputs import check_output_dir, check_output_file
from spikealign.phase import (
    SCHEDULES,
    FeedbackPhase,
    PhaseConfig,
    kaiming_uniform,
    load_checkpoint_weights,
    load_weights_npz,
    save_weights_npz,
    sizes_of,
)
from spikealign.rdd import ESTIMATORS


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m sims.rdd_phase", description=__doc__)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", type=Path, help=".npz with W1..Wn (and optional Y1..Yn)")
    source.add_argument("--checkpoint", type=Path, help="a checkpoint of python -m training.run")
    source.add_argument(
        "--sizes",
        default="1600,384,192,10",
        help="layer sizes for random weights (default %(default)s)",
    )
    parser.add_argument("--duration", type=float, default=90.0, help="simulated seconds (90)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--estimator", choices=ESTIMATORS, default="lms")
    parser.add_argument("--update", choices=("rescale", "gradient"), default="rescale")
    parser.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="reference",
        help="reference: --duration split evenly (METHOD 3); adaptive: segments go to the least "
        "certain layer (with every layer two or more apart estimated in the same segment) until "
        "every layer reaches --target, --duration is the cap (needs ols)",
    )
    parser.add_argument(
        "--target", type=float, default=80.0, help="adaptive: predicted sign agreement %% (80)"
    )
    parser.add_argument(
        "--drive-gain", type=float, default=0.2, help="W_hat = gain n_in W / std(W) (0.2)"
    )
    parser.add_argument(
        "--noise-period",
        type=float,
        default=0.1,
        help="s: the noise-driven subset of the driven layer is redrawn this often (0.1)",
    )
    parser.add_argument("--log", type=Path, help="write the HDF5 spike log here")
    parser.add_argument("--summary-json", type=Path, help="write a JSON summary here")
    parser.add_argument("--out-weights", type=Path, help="write W and the new Y (.npz) here")
    parser.add_argument("--cache-dir", type=Path, help="where compiled programs are kept")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--sizes must be comma-separated integers, got {text!r}") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise UserError(f"--sizes needs at least two positive sizes, got {text!r}")
    return sizes


def json_safe(value):
    """``value`` with NaN and infinities as None: JSON has no NaN."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return None
    return value


def print_table(before: list[dict], after: list[dict]) -> None:
    print(f"{'layer':<6} {'sign agreement %':>22} {'angle deg':>18} {'norm ratio':>16}")
    for b, a in zip(before, after, strict=True):
        print(
            f"{a['layer']:<6} {b['sign_agreement']:>9.1f} -> {a['sign_agreement']:>8.1f}"
            f" {b['angle_deg']:>7.1f} -> {a['angle_deg']:>7.1f}"
            f" {b['norm_ratio']:>6.2f} -> {a['norm_ratio']:>6.2f}"
        )


@exit_on_user_error
def main(argv=None) -> dict:
    args = parse_args(argv)
    # Everything that can be checked is checked before the phase runs, so no result is lost.
    config = PhaseConfig(
        duration=args.duration,
        estimator=args.estimator,
        update=args.update,
        schedule=args.schedule,
        target=args.target,
        drive_gain=args.drive_gain,
        lif=LIFParams(noise_period=args.noise_period),
        seed=args.seed,
    )
    config.validate()
    for path, flag in (
        (args.log, "--log"),
        (args.summary_json, "--summary-json"),
        (args.out_weights, "--out-weights"),
    ):
        check_output_file(path, flag)
    check_output_dir(args.cache_dir, "--cache-dir")
    if args.weights is not None:
        weights, feedbacks = load_weights_npz(args.weights)
        sizes = sizes_of(weights, str(args.weights))
    elif args.checkpoint is not None:
        weights, feedbacks = load_checkpoint_weights(args.checkpoint)
        sizes = sizes_of(weights, str(args.checkpoint))
    else:
        sizes = parse_sizes(args.sizes)
        weights = feedbacks = None
    phase = FeedbackPhase(sizes, config, cache_dir=args.cache_dir, progress=not args.no_progress)
    if weights is None:  # random weights, once the phase has checked that the sizes fit
        rng = np.random.default_rng(args.seed)
        weights = kaiming_uniform(sizes, rng)
        feedbacks = kaiming_uniform(sizes, rng)
    start = time.perf_counter()
    result = phase.run(weights, feedbacks, log_path=args.log)
    total_s = time.perf_counter() - start
    n_fc = len(sizes) - 1
    before, after = result.alignment[:n_fc], result.final_alignment()
    print(
        f"phase: {result.simulated_s:g} s simulated in {result.wall_s:.1f} s wall "
        f"(+{result.build_s:.1f} s build/load), {total_s:.1f} s in all; "
        f"RDD windows per fc: {result.windows}"
    )
    print_table(before, after)
    seconds = result.seconds_per_layer()
    # the last criterion of each layer; None while its standard errors are not trusted
    predicted = {
        record["layer"]: record["predicted_sign_agreement"] if record["trusted"] else None
        for record in result.criterion
    }

    def prediction(layer: str) -> str:
        if layer not in predicted:
            return ""
        value = predicted[layer]
        if value is None:
            return " (standard errors not trusted yet)"
        return f" (predicted {value:.1f} %)"

    print(
        f"schedule {args.schedule}: "
        + ", ".join(
            f"{a['layer']} {s:g} s{prediction(a['layer'])}"
            for a, s in zip(after, seconds, strict=True)
        )
    )
    summary = {
        "simulated_s": result.simulated_s,
        "wall_s": result.wall_s,
        "build_s": result.build_s,
        "layers": [
            {key: a[key] for key in ("sign_agreement", "angle_deg", "norm_ratio")}
            | {
                "name": a["layer"],
                "simulated_s": s,
                "predicted_sign_agreement": predicted.get(a["layer"]),
            }
            for a, s in zip(after, seconds, strict=True)
        ],
    }
    if args.summary_json is not None:
        tmp = args.summary_json.with_name(args.summary_json.name + ".tmp")
        tmp.write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")
        os.replace(tmp, args.summary_json)
    if args.out_weights is not None:
        save_weights_npz(args.out_weights, weights, result.feedbacks)
    if args.log is not None:
        print(f"spike log: {args.log} (inspect with: python -m sims.inspect {args.log})")
    return summary


if __name__ == "__main__":
    main()
