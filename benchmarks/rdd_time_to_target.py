"""Simulated seconds until every fc layer reaches 80 % sign agreement: reference vs adaptive phase.

From random Kaiming-uniform W and Y on 1600-384-192-10 (estimator ``ols``), per seed:

* ``reference``: one long reference phase (``--reference-duration``, a third per layer). Layer l
  reaches the goal after d_l seconds of its own share, so the shortest reference phase that gets
  every layer there lasts ``n_fc * max_l d_l`` (rounded up to whole segments; its first d seconds
  of each share are the ones simulated here, statistically);
* ``adaptive``: ``--schedule adaptive`` with ``--target`` and the cap ``--cap``: the simulated
  time at which every layer's measured sign agreement is at the goal, where the phase stopped,
  and the criterion (predicted sign agreement, computed without W) against the measured value.

Sign agreement is measured against W after every segment; only this benchmark looks at W. Prints
wall seconds per simulated second of both, and writes a PNG of sign agreement against simulated
time per layer (``--plot``). ``--gains 0.05,0.1,0.2`` instead measures, per drive gain, the sign
agreement after a 90 s reference phase (30 s per layer) and the adaptive time to the goal.

``--noise-period 0.01`` runs both with the driven subset redrawn every 10 ms (METHOD: 100 ms).

    python benchmarks/rdd_time_to_target.py --seeds 0,1,2 --target 81 --plot time_to_target.png
    python benchmarks/rdd_time_to_target.py --seeds 0,1,2 --noise-period 0.01 --target 81 --cap 90
    python benchmarks/rdd_time_to_target.py --seeds 0 --gains 0.05,0.1,0.2,0.4
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from spikealign.lif import LIFParams
from spikealign.phase import FeedbackPhase, PhaseConfig, kaiming_uniform


def run(sizes, seed, noise_period=0.1, **config):
    rng = np.random.default_rng(seed)
    weights, feedbacks = kaiming_uniform(sizes, rng), kaiming_uniform(sizes, rng)
    lif = LIFParams(noise_period=noise_period)
    config = PhaseConfig(estimator="ols", seed=seed, lif=lif, **config)
    phase = FeedbackPhase(sizes, config, progress=False)
    return phase, phase.run(weights, feedbacks)


def curves(result, n_fc):
    """Per fc: (phase time, driven seconds so far, measured sign agreement) after its segments."""
    out = {fc: [] for fc in range(n_fc)}
    driven = [0.0] * n_fc
    records = [r for r in result.alignment if r["time"] > 0]
    for (fc, start, end), record in zip(result.schedule, records, strict=True):
        driven[fc] += end - start
        out[fc].append((end, driven[fc], record["sign_agreement"]))
    return out


def reference_time(result, n_fc, goal, segment):
    """Driven seconds each layer needs and the reference phase that gives every layer that."""
    needs = []
    for points in curves(result, n_fc).values():
        reached = [d for _, d, sign in points if sign >= goal]
        needs.append(reached[0] if reached else math.inf)
    return needs, n_fc * math.ceil(max(needs) / segment - 1e-9) * segment


def adaptive_time(result, n_fc, goal):
    """Phase time at which every layer's latest measured sign agreement is >= goal."""
    latest = [50.0] * n_fc
    for (fc, _, end), record in zip(
        result.schedule, [r for r in result.alignment if r["time"] > 0], strict=True
    ):
        latest[fc] = record["sign_agreement"]
        if min(latest) >= goal:
            return end
    return math.inf


def schedules(args, sizes, seeds):
    n_fc = len(sizes) - 1
    rows, runs = [], []
    for seed in seeds:
        if args.adaptive_only:  # the reference figures from an earlier run
            ref, needs, ref_time = None, [math.nan] * n_fc, math.nan
        else:
            phase, ref = run(
                sizes, seed, args.noise_period, duration=args.reference_duration,
                drive_gain=args.gain,
            )  # fmt: skip
            segment, _ = phase.segment_plan()
            needs, ref_time = reference_time(ref, n_fc, args.goal, segment)
        _, ada = run(
            sizes, seed, args.noise_period, duration=args.cap, schedule="adaptive",
            target=args.target, drive_gain=args.gain,
        )  # fmt: skip
        final = ada.final_alignment()
        # NaN: the layer's standard errors are not trusted yet (no claim to compare)
        predicted = {
            r["layer"]: r["predicted_sign_agreement"] if r["trusted"] else math.nan
            for r in ada.criterion
        }
        rows.append(
            {
                "seed": seed,
                "needs": needs,
                "reference_s": ref_time,
                "adaptive_s": adaptive_time(ada, n_fc, args.goal),
                "stopped_s": ada.simulated_s,
                "seconds": ada.seconds_per_layer(),
                "measured": [a["sign_agreement"] for a in final],
                "predicted": [predicted.get(a["layer"], math.nan) for a in final],
                "wall_ref": math.nan if ref is None else ref.wall_s / ref.simulated_s,
                "wall_ada": ada.wall_s / ada.simulated_s,
            }
        )
        runs.append((ref, ada))
        print_row(rows[-1], n_fc, args.goal)
    print(f"\nsummary over seeds {seeds} (goal {args.goal:g} % on every layer):")
    for key, label in (("reference_s", "reference"), ("adaptive_s", "adaptive")):
        values = [row[key] for row in rows]
        print(f"  {label:<9} simulated s to goal: {values}, mean {np.mean(values):.0f}")
    gaps = [p - m for row in rows for p, m in zip(row["predicted"], row["measured"], strict=True)]
    print(
        f"  criterion at the adaptive stop, predicted - measured (nan: not trusted yet): "
        f"{np.round(gaps, 1).tolist()}"
    )
    for key, label in (("wall_ref", "reference"), ("wall_ada", "adaptive")):
        print(f"  {label:<9} wall s per simulated s: {np.mean([row[key] for row in rows]):.3f}")
    if args.plot:
        plot(runs, n_fc, args)


