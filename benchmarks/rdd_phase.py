"""Quality and speed of one feedback-training phase (issue: the spiking feedback phase).

From random Kaiming-uniform W and Y on 1600-384-192-10, runs one phase per seed and estimator and
prints, per fc layer, sign agreement and angle after the phase, and the wall time per phase with
the build time reported separately. Reference implementation (NumPy, lms + rescale): about 63, 74
and 80 % sign agreement (68, 51, 41 degrees) and about 350 s of wall time on a 2-core machine.

    python benchmarks/rdd_phase.py --seeds 0,1,2 --estimators lms,ols,ols-plain
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from spikealign.phase import FeedbackPhase, PhaseConfig, kaiming_uniform
from spikealign.rdd import RDDParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1600,384,192,10")
    parser.add_argument("--duration", type=float, default=90.0)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--estimators", default="lms,ols", help="lms, ols, and ols-plain (ols_adjust=False)"
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"network {sizes}, {args.duration:g} s per phase, seeds {seeds}")
    for estimator in args.estimators.split(","):
        start = time.perf_counter()
        config = PhaseConfig(duration=args.duration, estimator=estimator.removesuffix("-plain"))
        if estimator == "ols-plain":
            config.rdd = RDDParams(ols_adjust=False)
        phase = FeedbackPhase(sizes, config, progress=False)
        phase.program()
        load_s = time.perf_counter() - start
        fresh = phase.state_dict()
        signs, angles, walls = [], [], []
        for seed in seeds:
            rng = np.random.default_rng(seed)
            weights, feedbacks = kaiming_uniform(sizes, rng), kaiming_uniform(sizes, rng)
            phase.load_state_dict(fresh)  # a fresh estimator per seed, the program reused
            phase.config.seed = seed
            result = phase.run(weights, feedbacks)
            final = result.final_alignment()
            signs.append([a["sign_agreement"] for a in final])
            angles.append([a["angle_deg"] for a in final])
            walls.append(result.wall_s)
        signs, angles = np.array(signs), np.array(angles)
        print(f"\nestimator {estimator} (update rescale); build/load {load_s:.1f} s")
        print(f"{'layer':<6} {'sign agreement %':>20} {'angle deg':>18}")
        for fc in range(signs.shape[1]):
            print(
                f"fc{fc + 1:<4} {signs[:, fc].mean():>12.1f} +- {signs[:, fc].std():>4.1f}"
                f" {angles[:, fc].mean():>10.1f} +- {angles[:, fc].std():>4.1f}"
            )
        print(
            f"wall time per phase: {np.mean(walls):.2f} s (min {np.min(walls):.2f}, "
            f"max {np.max(walls):.2f}) for {args.duration:g} s simulated"
        )


if __name__ == "__main__":
    main()
