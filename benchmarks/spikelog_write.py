"""Cost of writing and reading the spike log of a 90 s phase on 1600-384-192-10.

Writes the log the way :class:`spikealign.phase.FeedbackPhase` does (weights and the first
alignment, then one flush per 10 s segment, then Y_after and beta) from synthetic spikes at
``--rate`` Hz per simulated neuron and RDD windows at ``--window-rate`` per driven neuron, and
prints the write time (all flushes and the close), the file size and the time of a full read
(``SpikeLog.summary()`` plus every spike). Compare spike-log versions by running it against
another checkout::

    python benchmarks/spikelog_write.py --repeats 3
    PYTHONPATH=/path/to/other/checkout python benchmarks/spikelog_write.py --repeats 3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from spikealign import spikelog
from spikealign.spikelog import SpikeLogWriter, open_log


def segments(sizes: list[int], duration: float, interval: float):
    """(driven layer, start, end) like FeedbackPhase.schedule: duration split over the fcs."""
    n_fc = len(sizes) - 1
    share = duration / n_fc
    count = int(np.ceil(share / interval))
    length = share / count
    return [
        (fc, (fc * count + s) * length, (fc * count + s + 1) * length)
        for fc in range(n_fc)
        for s in range(count)
    ]


def write(path: Path, sizes, plan, rate: float, window_rate: float, seed: int) -> float:
    rng = np.random.default_rng(seed)
    matrices = [rng.normal(size=(sizes[l + 1], sizes[l])) for l in range(len(sizes) - 1)]
    start_time = time.perf_counter()
    with SpikeLogWriter(path, sizes, 1e-3, {"benchmark": True}, seed=seed) as log:
        for fc, matrix in enumerate(matrices):
            log.write_weights(fc, W=matrix, Y_before=matrix)
            log.append_alignment(0.0, fc, 90.0, 50.0, 1.0)
        log.flush(0.0)
        for driven, start, end in plan:
            for l, size in enumerate(sizes):
                count = rng.poisson(rate * size * (end - start)) if l >= driven else 0
                times = np.sort(rng.uniform(start, end, count))
                log.append_spikes(l, times, rng.integers(0, size, count))
            count = rng.poisson(window_rate * sizes[driven] * (end - start))
            opened = rng.uniform(start, end - 0.03, count)
            log.append_windows(
                driven,
                rng.integers(0, sizes[driven], count),
                opened,
                opened + 0.03,
                rng.normal(1.0, 0.1, count),
                rng.random(count) < 0.5,
            )
            log.append_schedule(driven, start, end)
            log.append_alignment(end, driven, 60.0, 70.0, 1.0)
            log.flush(end)
        for fc, matrix in enumerate(matrices):
            log.write_weights(fc, Y_after=matrix, beta=matrix)
    return time.perf_counter() - start_time


def read(path: Path) -> tuple[float, int]:
    start = time.perf_counter()
    with open_log(path) as log:
        log.summary()
        spikes = sum(len(log.spikes(l)[0]) for l in range(len(log.sizes)))
    return time.perf_counter() - start, spikes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1600,384,192,10")
    parser.add_argument("--duration", type=float, default=90.0)
    parser.add_argument("--interval", type=float, default=10.0, help="s between flushes")
    parser.add_argument("--rate", type=float, default=10.0, help="Hz per simulated neuron")
    parser.add_argument("--window-rate", type=float, default=5.0, help="windows/s per neuron")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    plan = segments(sizes, args.duration, args.interval)
    print(
        f"spike log version {spikelog.VERSION} ({spikelog.__file__}): sizes {sizes}, "
        f"{args.duration:g} s, {len(plan)} flushes"
    )
    with tempfile.TemporaryDirectory() as directory:
        for repeat in range(args.repeats):
            path = Path(directory) / f"log{repeat}.h5"
            write_s = write(path, sizes, plan, args.rate, args.window_rate, seed=repeat)
            read_s, spikes = read(path)
            print(
                f"repeat {repeat}: write {write_s:.2f} s ({1e3 * write_s / len(plan):.0f} ms per "
                f"flush), {path.stat().st_size / 2**20:.1f} MiB, {spikes} spikes, "
                f"full read {read_s:.2f} s"
            )


if __name__ == "__main__":
    main()
