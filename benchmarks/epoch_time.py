"""Epoch wall time of the trainer per learning rule on Fashion-MNIST-sized data, in one run.

Writes ``--train-size`` (default 60,000) and ``--test-size`` (default 10,000) synthetic 1x28x28
images with random labels in Fashion-MNIST's real idx format into a temporary directory, so the
real loading path runs (torchvision's FashionMNIST, then the trainer's data path), and trains the
paper's net on them with each variant for ``--epochs`` epochs (default 2) at batch 32 on the chosen
device through :func:`spikealign.trainer.train`. Reported per variant: the wall time of the last
epoch (training pass + test pass, and for rdd the time the epoch waited for its spiking phase;
the first epoch also pays for warm-up: cuDNN autotuning, compilation, the Brian2 build), the
spiking phase's own wall time and its share of the epoch (with ``--rdd-overlap`` the phase runs
beside the epoch, so this "share" may pass 100%; only the wait for it is in the epoch's time), and
the ratio to bp.

``--compile MODE``, ``--cuda-graph``, ``--amp`` and ``--channels-last`` pass the trainer's flag to
every variant (``--eager-bp`` adds bp without compile or graph, for comparison).

Variants: bp, fa, usf, frsf, rdd, and rdd-overlap (``--rdd-overlap``: the phase for epoch e+1 runs
in the background during epoch e). Goals on one H100: bp <= 3 s; fa, usf, frsf <= 1.10x bp;
rdd-overlap <= 1.25x bp.

``--baseline-repo DIR`` runs the same measurement in a subprocess with another checkout of
spikealign (e.g. the main branch before this change) on ``--baseline-variants`` (default bp), so
both figures come from one run on one machine; options that checkout does not know are left
out (shown in the table).

    python benchmarks/epoch_time.py                                  # full size, auto device
    python benchmarks/epoch_time.py --device cpu --train-size 6000 --test-size 1000 \
        --rdd-time 9 --baseline-repo /work/main
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

VARIANTS = {
    "bp": {"rule": "bp"},
    "fa": {"rule": "fa"},
    "usf": {"rule": "usf"},
    "frsf": {"rule": "frsf"},
    "rdd": {"rule": "rdd"},
    "rdd-overlap": {"rule": "rdd", "rdd_overlap": True},
}
GOALS = {"bp": 3.0, "fa": 1.10, "usf": 1.10, "frsf": 1.10, "rdd-overlap": 1.25}  # s / ratio to bp
RESULT_TAG = "EPOCH_TIME_RESULT "


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">II", magic, array.shape[0])
    header += b"".join(struct.pack(">I", size) for size in array.shape[1:])
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_fashion_mnist(root: Path, train_size: int, test_size: int, seed: int = 0) -> None:
    """Random images and labels in the layout torchvision's FashionMNIST reads."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, count in (("train", train_size), ("t10k", test_size)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)), 2051)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, count), 2049)


def measure(
    variant: str, args: argparse.Namespace, data_dir: Path, compile_mode: str, cuda_graph: bool
) -> dict:
    """Train one variant in this process; its per-epoch wall and phase times."""
    from spikealign import trainer

    known = {f.name for f in fields(trainer.TrainConfig)}
    wanted = dict(
        dataset="fashion-mnist",
        data_dir=str(data_dir),
        epochs=args.epochs,
        batch_size=args.batch_size,
        device=args.device,
        rdd_time=args.rdd_time,
        **VARIANTS[variant],
    )
    if compile_mode != "off":
        wanted["compile"] = compile_mode
    if cuda_graph:
        wanted["cuda_graph"] = True
    for name in ("amp", "channels_last"):
        if getattr(args, name):
            wanted[name] = True
    if args.workers is not None:
        wanted["workers"] = args.workers
    missing = sorted(name for name, value in wanted.items() if name not in known and value)
    config = trainer.TrainConfig(**{k: v for k, v in wanted.items() if k in known})
    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        rows = trainer.train(config, out_dir, progress=False)
        total = time.perf_counter() - start
    return {
        "variant": variant,
        "compile": compile_mode,
        "cuda_graph": cuda_graph,
        "epoch_s": [row["epoch_s"] for row in rows],
        "phase_s": [row["phase_s"] for row in rows],
        "total_s": total,
        "missing": missing,
    }


def device_name(device: str) -> str:
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return f"CPU, {torch.get_num_threads()} threads"
    return torch.cuda.get_device_name()


