"""How much one phase's spikes say about W: the RDD estimate against two that use every spike.

For each fc layer, from the spike log of one phase (run here unless ``--log`` names one), prints the
sign agreement with W and the correlation with W of:

* ``rdd``: the phase's beta, from which the feedback is set (METHOD 4);
* ``spike-triggered``: the outcome of METHOD 4 (mean of q_k over 30 ms minus q_k at the start)
  after every spike of each driven neuron, not only in RDD windows, minus its overall mean: a
  correlational estimate with several times the samples;
* ``joint regression``: least squares of q_k (the filtered spikes of the layer above) on the
  twice-filtered spikes of all driven neurons at once, over every time step. It explains away the
  other driven neurons, the noise that each neuron's own RDD estimate can only average out.

The last two know every spike of the driven layer, so they are not local learning rules; they show
what a linear estimator can extract from the recorded activity at all.

    python benchmarks/rdd_ceiling.py --seed 0 --estimator ols
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from spikealign.lif import LIFParams
from spikealign.phase import FeedbackPhase, PhaseConfig, kaiming_uniform
from spikealign.rdd import Windows, filtered_spikes, window_outcomes
from spikealign.spikelog import open_log


def scores(estimate: np.ndarray, weight: np.ndarray) -> tuple[float, float]:
    """(sign agreement %, correlation) of an (out x in) estimate with W."""
    agree = np.sign(estimate) == np.sign(weight)
    estimated = estimate != 0
    return 100 * agree[estimated].mean(), np.corrcoef(estimate.ravel(), weight.ravel())[0, 1]


def spikes_between(log, layer: int, start: float, end: float):
    times, indices = log.spikes(layer)
    keep = (times >= start) & (times < end)
    return times[keep], indices[keep]


def layer_scores(log, fc: int, start: float, end: float, p: LIFParams) -> list[tuple]:
    """Scores of the three estimates for fc layer ``fc``, driven from ``start`` to ``end``."""
    first, n_steps = round(start / p.dt), round((end - start) / p.dt)
    stored = log.weights(log.fc_names[fc])
    weight, beta = stored["W"], stored["beta"]
    n_out, n_in = weight.shape
    above = filtered_spikes(
        *spikes_between(log, fc + 1, start, end), n_out, first, n_steps, p.dt, p.tau_L, p.tau_s
    )
    times, indices = spikes_between(log, fc, start, end)
    # spike-triggered outcome: METHOD 4's outcome of a 30 ms window opened at every spike
    length = round(p.window_length / p.dt)
    fits = np.rint(times / p.dt).astype(np.int64) - first < n_steps - length
    opened, triggers = times[fits], indices[fits]
    after_spikes = Windows(triggers, opened, opened + length * p.dt, opened * 0, triggers * 0 + 1)
    outcome = window_outcomes(after_spikes, above, first, p.dt)
    triggered = np.zeros((n_in, n_out))
    np.add.at(triggered, triggers, outcome)
    triggered /= np.maximum(np.bincount(triggers, minlength=n_in), 1)[:, None]
    triggered -= outcome.mean(0)
    # joint regression on the driven layer's spikes filtered twice (into drive, then into q)
    drive = filtered_spikes(times, indices, n_in, first, n_steps, p.dt, p.tau_L, p.tau_s, times=2)
    drive -= drive.mean(0)
    gram = drive.T @ drive + 1e-9 * np.eye(n_in)
    joint = np.linalg.solve(gram, drive.T @ (above - above.mean(0)))
    return [scores(beta, weight), scores(triggered.T, weight), scores(joint.T, weight)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", help="an existing phase log; by default one phase is run")
    parser.add_argument("--sizes", default="1600,384,192,10")
    parser.add_argument("--duration", type=float, default=90.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--estimator", default="ols")
    args = parser.parse_args()
    p = LIFParams()
    with tempfile.TemporaryDirectory() as scratch:
        path = args.log
        if path is None:
            sizes = [int(s) for s in args.sizes.split(",")]
            rng = np.random.default_rng(args.seed)
            weights, feedbacks = kaiming_uniform(sizes, rng), kaiming_uniform(sizes, rng)
            config = PhaseConfig(duration=args.duration, estimator=args.estimator, seed=args.seed)
            path = Path(scratch) / "phase.h5"
            FeedbackPhase(sizes, config, progress=False).run(weights, feedbacks, log_path=path)
        with open_log(path) as log:
            schedule = log.schedule()
            print(f"log {args.log or '(this run)'}: sizes {log.sizes}, seed {log.seed}")
            print(f"{'layer':<6} {'rdd':>14} {'spike-triggered':>18} {'joint regression':>18}")
            print(f"{'':<6} {'sign %  corr':>14} {'sign %  corr':>18} {'sign %  corr':>18}")
            for fc, name in enumerate(log.fc_names):
                driven = schedule["layer"] == fc
                start, end = schedule["start"][driven].min(), schedule["end"][driven].max()
                cells = [f"{s:>8.1f} {c:>5.2f}" for s, c in layer_scores(log, fc, start, end, p)]
                print(f"{name:<6} {cells[0]:>14} {cells[1]:>18} {cells[2]:>18}")


if __name__ == "__main__":
    main()
