"""One feedback-training phase: simulate the LIF network, estimate beta by RDD, set the feedback.

While ``fc_l`` is being estimated, the layer below it (``l - 1``) is noise-driven and its neurons
estimate their causal effect ``beta`` on layer ``l`` (:mod:`spikealign.rdd`). Layers above the
driven one run feed-forward; layers below it are silent. The phase runs in segments of equal
length, at most ``update_interval`` (10 s): the reference share of one layer, ``duration / n_fc``,
cut into ``ceil(share / update_interval)`` pieces. After every segment the estimates are
refreshed, the feedback of the driven ``fc_l`` is updated, alignment is measured, the stopping
criterion is computed and the spike log is flushed. Two schedules say which layer each segment
drives:

* ``reference`` (METHOD 3): ``duration`` split evenly, fc1's share first, then fc2's, ...
* ``adaptive``: every layer gets one segment, then each segment goes to the layer whose estimate is
  least certain, the lowest predicted sign agreement ``P_l`` (:func:`spikealign.rdd.
  predicted_sign_agreement`, computed from the recorded data alone) among the layers still below
  ``target``; when the phase spends its whole budget (the trainer), a layer that would otherwise
  fall a whole segment behind the reference's even split goes first, so no layer gets less time
  than the reference would give it. Layers whose driven and outcome layers are disjoint (fc l and
  fc l+2, ...) are estimated in the same segment: a driven layer takes no synaptic input (METHOD
  2), so each sees exactly what it would see alone, and the simulated second serves both
  (:meth:`FeedbackPhase.next_segment`). A layer counts as at target only once its standard
  errors are trusted (:meth:`spikealign.rdd.OLSEstimator.se_trusted`); before that it is ranked
  by the prediction from its untrusted ones, which are too small early on but still say which
  layer is behind (without them a wide fc1, whose errors are trusted last, would take every
  segment until then). The phase ends when every layer has reached ``target``
  (``stop_at_target``) or after ``duration`` seconds, the time cap. Without ``stop_at_target``
  the whole ``duration`` is spent, on the least certain layer once all are at target. The choice
  depends only on the data, so the schedule is reproducible from the seed; the next segment is
  simulated speculatively while the last is estimated, guessed from each layer's last gain in
  rank (:func:`expected_ranks`), and restarted when the estimate changes the choice.

Drive gain (METHOD 2): the spiking network's weights are ``W_hat = drive_gain * n_in * W /
std(W)``, 0.2 in the reference.

Feedback updates (METHOD 5), applied after every segment to ``Y`` (out x in, like ``W``):

* ``rescale`` (reference): for the entries with ``beta != 0``,
  ``Y = beta^T * std(Y_initial) / std(beta)``; entries never estimated keep their value.
  ``std(Y_initial)`` is the standard deviation of the feedback the first phase started from.
* ``gradient`` (this project's reading of the paper's omega, gamma, eta and lambda_WD; the exact
  equation is not published): with ``beta_hat`` the estimate rescaled to the feedback's initial
  standard deviation as above,
  ``dY = eta * (omega * beta_hat - gamma * Y) - eta * weight_decay * Y``, whose fixed point is
  ``omega / (gamma + weight_decay) * beta_hat``.

The estimator state (LMS coefficients, OLS statistics, beta, ``std(Y_initial)``) is kept by
:class:`FeedbackPhase` across phases and saved with :meth:`FeedbackPhase.state_dict`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from spikealign.errors import UserError
from spikealign.lif import LIFParams, LIFProgram, scaled_weights
from spikealign.metrics import alignment
from spikealign.rdd import (
    ESTIMATORS,
    RDDParams,
    Scratch,
    filtered_spikes,
    make_estimator,
    predicted_sign_agreement,
)

UPDATES = ("rescale", "gradient")
SCHEDULES = ("reference", "adaptive")

#: Spikes of the layer above are filtered from this long before a segment (kappa has decayed).
_HISTORY_S = 0.2
#: A layer that was not driven in the previous segment still carries that segment's synaptic
#: input in its kernel traces for a while (10 tau_L: e^-10 of it is left): its windows opened
#: before then are not samples of the noise-driven regime and are left out.
SETTLE_S = 0.1

#: Memory per synapse of a phase, roughly: W, Y (three copies), the scaled W and the program's
#: copy (float64 each), the synapse order (2 x int64), the estimator state (about 6 float64), the
#: compiled program's synapse (w and two indices) and beta.
_BYTES_PER_SYNAPSE = 8 * 6 + 16 + 48 + 16 + 8
#: Memory per segment of the schedule: plan entry, alignment record, log row.
_BYTES_PER_SEGMENT = 1000


@dataclass
class PhaseConfig:
    """What one phase does. Durations in seconds of simulated time."""

    duration: float = 90.0  # whole phase, split evenly over the fc layers; adaptive: the cap
    update_interval: float = 10.0  # at most this long between feedback updates
    estimator: str = "lms"  # "lms" (reference) or "ols"
    update: str = "rescale"  # "rescale" (reference) or "gradient"
    schedule: str = "reference"  # "reference" (METHOD 3) or "adaptive" (needs estimator "ols")
    target: float = 80.0  # adaptive: %, a layer stops when its predicted sign agreement reaches it
    stop_at_target: bool = True  # adaptive: end the phase once every layer is at target
    drive_gain: float = 0.2  # W_hat = drive_gain * n_in * W / std(W) (METHOD 2: 0.2)
    seed: int = 0
    eta: float = 0.5  # gradient rule: learning rate
    omega: float = 1.0  # gradient rule: weight of beta
    gamma: float = 1.0  # gradient rule: pull of Y towards zero
    weight_decay: float = 0.0  # gradient rule: lambda_WD
    lif: LIFParams = field(default_factory=LIFParams)
    rdd: RDDParams = field(default_factory=RDDParams)

    def validate(self) -> None:
        if not (math.isfinite(self.duration) and self.duration > 0):
            raise UserError(
                f"phase duration must be a positive number of seconds, got {self.duration}"
            )
        if not (math.isfinite(self.update_interval) and self.update_interval > 0):
            raise UserError(f"update interval must be positive, got {self.update_interval}")
        if self.estimator not in ESTIMATORS:
            raise UserError(
                f"unknown estimator {self.estimator!r}; choose one of {', '.join(ESTIMATORS)}"
            )
        if not 0 <= self.seed < 2**31:  # Brian2 holds it in a 32-bit integer
            raise UserError(f"seed must be in [0, 2**31), got {self.seed}")
        if self.update not in UPDATES:
            raise UserError(
                f"unknown feedback update {self.update!r}; choose one of {', '.join(UPDATES)}"
            )
        if self.schedule not in SCHEDULES:
            raise UserError(
                f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}"
            )
        if self.schedule == "adaptive" and self.estimator != "ols":
            raise UserError(
                "the adaptive schedule needs estimator 'ols' (its stopping criterion uses the OLS "
                "standard errors); add --estimator ols"
            )
        if not 50 < self.target < 100:
            raise UserError(f"target must be a sign agreement in (50, 100) %, got {self.target}")
        if not (math.isfinite(self.drive_gain) and self.drive_gain > 0):
            raise UserError(f"drive gain must be a positive number, got {self.drive_gain}")
        period, dt = self.lif.noise_period, self.lif.dt
        if not (math.isfinite(period) and period >= dt):
            raise UserError(
                f"noise period must be at least one time step ({dt:g} s), got {period} s "
                "(METHOD: 0.1 s)"
            )


def memory_estimate(sizes: list[int], config: PhaseConfig) -> int:
    """Bytes a phase of this shape and length needs, roughly (dense synapses dominate)."""
    synapses = sum(sizes[l - 1] * sizes[l] for l in range(1, len(sizes)))
    needed = synapses * _BYTES_PER_SYNAPSE
    adjust = config.estimator == "ols" and config.rdd.ols_adjust
    if adjust:  # n_in x n_in: covariate sums (4 for free lines), products, their solve
        squares = 3.5 if config.rdd.ols_pooled else 6.5
        needed += sum(int(squares * 8 * sizes[l - 1] ** 2) for l in range(1, len(sizes)))
    # a segment's filtered spikes and their cumulative sums, kept for the next (rdd.Scratch)
    steps = (config.update_interval + 2 * _HISTORY_S) / config.lif.dt
    for l in range(1, len(sizes)):
        needed += int(2 * 8 * steps * (sizes[l] + (sizes[l - 1] if adjust else 0)))
    segments = (len(sizes) - 1) * math.ceil(
        config.duration / (len(sizes) - 1) / config.update_interval
    )
    return needed + segments * _BYTES_PER_SEGMENT


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _total_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(sizes: list[int], config: PhaseConfig) -> None:
    """UserError if the phase cannot fit in this machine's memory, saying how much it needs."""
    needed, total = memory_estimate(sizes, config), _total_memory()
    if total is not None and needed > total:
        raise UserError(
            f"a phase with layer sizes {sizes} and duration {config.duration:g} s needs about "
            f"{needed / 2**30:,.1f} GiB of memory, more than this machine's "
            f"{total / 2**30:,.1f} GiB; use smaller layers or a shorter duration"
        )