def print_row(row, n_fc, goal):
    layers = ", ".join(f"fc{fc + 1} {row['needs'][fc]:g} s" for fc in range(n_fc))
    print(
        f"seed {row['seed']}: reference: driven s to {goal:g} %: {layers} -> phase of "
        f"{row['reference_s']:g} s; {row['wall_ref']:.3f} wall s per simulated s"
    )
    per_layer = ", ".join(
        f"fc{fc + 1} {row['seconds'][fc]:g} s {row['measured'][fc]:.1f} % "
        f"(predicted {row['predicted'][fc]:.1f})"
        for fc in range(n_fc)
    )
    print(
        f"        adaptive: every layer >= {goal:g} % at {row['adaptive_s']:g} s; stopped at "
        f"{row['stopped_s']:g} s: {per_layer}; {row['wall_ada']:.3f} wall s per simulated s"
    )


def plot(runs, n_fc, args):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4), layout="constrained")
    panels = figure.subplots(1, 2, sharey=True)
    for (ref, ada), style in zip(runs, ("-", "--", ":", "-."), strict=False):
        for panel, result in zip(panels, (ref, ada), strict=True):
            if result is None:
                continue
            for fc, points in curves(result, n_fc).items():
                if points:
                    time, _, sign = zip(*points, strict=True)
                    panel.plot(time, sign, style, color=f"C{fc}", marker=".", markersize=3)
    for panel, title in zip(panels, ("reference schedule", "adaptive schedule"), strict=True):
        panel.axhline(args.goal, color="grey", linewidth=0.8)
        panel.set_title(f"{title} (seeds: - -- : ...)", fontsize=9)
        panel.set_xlabel("simulated time in the phase (s)")
    for fc in range(n_fc):
        panels[0].plot([], [], color=f"C{fc}", label=f"fc{fc + 1}")
    panels[0].legend(fontsize=8)
    panels[0].set_ylabel("sign agreement with W (%)")
    figure.savefig(args.plot, dpi=100)
    print(f"wrote {args.plot}")


def gains(args, sizes, seeds):
    n_fc = len(sizes) - 1
    print(f"{'gain':>6} {'seed':>4}  sign % after 30 s per layer (fc1..)   adaptive s to goal")
    for gain in [float(g) for g in args.gains.split(",")]:
        for seed in seeds:
            _, ref = run(sizes, seed, args.noise_period, duration=30.0 * n_fc, drive_gain=gain)
            _, ada = run(
                sizes, seed, args.noise_period, duration=args.cap, schedule="adaptive",
                target=args.target, drive_gain=gain,
            )  # fmt: skip
            signs = " ".join(f"{a['sign_agreement']:5.1f}" for a in ref.final_alignment())
            final = " ".join(f"{a['sign_agreement']:5.1f}" for a in ada.final_alignment())
            print(
                f"{gain:>6g} {seed:>4}  {signs:<36} {adaptive_time(ada, n_fc, args.goal):>6g} "
                f"(stopped at {ada.simulated_s:g} s: {final}; "
                f"{ada.wall_s / ada.simulated_s:.3f} wall s per simulated s)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1600,384,192,10")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--goal", type=float, default=80.0, help="measured sign agreement %%")
    parser.add_argument("--target", type=float, default=80.0, help="adaptive criterion target %%")
    parser.add_argument("--cap", type=float, default=360.0, help="adaptive time cap (s)")
    parser.add_argument("--reference-duration", type=float, default=360.0)
    parser.add_argument("--gain", type=float, default=0.2, help="drive gain of both schedules")
    parser.add_argument("--gains", help="comma-separated drive gains: the gain measurement")
    parser.add_argument(
        "--noise-period", type=float, default=0.1, help="s, noise subset redrawn (METHOD: 0.1)"
    )
    parser.add_argument("--plot", help="PNG of sign agreement against simulated time")
    parser.add_argument("--adaptive-only", action="store_true", help="skip the reference runs")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"network {sizes}, estimator ols, seeds {seeds}, noise period {args.noise_period:g} s")
    if args.gains:
        gains(args, sizes, seeds)
    else:
        schedules(args, sizes, seeds)


if __name__ == "__main__":
    main()
