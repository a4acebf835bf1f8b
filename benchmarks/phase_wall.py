"""Wall time of one feedback phase per segment: the compiled binary against each estimation step.

Runs one ``ols`` phase (random Kaiming-uniform W and Y of ``--sizes`` from ``--seed``) per
(source tree, schedule), each in its own process with ``PYTHONPATH`` set to the tree, the trees
interleaved so that machine load hits them alike. Prints the phase wall time and, summed over the
segments, the time the phase waited for the binary (``wait``; the binary runs while the last
segment is estimated), the binary's CPU time, and the estimation steps: ``filtered_spikes``,
``outcome_sums``, the residual variance, ``standard_errors`` and the criterion
(``predicted_sign_agreement``). A step a tree lacks is left out. ``--segments`` prints them per
segment.

    git worktree add /tmp/base ccffcd9
    python benchmarks/phase_wall.py --trees base=/tmp/base,new=. --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

STEPS = (
    "filtered_spikes",
    "outcome_sums",
    "residual_var",
    "standard_errors",
    "criterion",
    "add",
)


def child(args) -> None:
    """One phase with every step timed; prints one JSON line."""
    import numpy as np

    from spikealign import lif, phase, rdd

    segments: list[dict] = [{}]

    def timed(owner, name, label):
        original = getattr(owner, name, None)
        if original is None:
            return

        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                spent = time.perf_counter() - start
                segments[-1][label] = segments[-1].get(label, 0.0) + spent

        setattr(owner, name, wrapper)

    timed(phase, "filtered_spikes", "filtered_spikes")
    timed(rdd, "outcome_sums", "outcome_sums")
    timed(rdd.OLSEstimator, "_update_residual_var", "residual_var")
    timed(rdd.OLSEstimator, "standard_errors", "standard_errors")
    timed(phase, "predicted_sign_agreement", "criterion")
    timed(rdd.OLSEstimator, "add", "add")
    result_of = lif.RunningSegment.result

    def result(self):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        out = result_of(self)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        segments.append(
            {
                "wait": time.perf_counter() - start,
                "binary_cpu": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
            }
        )
        return out

    lif.RunningSegment.result = result
    sizes = [int(s) for s in args.sizes.split(",")]
    config = {"duration": args.duration, "estimator": "ols", "seed": args.seed}
    if args.schedule != "reference":
        config["schedule"] = args.schedule
    fc_phase = phase.FeedbackPhase(sizes, phase.PhaseConfig(**config), progress=False)
    fc_phase.program()
    rng = np.random.default_rng(args.seed)
    weights, feedbacks = phase.kaiming_uniform(sizes, rng), phase.kaiming_uniform(sizes, rng)
    outcome = fc_phase.run(weights, feedbacks)
    print(
        json.dumps(
            {
                "wall_s": outcome.wall_s,
                "simulated_s": outcome.simulated_s,
                "segments": segments[1:],
                "estimation_before_first": segments[0],
                "sign_agreement": [r["sign_agreement"] for r in outcome.final_alignment()],
                "criterion": [
                    c["predicted_sign_agreement"] for c in getattr(outcome, "criterion", [])
                ],
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", default="new=.", help="name=path,... of source trees")
    parser.add_argument("--schedules", default="reference,adaptive")
    parser.add_argument("--sizes", default="1600,384,192,10")
    parser.add_argument("--duration", type=float, default=90.0)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--segments", action="store_true", help="print every segment")
    parser.add_argument("--json", type=Path, help="also write every run here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--schedule", default="reference", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    trees = [entry.split("=", 1) for entry in args.trees.split(",")]
    runs = []
    for repeat in range(args.repeats):
        for schedule in args.schedules.split(","):
            for name, path in trees:
                env = dict(os.environ, PYTHONPATH=str(Path(path).resolve()))
                command = [
                    sys.executable,
                    __file__,
                    "--child",
                    f"--schedule={schedule}",
                    f"--sizes={args.sizes}",
                    f"--duration={args.duration}",
                    f"--seed={args.seed}",
                ]
                done = subprocess.run(command, env=env, capture_output=True, text=True, cwd="/")
                if done.returncode != 0:
                    if "unknown schedule" in done.stderr or "schedule" in done.stderr:
                        continue  # a tree without this schedule
                    sys.exit(f"{name} {schedule}: {done.stderr.strip().splitlines()[-1]}")
                run = json.loads(done.stdout.strip().splitlines()[-1])
                run.update(tree=name, schedule=schedule, repeat=repeat)
                runs.append(run)
                report(run, args.segments)
    if args.json:
        args.json.write_text(json.dumps(runs))


def report(run: dict, per_segment: bool) -> None:
    segments = run["segments"]
    totals = {key: sum(s.get(key, 0.0) for s in segments) for key in ("wait", "binary_cpu", *STEPS)}
    steps = " ".join(f"{key} {totals[key]:.1f}" for key in STEPS if totals[key] > 0)
    print(
        f"{run['tree']:<6} {run['schedule']:<9} #{run['repeat']}: wall {run['wall_s']:.1f} s for "
        f"{run['simulated_s']:g} s ({run['wall_s'] / run['simulated_s']:.3f} s/s); "
        f"wait {totals['wait']:.1f}, binary cpu {totals['binary_cpu']:.1f}; {steps}; "
        f"sign % {' / '.join(f'{s:.1f}' for s in run['sign_agreement'])}",
        flush=True,
    )
    if per_segment:
        for number, segment in enumerate(segments):
            print(f"    {number:>2} " + " ".join(f"{k} {v:.2f}" for k, v in segment.items()))


if __name__ == "__main__":
    main()