@dataclass
class PhaseResult:
    """What a phase produced. Matrices are out x in, like torch Linear weights, one per fc layer."""

    feedbacks: list[np.ndarray]
    beta: list[np.ndarray]
    alignment: list[dict]  # {"time", "layer", "angle_deg", "sign_agreement", "norm_ratio"}
    log_path: str | None
    wall_s: float  # simulation, estimation and updates (no build)
    build_s: float  # building or loading the compiled program (about 0 when already loaded)
    simulated_s: float
    windows: list[int]  # RDD windows recorded per fc layer
    # (fc index, start, end) per fc layer each segment estimated; layers estimated in the same
    # segment (adaptive) share start and end
    schedule: list[tuple[int, float, float]]
    # {"time", "layer", "predicted_sign_agreement", "trusted"} after each segment (ols); untrusted
    # standard errors (too few steps yet) count as infinite: 50 %
    criterion: list[dict]

    def final_alignment(self) -> list[dict]:
        """The last alignment record of every fc layer, in order fc1, fc2, ..."""
        last = {}
        for record in self.alignment:
            last[record["layer"]] = record
        return [last[name] for name in sorted(last, key=lambda name: int(name[2:]))]

    def seconds_per_layer(self) -> list[float]:
        """Simulated seconds each fc layer was estimated (its driven layer noise-driven)."""
        seconds = [0.0] * len(self.beta)
        for fc, start, end in self.schedule:
            seconds[fc] += end - start
        return seconds