def run_baseline(args: argparse.Namespace, data_dir: Path) -> list[dict]:
    """The same measurement with the checkout ``--baseline-repo``, in a subprocess."""
    repo = Path(args.baseline_repo).resolve()
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--data-dir",
               str(data_dir), "--variants", args.baseline_variants]  # fmt: skip
    for name in ("device", "epochs", "batch_size", "rdd_time", "workers"):
        value = getattr(args, name)
        if value is not None:
            command += [f"--{name.replace('_', '-')}", str(value)]
    if args.compile != "off":
        command += ["--compile", args.compile]
    for flag in ("cuda_graph", "amp", "channels_last"):
        if getattr(args, flag):
            command += [f"--{flag.replace('_', '-')}"]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"baseline in {repo} failed:\n{result.stderr[-2000:]}", file=sys.stderr)
        return []
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT_TAG)]
    return [json.loads(line[len(RESULT_TAG) :]) for line in lines]


def print_table(results: list[dict], reference_bp: float | None) -> None:
    print(f"{'variant':<26}{'epoch s':>9}{'phase s':>9}{'phase %':>9}{'x bp':>7}{'goal':>8}  ")
    for result in results:
        epoch_s, phase_s = result["epoch_s"][-1], result["phase_s"][-1]
        ratio = epoch_s / reference_bp if reference_bp else float("nan")
        goal = GOALS.get(result["variant"]) if not result.get("label") else None
        verdict = ""
        if goal is not None:
            value = epoch_s if result["variant"] == "bp" else ratio
            unit = " s" if result["variant"] == "bp" else "x"
            verdict = f"{'<=' if value <= goal else '>'}{goal:g}{unit}"
        name = result.get("label", result["variant"])
        note = f"  (without {', '.join(result['missing'])})" if result["missing"] else ""
        share = 100 * phase_s / epoch_s if epoch_s else 0.0
        print(
            f"{name:<26}{epoch_s:>9.2f}{phase_s:>9.2f}{share:>9.1f}{ratio:>7.2f}{verdict:>8}{note}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--train-size", type=int, default=60_000)
    parser.add_argument("--test-size", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=2, help="the last one is reported")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rdd-time", type=float, default=90.0, help="simulated s per phase")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument(
        "--compile",
        default="off",
        choices=("off", "default", "reduce-overhead", "max-autotune"),
        help="the trainer's --compile for every variant (default off)",
    )
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="the trainer's --cuda-graph for every variant (whole step as one CUDA graph)",
    )
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for every variant")
    parser.add_argument(
        "--channels-last", action="store_true", help="channels_last for every variant"
    )
    parser.add_argument(
        "--eager-bp",
        action="store_true",
        help="with --compile or --cuda-graph: also time bp without them",
    )
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: the trainer's)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default torch's)")
    parser.add_argument("--baseline-repo", help="another spikealign checkout to time as well")
    parser.add_argument("--baseline-variants", default="bp", help="comma-separated")
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)  # worker mode: data already there
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [name for name in args.variants.split(",") if name]
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")

    if args.worker:  # one measurement for the parent process, as JSON lines
        for variant in variants:
            result = measure(variant, args, Path(args.data_dir), args.compile, args.cuda_graph)
            print(RESULT_TAG + json.dumps(result), flush=True)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        start = time.perf_counter()
        write_fashion_mnist(data_dir, args.train_size, args.test_size)
        print(
            f"{device_name(args.device)}; torch {torch.__version__}; {args.train_size} training "
            f"and {args.test_size} test images 1x28x28 (idx files written in "
            f"{time.perf_counter() - start:.1f} s), batch {args.batch_size}, compile "
            f"{args.compile}, cuda graph {'on' if args.cuda_graph else 'off'}, amp "
            f"{'on' if args.amp else 'off'}, channels_last "
            f"{'on' if args.channels_last else 'off'}, epoch {args.epochs} of each run reported",
            flush=True,
        )
        runs = [(variant, args.compile, args.cuda_graph) for variant in variants]
        if args.eager_bp and (args.compile != "off" or args.cuda_graph):
            runs.append(("bp", "off", False))
        results = []
        for variant, compile_mode, cuda_graph in runs:
            results.append(measure(variant, args, data_dir, compile_mode, cuda_graph))
            if (compile_mode, cuda_graph) != (args.compile, args.cuda_graph):
                results[-1]["label"] = f"{variant} (eager)"
            epoch_s = ", ".join(f"{value:.2f}" for value in results[-1]["epoch_s"])
            print(
                f"  {variant}, compile {compile_mode}, cuda graph {cuda_graph}: "
                f"epochs {epoch_s} s; "
                f"run {results[-1]['total_s']:.1f} s",
                flush=True,
            )
        baseline = run_baseline(args, data_dir) if args.baseline_repo else []
    for result in baseline:
        result["label"] = f"{result['variant']} (baseline)"
    bp = next(
        (r["epoch_s"][-1] for r in results if r["variant"] == "bp" and "label" not in r), None
    )
    print()
    print_table(results + baseline, bp)


if __name__ == "__main__":
    main()
