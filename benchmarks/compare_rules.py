"""Compare the learning rules: ``python -m benchmarks.compare_rules [--seeds 0,1,2] [--epochs 3]``.

Trains the paper's network with every rule (bp, fa, usf, brsf, frsf, dfa, wm, kp, rdd) on digits and
on every other dataset found under --data-dir, over several seeds, and prints per dataset and rule:

* final test error (mean +- std over seeds; mAP for VOC),
* final alignment of fc1..fc3 (angle between W and Y in degrees, sign agreement in %),
* wall time per epoch and the share of it spent in the spiking feedback phase (rdd), counted over
  the epochs after the first, whose phase also loads the compiled Brian2 program.

Expected from the paper: rdd's fc feedback aligns far better than fa's, and its test error lies
between fa's and bp's. Runs go to --out (default: a temporary directory); a run already there is
resumed or reused, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from spikealign import data, trainer
from spikealign.errors import UserError, exit_on_user_error


def parse_list(text: str, kind=str) -> list:
    try:
        return [kind(item) for item in text.split(",") if item]
    except ValueError:
        raise UserError(f"cannot read {text!r} as a comma-separated list") from None


def available_datasets(data_dir: str, requested: list[str] | None) -> list[str]:
    """The requested datasets, or digits plus every dataset whose files are in ``data_dir``."""
    if requested:
        return requested
    found = []
    for name in data.DATASETS:
        try:
            data.load_dataset(name, data_dir)
        except UserError:
            continue
        found.append(name)
    return found


def device_name(device: str) -> str:
    resolved = trainer.resolve_device(device)
    if resolved.type == "cuda":
        return torch.cuda.get_device_name(resolved)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} +- {std:.4f}"


def summarise(dataset: str, rule: str, runs: list[list[dict]]) -> list[str]:
    """One table line from the metric rows of the runs (one per seed)."""
    finals = [rows[-1] for rows in runs]
    score_key = "test_map" if "test_map" in finals[0] else "test_error"
    line = [dataset, rule, str(len(runs)), mean_std([row[score_key] for row in finals])]
    for key in ("angle_deg", "sign_agreement"):
        line += [
            f"{statistics.mean(row[f'{layer}_{key}'] for row in finals):.1f}"
            for layer in trainer.FC_LAYERS
        ]
    later = [row for rows in runs for row in rows[1:]] or [row for rows in runs for row in rows]
    epoch_s = sum(row["epoch_s"] for row in later)
    phase_s = sum(row["phase_s"] for row in later)
    line += [f"{epoch_s / len(later):.2f}", f"{100 * phase_s / epoch_s:.1f}%"]
    return line


def format_table(lines: list[list[str]]) -> str:
    header = ["dataset", "rule", "seeds", "final test error (map: VOC)"]
    header += [f"{layer} angle" for layer in trainer.FC_LAYERS]
    header += [f"{layer} sign%" for layer in trainer.FC_LAYERS]
    header += ["s/epoch", "phase share"]
    rows = [header, *lines]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare_rules",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rules", default=",".join(trainer.TRAIN_RULES))
    parser.add_argument("--datasets", help="comma-separated (default: digits + those present)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rdd-time", type=float, default=9.0, help="simulated s per phase")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--limit-train", type=int)
    parser.add_argument("--limit-test", type=int)
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args(argv)

    rules, seeds = parse_list(args.rules), parse_list(args.seeds, int)
    datasets = available_datasets(args.data_dir, parse_list(args.datasets or ""))
    with tempfile.TemporaryDirectory(prefix="compare_rules_") as scratch:
        root = Path(args.out or scratch)
        lines = []
        for dataset in datasets:
            for rule in rules:
                runs = []
                for seed in seeds:
                    config = trainer.TrainConfig(
                        dataset=dataset,
                        rule=rule,
                        epochs=args.epochs,
                        rdd_time=args.rdd_time,
                        seed=seed,
                        data_dir=args.data_dir,
                        device=args.device,
                        limit_train=args.limit_train,
                        limit_test=args.limit_test,
                    )
                    out = root / dataset / rule / f"seed_{seed}"
                    resume = (out / trainer.CHECKPOINT_FILE).exists()
                    start = time.perf_counter()
                    rows = trainer.train(config, out, resume=resume, progress=False)
                    runs.append(rows)
                    final = {k: v for k, v in rows[-1].items() if k in ("test_error", "test_map")}
                    took = time.perf_counter() - start
                    print(f"{dataset} {rule} seed {seed}: {final} ({took:.1f} s)", flush=True)
                lines.append(summarise(dataset, rule, runs))
    print(
        f"\ndevice: {device_name(args.device)}; {args.epochs} epochs, seeds {args.seeds}, "
        f"rdd phase {args.rdd_time} s simulated"
    )
    print(format_table(lines))
    print(
        "s/epoch and phase share: over the epochs after the first (whose phase also loads the "
        "compiled Brian2 program)"
    )


if __name__ == "__main__":
    main()