class FeedbackPhase:
    """Runs feedback-training phases for one chain of layer sizes (e.g. [1600, 384, 192, 10])."""

    def __init__(
        self,
        sizes: list[int],
        config: PhaseConfig | None = None,
        cache_dir: str | Path | None = None,
        progress: bool = True,
    ) -> None:
        sizes = [int(n) for n in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise UserError(f"layer sizes must be at least two positive numbers, got {sizes}")
        self.sizes = sizes
        self.config = config or PhaseConfig()
        self.config.validate()
        check_memory(sizes, self.config)
        self.cache_dir = cache_dir
        self.progress = progress
        self.fc_names = [f"fc{index}" for index in range(1, len(sizes))]
        self._program: LIFProgram | None = None
        self._estimators = [
            make_estimator(self.config.estimator, sizes[l - 1], sizes[l], self.config.rdd)
            for l in range(1, len(sizes))
        ]
        self._feedback_std = np.full(len(self.fc_names), np.nan)
        self._scratch = Scratch()  # each layer's filtered spikes, reused by every segment
        self._needs_activity = self.config.estimator == "ols" and self.config.rdd.ols_adjust
        # the adaptive schedule ranks layers by their untrusted SEs before they are trusted
        self._early_ranks = self.config.schedule == "adaptive" and self._needs_activity

    # -- schedule -----------------------------------------------------------------------------
    def segment_plan(self) -> tuple[float, int]:
        """(segment length in s, number of segments): the reference share of a layer cut into
        pieces of at most ``update_interval``; the adaptive schedule has the same segments."""
        share = self.config.duration / len(self.fc_names)
        per_layer = max(1, math.ceil(share / self.config.update_interval - 1e-9))
        dt = self.config.lif.dt
        steps = round(share / per_layer / dt)
        if steps < round(self.config.lif.window_length / dt) + 1:
            raise UserError(
                f"phase duration {self.config.duration} s is too short: each of the "
                f"{len(self.fc_names)} fc layers needs more than one RDD window "
                f"({self.config.lif.window_length * 1e3:.0f} ms)"
            )
        return steps * dt, per_layer * len(self.fc_names)

    def next_segment(
        self,
        segments: list[tuple[int, ...]],
        criteria: list[float],
        ranks: list[float] | None = None,
    ) -> tuple[int, ...] | None:
        """The fc layers the next segment estimates (their driven layers are noise-driven
        together), after ``segments`` (the fc layers each earlier segment estimated); None ends
        the phase. ``criteria``: each layer's predicted sign agreement from trusted standard
        errors (NaN: none yet), which says whether it is at target; ``ranks``: the prediction
        that orders the layers (default ``criteria``; NaN counts as 50 %).

        Adaptive: a layer that has not been estimated yet goes first. Then, when the phase
        spends its whole budget (``stop_at_target`` off, as in the trainer), a layer that would
        otherwise fall a whole segment behind an even split of the segments so far: no layer gets
        less time than the reference schedule would give it. Otherwise the least certain layer
        below target (of all, once all are at target). Every other running layer (below target;
        every layer when the budget is spent) that can be estimated at the same time joins it,
        least certain first: fc l and fc m can when ``|l - m| >= 2``, as their driven and outcome
        layers are then four different layers (a driven layer takes no synaptic input,
        :mod:`spikealign.lif`). Layers that joined count as estimated.
        """
        _, n_segments = self.segment_plan()
        n_fc = len(self.fc_names)
        if len(segments) >= n_segments:
            return None
        if self.config.schedule == "reference":
            return (len(segments) * n_fc // n_segments,)
        values = np.asarray(criteria, dtype=np.float64)
        order = np.nan_to_num(np.asarray(criteria if ranks is None else ranks, float), nan=50.0)
        below = ~(values >= self.config.target)  # NaN: not known to be at target
        if not below.any() and self.config.stop_at_target:
            return None
        running = np.flatnonzero(below) if self.config.stop_at_target else np.arange(n_fc)
        counts = np.zeros(n_fc)
        for segment in segments:
            counts[list(segment)] += 1
        # behind by a whole segment after this one, if it went elsewhere
        debt = (len(segments) + 1) / n_fc - counts
        unseen = [fc for fc in running if counts[fc] == 0]
        owed = [fc for fc in running if debt[fc] >= 1 - 1e-9]
        if unseen:
            first = unseen[0]
        elif owed and not self.config.stop_at_target:
            first = min(owed, key=lambda fc: (-debt[fc], order[fc], fc))
        else:
            candidates = np.flatnonzero(below) if below.any() else np.arange(n_fc)
            first = int(candidates[np.argmin(order[candidates])])  # least certain; ties: lowest
        chosen = [int(first)]
        for fc in sorted(running, key=lambda fc: (order[fc], fc)):
            if all(abs(int(fc) - other) >= 2 for other in chosen):
                chosen.append(int(fc))
        return tuple(sorted(chosen))

    def program(self) -> LIFProgram:
        """The compiled program for this shape (built or loaded from the cache on first use)."""
        segment, _ = self.segment_plan()
        if self._program is None or abs(self._program.segment_duration - segment) > 1e-9:
            self._program = LIFProgram(self.sizes, segment, self.config.lif, self.cache_dir)
        return self._program

    # -- the phase ----------------------------------------------------------------------------
    def run(
        self,
        weights: list[np.ndarray],
        feedbacks: list[np.ndarray] | None = None,
        log_path: str | Path | None = None,
    ) -> PhaseResult:
        """Simulate one phase from forward ``weights`` and return the new feedback weights."""
        weights = self._check_matrices(weights, "weight")
        if feedbacks is None:
            feedbacks = kaiming_uniform(self.sizes, np.random.default_rng(self.config.seed))
        feedbacks = [f.copy() for f in self._check_matrices(feedbacks, "feedback")]
        for index, feedback in enumerate(feedbacks):
            if np.isnan(self._feedback_std[index]):
                self._feedback_std[index] = feedback.std()
        initial_feedbacks = [f.copy() for f in feedbacks]

        segment, n_segments = self.segment_plan()
        scaled = [scaled_weights(w, self.config.drive_gain) for w in weights]
        # per layer, its spikes of the last _HISTORY_S (times, indices)
        history = [(np.zeros(0), np.zeros(0, np.int32)) for _ in self.sizes]
        records: list[dict] = []
        window_counts = [0] * len(self.fc_names)
        for fc, feedback in enumerate(feedbacks):
            records.append(self._alignment_record(0.0, fc, weights[fc], feedback))
        criteria = [math.nan] * len(self.fc_names)
        ranks = [math.nan] * len(self.fc_names)
        gains = [math.nan] * len(self.fc_names)  # each layer's change of rank at its last estimate
        segments: list[tuple[int, ...]] = []  # the fc layers each segment estimated
        schedule: list[tuple[int, float, float]] = []
        criterion_records: list[dict] = []

        # The log first: it takes the log's lock, so a second writer stops before any work.
        writer = self._open_log(log_path, weights, initial_feedbacks, records)
        bar = pending = None
        # the compiled program holds a core while a segment is estimated: a BLAS team on every
        # core would spin against it (an adaptive 90 s phase of 1600-384-192-10 on 2 cores took
        # 8.1-8.6 s with two BLAS threads, 6.6-7.3 s with one)
        blas = threadpool_limits(limits=max(1, _available_cores() - 1), user_api="blas")
        try:
            build_start = time.perf_counter()
            program = self.program()
            build_s = time.perf_counter() - build_start
            state = program.initial_state()
            bar = self._progress_bar(segment * n_segments)
            wall_start = time.perf_counter()
            seed = self.config.seed
            chosen = self.next_segment(segments, criteria, ranks)
            pending = program.start_segment(scaled, state, chosen, seed, 0.0)
            self._reserve(chosen, segment)  # while the first segment is simulated
            while chosen is not None:
                start = len(segments) * segment
                end = start + segment
                record, state = pending.result()
                pending = None
                segments.append(chosen)
                # simulate the likely next segment while estimating this one
                guess = self.next_segment(segments, criteria, expected_ranks(ranks, gains, chosen))
                if guess is not None:
                    pending = program.start_segment(scaled, state, guess, seed, end)
                # every layer's spikes with the last _HISTORY_S before the segment: the kernels
                # of the previous segment's spikes reach into this one, whichever layers it drove
                spikes = []
                for layer, (times, indices) in enumerate(
                    zip(record.spike_times, record.spike_indices, strict=True)
                ):
                    if writer is not None:
                        writer.append_spikes(layer, times, indices)
                    times = np.concatenate([history[layer][0], times])
                    indices = np.concatenate([history[layer][1], indices])
                    keep = times >= end - _HISTORY_S
                    history[layer] = (times[keep], indices[keep])
                    spikes.append((times, indices))
                for fc in chosen:  # fc l is estimated from driven layer l (0-based)
                    windows = record.windows[fc]
                    settled = start
                    if len(segments) > 1 and fc not in segments[-2]:
                        settled = start + SETTLE_S
                        windows = windows.select(windows.start >= settled)
                    schedule.append((fc, start, end))
                    window_counts[fc] += len(windows)
                    self._estimate(fc, windows, spikes, start, end, settled)
                    estimator = self._estimators[fc]
                    beta = estimator.beta()
                    feedbacks[fc] = self._update(fc, feedbacks[fc], beta)
                    records.append(self._alignment_record(end, fc, weights[fc], feedbacks[fc]))
                    if hasattr(estimator, "standard_errors"):
                        # untrusted SEs are too optimistic to stop a layer, but with early ranks
                        # they still say which layer is behind
                        se = estimator.standard_errors(trusted_only=not self._early_ranks)
                        rank = predicted_sign_agreement(beta, se)
                        gains[fc], ranks[fc] = rank - ranks[fc], rank  # NaN gain when unranked
                        trusted = estimator.se_trusted()
                        # untrusted, the criterion is that of infinite SEs: 50 %, no claim
                        criteria[fc] = ranks[fc] if trusted else 50.0
                        criterion_records.append(
                            {
                                "time": end,
                                "layer": self.fc_names[fc],
                                "predicted_sign_agreement": criteria[fc],
                                "trusted": trusted,
                            }
                        )
                    if writer is not None:
                        self._log_estimate(
                            writer, windows, fc, start, end, records[-1], criteria[fc]
                        )
                if writer is not None:
                    writer.flush(end)
                if bar is not None:
                    bar.update(end - start)
                chosen = self.next_segment(segments, criteria, ranks)
                if chosen != guess:  # the estimate changed the choice: restart the next segment
                    if pending is not None:
                        pending.cancel()
                        pending = None
                    if chosen is not None:
                        pending = program.start_segment(scaled, state, chosen, seed, end)
            betas = [estimator.beta().T.copy() for estimator in self._estimators]
            if writer is not None:
                for fc, name in enumerate(self.fc_names):
                    writer.write_weights(name, Y_after=feedbacks[fc], beta=betas[fc])
                writer.close()
        except BaseException:
            if pending is not None:
                pending.cancel()
            if writer is not None:
                writer.abandon()  # the .partial log keeps everything flushed so far
            raise
        finally:
            blas.restore_original_limits()
            if bar is not None:
                bar.close()
        wall_s = time.perf_counter() - wall_start
        return PhaseResult(
            feedbacks=feedbacks,
            beta=betas,
            alignment=records,
            log_path=str(log_path) if log_path is not None else None,
            wall_s=wall_s,
            build_s=build_s,
            simulated_s=schedule[-1][2],
            windows=window_counts,
            schedule=schedule,
            criterion=criterion_records,
        )

    def _estimate(self, driven, windows, spikes, start, end, settled) -> None:
        """Give the windows, the filtered spikes of the layer above and, for the adjusted OLS, the
        driven layer's activity to the estimator. ``spikes``: (times, indices) per layer."""
        p = self.config.lif
        if len(windows) == 0:
            return
        first_time = min(start, float(windows.start.min())) - _HISTORY_S
        first_step = math.floor(first_time / p.dt)
        n_steps = round(end / p.dt) - first_step + 1
        filter_args = (first_step, n_steps, p.dt, p.tau_L, p.tau_s)
        q, activity = self._work_arrays(driven, n_steps)
        filtered_spikes(*spikes[driven + 1], self.sizes[driven + 1], *filter_args, out=q)
        if activity is not None:
            filtered_spikes(
                *spikes[driven], self.sizes[driven], *filter_args, times=2, out=activity
            )
        self._estimators[driven].add(
            windows,
            q,
            first_step,
            p.dt,
            activity=activity,
            since_step=round(settled / p.dt),
            early_se=self._early_ranks,
        )

    def _reserve(self, chosen: tuple[int, ...], segment: float) -> None:
        """Fault in the work arrays of estimating ``chosen`` from a segment of ``segment`` s, the
        first time (:class:`spikealign.rdd.Scratch`: a segment of 1600 neurons needs 300 MB)."""
        n_steps = round((segment + 2 * _HISTORY_S) / self.config.lif.dt)
        for fc in chosen:
            q, activity = self._work_arrays(fc, n_steps)
            q.fill(0.0)
            if activity is not None:
                activity.fill(0.0)
                self._estimators[fc].reserve(n_steps)

    def _work_arrays(self, driven: int, n_steps: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Scratch memory for estimating fc ``driven`` from ``n_steps``: the filtered spikes q
        of the layer above, and the driven layer's activity (adjusted OLS only, else None)."""
        q = self._scratch.get(driven + 1, (n_steps, self.sizes[driven + 1]))
        if not self._needs_activity:
            return q, None
        return q, self._scratch.get(("activity", driven), (n_steps, self.sizes[driven]))

    def _update(self, fc: int, feedback: np.ndarray, beta: np.ndarray) -> np.ndarray:
        """Apply the feedback update rule with the current beta (n_in x n_out) to Y (out x in)."""
        beta = beta.T
        mask = beta != 0
        if not mask.any():
            return feedback
        beta_std = beta[mask].std()
        if beta_std == 0:
            return feedback
        beta_hat = beta * (self._feedback_std[fc] / beta_std)
        if self.config.update == "rescale":
            return np.where(mask, beta_hat, feedback)
        c = self.config
        step = c.eta * (c.omega * beta_hat - c.gamma * feedback) - c.eta * c.weight_decay * feedback
        return np.where(mask, feedback + step, feedback)

    def _alignment_record(self, t, fc, weight, feedback) -> dict:
        return {"time": float(t), "layer": self.fc_names[fc], **alignment(weight, feedback)}

    # -- validation, logging, progress ----------------------------------------------------------
    def _check_matrices(self, matrices, what: str) -> list[np.ndarray]:
        matrices = list(matrices)
        if len(matrices) != len(self.fc_names):
            raise UserError(
                f"expected {len(self.fc_names)} {what} matrices for layer sizes {self.sizes}, "
                f"got {len(matrices)}"
            )
        checked = []
        for index, matrix in enumerate(matrices):
            matrix = np.asarray(matrix)
            expected = (self.sizes[index + 1], self.sizes[index])
            name = self.fc_names[index]
            if matrix.dtype.kind not in "biuf":
                raise UserError(
                    f"{what} of {name} must hold real numbers, got dtype {matrix.dtype}"
                )
            matrix = matrix.astype(np.float64)
            if matrix.shape != expected:
                raise UserError(
                    f"{what} of {name} has shape {matrix.shape}, expected {expected} "
                    f"(out x in) for layer sizes {self.sizes}"
                )
            if not np.isfinite(matrix).all():
                raise UserError(f"{what} of {name} contains NaN or infinite values")
            with np.errstate(all="ignore"):
                spread = matrix.std()
            if not np.isfinite(spread):
                raise UserError(
                    f"{what} of {name} is too large to rescale (its standard deviation "
                    "overflows float64); divide it by a common factor"
                )
            if np.all(matrix == matrix.flat[0]):
                raise UserError(self._no_spread(what, name, matrix))
            if what == "weight":
                scaled = scaled_weights(matrix, self.config.drive_gain)
                target = self.config.drive_gain * matrix.shape[1]
                if spread == 0 or not np.isclose(scaled.std(), target, rtol=1e-6):
                    raise UserError(
                        f"weight of {name} is too small to rescale (standard deviation "
                        f"{spread:.3g}, below float64's precision); multiply it by a common factor"
                    )
            checked.append(matrix)
        return checked

    @staticmethod
    def _no_spread(what: str, name: str, matrix: np.ndarray) -> str:
        """Why a matrix whose entries are all equal cannot be used."""
        value = "all zero" if not matrix.any() else f"constant ({matrix.flat[0]:g} everywhere)"
        if what == "weight":
            return (
                f"weight of {name} is {value}: the spiking network scales W by 1/std(W), so the "
                "layer above gets no input and no causal effect can be estimated; use trained or "
                "random forward weights"
            )
        return (
            f"feedback of {name} is {value}: the update rescales beta to the feedback's initial "
            "standard deviation (0), so the feedback could never change; start from random "
            "feedback (leave Y out)"
        )

    def _open_log(self, log_path, weights, feedbacks, records):
        if log_path is None:
            return None
        from spikealign.spikelog import SpikeLogWriter

        params = {"config": asdict(self.config), "sizes": self.sizes}
        writer = SpikeLogWriter(
            log_path, self.sizes, self.config.lif.dt, params=params, seed=self.config.seed
        )
        for fc, name in enumerate(self.fc_names):
            writer.write_weights(name, W=weights[fc], Y_before=feedbacks[fc])
        for record in records:  # alignment before the phase
            writer.append_alignment(
                0.0,
                self.fc_names.index(record["layer"]),
                record["angle_deg"],
                record["sign_agreement"],
                record["norm_ratio"],
            )
        writer.flush(0.0)
        return writer

    def _log_estimate(self, writer, windows, fc, start, end, alignment_record, criterion) -> None:
        """Log what estimating ``fc`` from one segment gave (its driven layer's windows, the
        schedule row, criterion and alignment); the segment's spikes are logged once."""
        writer.append_windows(
            fc, windows.neuron, windows.start, windows.end, windows.u_max, windows.spikes > 0
        )
        writer.append_schedule(fc, start, end)
        if not math.isnan(criterion):
            writer.append_criterion(end, fc, criterion)
        writer.append_alignment(
            end,
            fc,
            alignment_record["angle_deg"],
            alignment_record["sign_agreement"],
            alignment_record["norm_ratio"],
        )

    def _progress_bar(self, total: float):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, unit="s", desc="feedback phase (simulated s)", leave=False)

    # -- state across phases ------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Estimator state and initial feedback std: numpy arrays only (safe to checkpoint)."""
        state = {"feedback_std": self._feedback_std.copy()}
        for fc, estimator in enumerate(self._estimators):
            for key, value in estimator.state_dict().items():
                state[f"{self.fc_names[fc]}.{key}"] = np.array(value)
        return state

    def load_state_dict(self, state: dict) -> None:
        self._feedback_std = np.array(state["feedback_std"], dtype=np.float64)
        for fc, estimator in enumerate(self._estimators):
            prefix = f"{self.fc_names[fc]}."
            estimator.load_state_dict(
                {k[len(prefix) :]: np.asarray(v) for k, v in state.items() if k.startswith(prefix)}
            )


def expected_ranks(
    ranks: list[float], gains: list[float], estimating: tuple[int, ...]
) -> list[float]:
    """The ranks to guess the next segment by while the layers ``estimating`` are estimated:
    each of them gains what it gained at its last estimate (``gains``), and one without a gain
    yet (first estimate) is taken not to be the least certain. Only wall time hangs on the guess:
    a wrong one is simulated again once the estimate is in (0.3 s for 1600-384-192-10)."""
    expected = list(ranks)
    for fc in estimating:
        expected[fc] = ranks[fc] + gains[fc] if math.isfinite(gains[fc]) else math.inf
    return expected


# -- weights in and out ---------------------------------------------------------------------------
def kaiming_uniform(sizes: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    """Random (out x in) matrices with torch.nn.Linear's default bound 1/sqrt(n_in)."""
    return [
        rng.uniform(-1.0, 1.0, (sizes[l], sizes[l - 1])) / math.sqrt(sizes[l - 1])
        for l in range(1, len(sizes))
    ]


def _numbered(arrays: dict, prefix: str) -> list[np.ndarray]:
    numbers = sorted(
        int(k[len(prefix) :]) for k in arrays if k.startswith(prefix) and k[len(prefix) :].isdigit()
    )
    if numbers and numbers != list(range(1, len(numbers) + 1)):
        raise UserError(f"{prefix} arrays must be numbered 1..n without gaps, found {numbers}")
    return [np.asarray(arrays[f"{prefix}{n}"]) for n in numbers]


def sizes_of(weights: list[np.ndarray], source: str) -> list[int]:
    """Layer sizes of a chain of (out x in) matrices; a one-line error if they do not chain."""
    for index, weight in enumerate(weights):
        if weight.ndim != 2:
            raise UserError(f"{source}: W{index + 1} must be a matrix, got shape {weight.shape}")
    for index in range(1, len(weights)):
        if weights[index].shape[1] != weights[index - 1].shape[0]:
            raise UserError(
                f"{source}: shapes do not chain: W{index} is {weights[index - 1].shape} but "
                f"W{index + 1} is {weights[index].shape} (out x in: W{index + 1} needs "
                f"{weights[index - 1].shape[0]} inputs)"
            )
    return [int(weights[0].shape[1])] + [int(w.shape[0]) for w in weights]


def load_weights_npz(path: str | Path) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Read W1..Wn (and optional Y1..Yn) from an .npz file: (weights, feedbacks or None)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Exception as err:  # zipfile, pickle or format errors: all mean "not a weights file"
        raise UserError(f"{path}: cannot read as .npz ({type(err).__name__}: {err})") from None
    weights = _numbered(arrays, "W")
    if not weights:
        raise UserError(f"{path}: no arrays W1..Wn (out x in, like torch Linear weights)")
    feedbacks = _numbered(arrays, "Y") or None
    if feedbacks is not None and len(feedbacks) != len(weights):
        raise UserError(f"{path}: has {len(weights)} W arrays but {len(feedbacks)} Y arrays")
    return weights, feedbacks


def load_checkpoint_weights(path: str | Path) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """fc1..fcn weights and feedbacks of a training checkpoint (``python -m training.run``)."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Exception as err:
        raise UserError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a training checkpoint (no model state)")
    arrays = {}
    for key, value in state.items():
        name, _, field_name = key.rpartition(".")
        if name.startswith("fc") and name[2:].isdigit() and field_name in ("weight", "feedback"):
            arrays[("W" if field_name == "weight" else "Y") + name[2:]] = value.float().numpy()
    weights = _numbered(arrays, "W")
    if not weights:
        raise UserError(f"{path}: no fully connected layers fc1..fcn in the checkpoint")
    return weights, _numbered(arrays, "Y") or None


def save_weights_npz(path: str | Path, weights: list[np.ndarray], feedbacks: list[np.ndarray]):
    """Write W1..Wn and Y1..Yn atomically (temporary file, then rename)."""
    path = Path(path)
    arrays = {f"W{n}": w for n, w in enumerate(weights, 1)}
    arrays.update({f"Y{n}": y for n, y in enumerate(feedbacks, 1)})
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(tmp, path)
