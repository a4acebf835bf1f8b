"""Regression discontinuity estimates of each neuron's causal effect on the layer above (METHOD 4).

A neuron ``i`` of the noise-driven layer opens an RDD window when its input drive ``u`` comes
within ``window_open_band`` of the threshold ``theta``. For each window (recorded by
:mod:`spikealign.lif`) and each neuron ``k`` of the layer above::

    q_k(n)   = sum_{m < n} kappa(n - m) s_k(m)           filtered spikes of k (s_k: spike counts)
    R_pre    = q_k(n_start)                               baseline at the window's opening
    dR_ik    = mean_{n_start < n <= n_end} q_k(n) - R_pre  the outcome of the window
    x        = u_max                                      the running variable

A window is "spiked" if neuron ``i`` fired in it, else "almost spiked"; windows with
``|u_max - theta| > u_band`` are dropped. Two straight lines ``dR = m x + c`` are fitted per
(i, k), one to each kind of window, and the causal effect is the jump at threshold::

    beta_ik = (m+ theta + c+) - (m- theta + c-)

Two estimators share the recorded windows:

* ``lms`` (the reference): online least-mean-squares, window after window in time order,
  ``err = m x + c - dR; m -= rate * err * x; c -= rate * err``, starting from zero and keeping its
  state across phases.
* ``ols``: exact least squares of both lines over all windows so far (sufficient statistics kept
  across the segments of a phase), optionally weighted by a triangular kernel of bandwidth ``h``
  around threshold (local-linear RDD). By default (``ols_pooled``) the lines share what the design
  makes common: the noise driving each neuron is independent of everything else, so the outcome of
  k without a spike does not depend on which neuron i opened the window. The "almost spiked" line
  of k is fitted to the windows of all neurons, the "spiked" slope of k is fitted within neurons,
  and only the jump is per (i, k)::

      beta_ik = [mean+_ik dR + m+_k (theta - mean+_i x)] - [c-_k + m-_k theta]

  a panel regression with neuron-specific jumps. It has far less variance than fitting two free
  lines per (i, k) (``ols_pooled=False``, kept for comparison).
* ``ols`` with ``ols_adjust`` (default): covariate-adjusted RDD. Most of the variance of dR_ik
  comes from the other driven neurons, whose spikes the treatment of i cannot move (no lateral
  connections, independent noise). A ridge regression of q_k on the activity
  ``a_j = kappa * kappa * s_j`` of every driven neuron, over the time steps, predicts their part of
  each window's outcome, which is subtracted before the lines are fitted::

      dR'_ik = dR_ik - sum_{j != i} gamma_jk dA_j      dA_j: the outcome of a_j over the window

  i's own activity is never subtracted: it carries the treatment. Covariates the treatment cannot
  move are balanced at threshold, so the jump stays unbiased whatever gamma is; a good gamma only
  removes variance. On 1600-384-192-10 this raises sign agreement after one 90 s phase from about
  63 / 75 / 81 % to 68 / 83 / 88 % (``benchmarks/rdd_phase.py``). All of it is sufficient
  statistics: per (side, i) the window sums of dA_j, and the regression's sums over steps. The
  regression has n_in coefficients per k, and the activity is smooth (kappa * kappa spans tens of
  steps), so for the first tens of seconds it has few independent steps per coefficient. A ridge
  worth ``adjust_ridge_steps`` (1000) steps of a_j's mean variance per coefficient keeps it from
  fitting noise there and fades as the steps accumulate (sign agreement of fc1 of
  1600-384-192-10, seed 0, after 10 / 30 / 90 s: 56 / 68 / 80 % without, 59 / 70 / 80 % with;
  with a 10 ms noise period after 10 / 30 / 50 s: 58 / 75 / 82 % and 65 / 77 / 82 %).

Standard errors (``OLSEstimator.standard_errors``). Every jump is linear in the outcomes,
``beta_ik = sum_w c_w dR'_wk``, so with independent windows and a residual variance sigma_sk^2 per
(side, k), ``Var(beta_ik) = sigma_+k^2 V_+(theta) + sigma_-k^2 V_-(theta)`` with ``V(t) = sum_w
c_w(t)^2`` for the fitted value at t. For a group of windows (neuron i's spiked windows, or all
control windows) fitted as ``mean_y + m (t - mean_x)`` with the slope over windows v (centred sum
of squares S, within groups when pooled)::

    c_v(t) = [v in group] w_v / n + (t - mean_x) w_v (x_v - mean_x(v)) / S
    V(t)   = W2 / n^2 + 2 (t - mean_x) (W2x - mean_x W2) / (n S) + (t - mean_x)^2 D2 / S^2

    n = sum w, W2 = sum w^2, W2x = sum w^2 x over the group, D2 = sum_v w_v^2 (x_v - mean_x(v))^2

which needs only the sums of w, w x, w x^2 and of w^2, w^2 x, w^2 x^2 per (side, i). (With 0/1
weights W2 = n, the middle term vanishes and V = 1/n + (t - mean_x)^2 / S, the textbook formula.)
sigma^2 comes from the windows of the latest segment about the current lines: each residual has
``E[e_w^2] = sigma^2 (1 - 2 H_ww + V(x_w))``, ``H_ww = w_w (1/n + (x_w - mean_x)^2 / S)`` its
leverage, so ``sigma^2 = sum e_w^2 / sum (1 - 2 H_ww + V(x_w))`` (``RSS / (n - p)`` for 0/1
weights). With ``ols_adjust`` this treats gamma as known. It is not while gamma (N_i coefficients
per k) is fitted from few time steps: the in-sample fit then also absorbs noise and the SEs come
out too small (on 1600-384-192-10 fc1 after 10 s they promise 93 % sign agreement where 56 % is
measured; from about 40 steps per driven neuron on they are within 3 points). So the SEs are
infinite until the regression has ``se_min_steps_per_neuron`` (40) time steps per driven neuron.

Stopping criterion (:func:`predicted_sign_agreement`), from beta_hat and se alone: empirical Bayes
with a symmetric unimodal prior of the true jumps, ``g = sum_m pi_m U(-a_m, a_m)`` (a grid of
half-widths, a_0 = 0 a point mass; adaptive shrinkage, Stephens 2017), fitted by maximum
likelihood to ``beta_hat ~ g * N(0, se^2)``; the prediction is the mean over (i, k) of the
posterior probability that sign(b) = sign(beta_hat)::

    P_ik = sum_m post_m(beta_hat) P(b beta_hat > 0 | beta_hat, m),
    P(b > 0 | beta_hat, m) = [Phi(beta_hat/se) - Phi((beta_hat - a)/se)]
                             / [Phi((beta_hat + a)/se) - Phi((beta_hat - a)/se)]

A plain mean of Phi(|beta_hat| / se) would be biased up: pure noise gives 75 % instead of 50 %.

The outcome sums never touch an (N_i x N_k) array per time step: ``sum_n q_k(n)`` over a window is a
difference of the running cumulative sum of ``q_k``, and the per-neuron sums over windows are one
sparse (neurons x time steps) by dense (time steps x N_k) product. The adjustment's products over
time steps (sum a a^T: 13 G multiply-adds per 10 s of 1600 neurons, once the largest cost of a
phase) take every ``adjust_stride``-th step (4), each counted that often: a_j is kappa * kappa of
spikes, smooth over tens of steps, so a step adds little to its neighbours (gamma within 4e-4 of
the every-step fit on the tests' synthetic layers; sign agreement and stopping times of
1600-384-192-10 unchanged to 0.1 point), and they are summed in single precision about each
segment's mean. gamma only removes variance: the jump stays unbiased whatever gamma is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.linalg import cho_factor, cho_solve
from scipy.signal import lfilter

ESTIMATORS = ("lms", "ols")


@dataclass(frozen=True)
class RDDParams:
    """Parameters of the estimators (METHOD 4)."""

    threshold: float = 1.0  # theta, where the jump is measured
    u_band: float = 10.0  # windows with |u_max - theta| > u_band are dropped
    lms_rate: float = 1e-3  # learning rate of the online LMS fit (reference)
    # half-width of the triangular kernel around theta (local-linear RDD); None: unweighted
    ols_bandwidth: float | None = None
    ols_pooled: bool = True  # share the control line and spiked slope over neurons (see above)
    ols_adjust: bool = True  # subtract the other driven neurons' predicted effect (see above)
    # ridge of the adjustment's regression: the mean activity variance of this many time steps
    adjust_ridge_steps: float = 1000.0
    # the regression's sums take every adjust_stride-th time step, counted adjust_stride times:
    # the activity is smooth (kappa * kappa spans tens of steps), so neighbours add little
    adjust_stride: int = 4
    # with ols_adjust, standard errors count only once the adjustment's regression has this many
    # time steps per driven neuron (before, its in-sample fit hides noise; module docstring)
    se_min_steps_per_neuron: float = 40.0


@dataclass
class Windows:
    """RDD windows of one driven layer. Times in seconds; ``spiked`` is the neuron's spike count."""

    neuron: np.ndarray
    start: np.ndarray
    end: np.ndarray
    u_max: np.ndarray
    spikes: np.ndarray

    def __len__(self) -> int:
        return len(self.neuron)

    def select(self, keep: np.ndarray) -> Windows:
        """The windows where ``keep`` (a boolean mask or indices) holds."""
        return Windows(
            self.neuron[keep], self.start[keep], self.end[keep], self.u_max[keep], self.spikes[keep]
        )


class Scratch:
    """Work arrays kept from one segment to the next, by name.

    A segment's arrays are large (the activity of 1600 neurons over 10 s is 130 MB). Allocated
    afresh, each is faulted in page by page, and in a virtual machine that hands freed memory back
    to its host (virtio free page reporting, ~2 s after the free) that costs ~2 ms per MB: on the
    2-core development VM a third of an adaptive phase's wall time. Reused, they stay resident.
    """

    def __init__(self) -> None:
        self._arrays: dict[object, np.ndarray] = {}

    def get(self, name, shape: tuple[int, ...], dtype=np.float64) -> np.ndarray:
        """An uninitialised C-contiguous array of ``shape``, the same memory each time."""
        size = math.prod(shape)
        array = self._arrays.get(name)
        if array is None or array.size < size or array.dtype != dtype:
            # a little headroom: a segment's step count varies with its earliest window
            array = self._arrays[name] = np.empty(size + size // 16, dtype)
        return array[:size].reshape(shape)


def filtered_spikes(
    spike_times: np.ndarray,
    spike_indices: np.ndarray,
    n_neurons: int,
    first_step: int,
    n_steps: int,
    dt: float,
    tau_L: float,
    tau_s: float,
    times: int = 1,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """q(n) = sum_{m<n} kappa(n - m) s(m) for steps first_step .. first_step + n_steps - 1.

    ``times=2`` filters twice (kappa * kappa * s): the activity of the driven layer that the
    adjusted OLS uses as covariates, each neuron's drive to the layer above filtered once more as
    that layer's spikes are into q. Spikes before ``first_step`` are ignored, so start the range
    early enough (a few tau_L) for the windows that need it. Returns float64 (n_steps, n_neurons),
    written into ``out`` when given (e.g. from a :class:`Scratch`).
    """
    if out is None:
        out = np.empty((n_steps, n_neurons))
    elif out.shape != (n_steps, n_neurons) or out.dtype != np.float64:
        raise ValueError(f"out must be float64 of shape {(n_steps, n_neurons)}, got {out.shape}")
    steps = np.rint(np.asarray(spike_times) / dt).astype(np.int64) - first_step
    keep = (steps >= 0) & (steps < n_steps)
    out.fill(0.0)
    np.add.at(out.reshape(-1), steps[keep] * n_neurons + np.asarray(spike_indices)[keep], 1.0)
    # kappa as a recursive filter: sum_{n>=1} kappa(n) z^-n
    #   = z^-1 (d_L - d_s) / kernel_norm / ((1 - d_L z^-1)(1 - d_s z^-1)),  d = exp(-dt / tau)
    decay_L, decay_s = np.exp(-dt / tau_L), np.exp(-dt / tau_s)
    numerator = np.array([0.0, (decay_L - decay_s) / ((tau_L - tau_s) / dt)])
    denominator = np.array([1.0, -(decay_L + decay_s), decay_L * decay_s])
    b, a = numerator, denominator
    for _ in range(times - 1):
        b, a = np.convolve(b, numerator), np.convolve(a, denominator)
    # in place, a block of neurons at a time: lfilter's copies stay a few MB
    for first in range(0, n_neurons, _FILTER_BLOCK):
        block = slice(first, first + _FILTER_BLOCK)
        out[:, block] = lfilter(b, a, out[:, block], axis=0)
    return out


def cumulative_sum(values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """C(n) = values(0) + ... + values(n) over axis 0, bit for bit ``np.cumsum(values, axis=0)``,
    into ``out`` when given (which may be ``values``).

    numpy accumulates along axis 0 of a C-ordered array column by column, striding through
    memory: for 10,000 steps of 1,600 neurons that takes 140 ms, adding row after row 20 ms.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] < 64 or len(values) == 0:
        return np.cumsum(values, axis=0, out=out)
    if out is None:
        out = np.empty_like(values)
    out[0] = values[0]
    for row in range(1, len(values)):
        np.add(out[row - 1], values[row], out=out[row])
    return out


def window_steps(
    windows: Windows, first_step: int, n_steps: int, dt: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps of each window: (start step, end step, length) relative to ``first_step``."""
    start = np.rint(windows.start / dt).astype(np.int64) - first_step
    end = np.rint(windows.end / dt).astype(np.int64) - first_step
    if len(start) and (start.min() < 0 or end.max() >= n_steps):
        raise ValueError("a window lies outside the filtered spike range")
    return start, end, np.maximum(end - start, 1)


def outcome_sums(
    windows: Windows,
    weights: np.ndarray,
    rows: np.ndarray,
    n_rows: int,
    q: np.ndarray,
    first_step: int,
    dt: float,
    cumulative: np.ndarray | None = None,
) -> np.ndarray:
    """sum over windows w with rows[w] == r of weights[s, w] * dR_w, for every set s and row r.

    ``weights`` is (n_sets, n_windows); the result is (n_sets, n_rows, N_k). dR_w =
    (C(end) - C(start)) / length - q(start), with C the cumulative sum of q over steps, computed
    once for all sets (pass ``cumulative`` = ``cumulative_sum(q)`` when the caller has it).
    """
    weights = np.atleast_2d(weights)
    n_sets, n_steps = len(weights), q.shape[0]
    start, end, length = window_steps(windows, first_step, n_steps, dt)
    if cumulative is None:
        cumulative = cumulative_sum(q)  # C(n) = q(0) + ... + q(n), so q(n) = C(n) - C(n - 1)
    # one sparse matrix (in CSC form: each row of C is read once) picks, per window and set,
    # +C(end)/L - C(start)/L - C(start) + C(start - 1), which is the window's dR
    set_rows = (np.arange(n_sets)[:, None] * n_rows + rows[None, :]).ravel()
    scaled = (weights / length).ravel()
    weights = weights.ravel()
    ends, starts = np.tile(end, n_sets), np.tile(start, n_sets)
    inside = starts > 0  # C(-1) = 0
    selector = sp.csc_matrix(
        (
            np.concatenate([scaled, -scaled - weights, weights[inside]]),
            (
                np.concatenate([set_rows, set_rows, set_rows[inside]]),
                np.concatenate([ends, starts, starts[inside] - 1]),
            ),
        ),
        shape=(n_sets * n_rows, n_steps),
    )
    sums = np.asarray(selector @ cumulative)
    return sums.reshape(n_sets, n_rows, q.shape[1])


def window_outcomes(windows: Windows, q: np.ndarray, first_step: int, dt: float) -> np.ndarray:
    """dR for every window: (n_windows, N_k). Used by LMS, which needs them one by one."""
    start, end, length = window_steps(windows, first_step, q.shape[0], dt)
    return _outcomes(q, cumulative_sum(q), start, end, length)


def classify(windows: Windows, params: RDDParams) -> tuple[np.ndarray, np.ndarray]:
    """(kept, spiked): which windows enter the fit, and which of those are "spiked"."""
    kept = np.abs(windows.u_max - params.threshold) <= params.u_band
    return kept, windows.spikes > 0


class OLSEstimator:
    """Exact (optionally kernel-weighted) least squares of both lines, from sufficient statistics.

    Per neuron i and side (spiked / almost spiked) it accumulates sum w, sum w x, sum w x^2 (and
    the same with w^2, for the standard errors) and per (i, k) sum w dR, sum w x dR. Statistics
    persist across :meth:`add` calls (segments of a phase) and, when the caller keeps the
    estimator, across phases. With ``ols_adjust`` it also keeps the regression of the layer above
    on the driven layer and the window sums of every driven neuron's activity: per (i, j) those of
    i's spiked windows, and per side their totals over i and each neuron's own (what the pooled
    lines use; per (side, i, j) without ``ols_pooled``); for 1600 -> 384 about 70 MB, and 190 MB
    of work arrays kept for the next segment (:class:`Scratch`).
    :meth:`standard_errors` gives the standard error of every jump (module docstring).
    """

    def __init__(self, n_in: int, n_out: int, params: RDDParams) -> None:
        if not (isinstance(params.adjust_stride, int) and params.adjust_stride >= 1):
            stride = params.adjust_stride
            raise ValueError(f"adjust_stride must be a positive integer, got {stride!r}")
        self.params = params
        self.n_in, self.n_out = n_in, n_out
        self.scalar = np.zeros((2, n_in, 3))  # side, neuron, [sum w, sum w x, sum w x^2]
        self.scalar_sq = np.zeros((2, n_in, 3))  # side, neuron, [sum w^2, sum w^2 x, sum w^2 x^2]
        self.sum_y = np.zeros((2, n_in, n_out))
        self.sum_xy = np.zeros((2, n_in, n_out))
        # sigma^2 of a window's outcome about its line, per (side, k), from the last segment
        self.residual_var = np.full((2, n_out), np.nan)
        if params.ols_adjust:
            # window sums of the covariates: like sum_y and sum_xy with a_j in place of dR_k
            if params.ols_pooled:  # as much of them as the pooled lines use (_pooled_sums)
                self.covariate_spiked = np.zeros((n_in, n_in))  # sum w dA_j, i's spiked windows
                # [sum w dA, sum w x dA] per side, over all windows (totals) or i's own dA_i (own)
                self.covariate_total = np.zeros((2, 2, n_in))
                self.covariate_own = np.zeros((2, 2, n_in))
            else:
                self.covariate_y = np.zeros((2, n_in, n_in))
                self.covariate_xy = np.zeros((2, n_in, n_in))
            # regression of q (layer above) on a (driven layer) over time steps: sums
            self.steps = np.zeros(())
            self.sum_a, self.sum_q = np.zeros(n_in), np.zeros(n_out)
            self.sum_aa, self.sum_aq = np.zeros((n_in, n_in)), np.zeros((n_in, n_out))
        self._cache: dict[str, object] = {}  # derived from the statistics; cleared when they change
        self._scratch = Scratch()  # work arrays of a segment (_work_array)

    def add(
        self,
        windows: Windows,
        q: np.ndarray,
        first_step: int,
        dt: float,
        activity: np.ndarray | None = None,
        since_step: int | None = None,
        early_se: bool = False,
    ) -> None:
        """Add the windows of one segment, then re-estimate sigma^2 from them (only once the
        standard errors are trusted, :meth:`se_trusted`, or always with ``early_se``: for
        ``standard_errors(trusted_only=False)``).

        ``q`` is the filtered activity of the layer above from ``first_step`` on. With
        ``ols_adjust``, ``activity`` is ``kappa * kappa * s_j`` of the driven layer over the same
        steps (:func:`filtered_spikes` with ``times=2``); steps before ``since_step`` (history
        shared with the previous segment) enter window outcomes but not the regression.
        """
        if self.params.ols_adjust and (
            activity is None or activity.shape != (q.shape[0], self.n_in)
        ):
            raise ValueError(
                "ols_adjust needs the driven layer's activity over the steps of q, shape "
                f"({q.shape[0]}, {self.n_in}); pass activity= or set ols_adjust=False"
            )
        self._cache.clear()
        kept, spiked = classify(windows, self.params)
        x = windows.u_max
        weight = kept.astype(np.float64)
        if self.params.ols_bandwidth is not None:
            distance = np.abs(x - self.params.threshold) / self.params.ols_bandwidth
            weight *= np.clip(1.0 - distance, 0.0, None)
        side = np.where(spiked, 0, 1)
        rows = side * self.n_in + windows.neuron
        for column, values in enumerate((weight, weight * x, weight * x * x)):
            np.add.at(self.scalar[..., column].reshape(-1), rows, values)
            np.add.at(self.scalar_sq[..., column].reshape(-1), rows, weight * values)
        # the cumulative sums over steps serve the outcome sums and the residuals: computed once
        cumulative_q = cumulative_sum(q, out=self._work_array("q", len(q)))
        sets = [weight, weight * x]  # the sums per window of w dR and w x dR
        sums = outcome_sums(windows, sets, rows, 2 * self.n_in, q, first_step, dt, cumulative_q)
        self.sum_y += sums[0].reshape(2, self.n_in, self.n_out)
        self.sum_xy += sums[1].reshape(2, self.n_in, self.n_out)
        cumulative_a = None
        if self.params.ols_adjust:
            cumulative_a = cumulative_sum(activity, out=self._work_array("a", len(activity)))
            self._add_covariate_sums(
                windows, sets, side, rows, activity, cumulative_a, first_step, dt
            )
            new = slice(
                max((since_step if since_step is not None else first_step) - first_step, 0), None
            )
            stride = self.params.adjust_stride
            self._add_products(activity[new][::stride], q[new][::stride], stride)
        if early_se or self.se_trusted():  # else the SEs are inf whatever sigma^2 is: skip it
            cumulatives = (cumulative_q, activity, cumulative_a)
            self._update_residual_var(windows, weight, side, q, first_step, dt, cumulatives)

    def reserve(self, n_steps: int) -> None:
        """Fault in the work arrays of a segment of ``n_steps`` (with ``ols_adjust``), e.g. while
        the caller waits for the segment: new memory costs ~2 ms per MB on first touch in a VM
        that returns freed memory to its host."""
        if self.params.ols_adjust:
            for name in ("q", "a", "gram", "gram32"):
                self._work_array(name, n_steps).fill(0.0)

    def _work_array(self, name: str, n_steps: int = 0) -> np.ndarray:
        """Scratch memory by name: the cumulative sums over ``n_steps`` of q ("q") and of the
        activity ("a"), the Gram matrix ("gram") and a segment's share of it ("gram32")."""
        shape, dtype = {
            "q": ((n_steps, self.n_out), np.float64),
            "a": ((n_steps, self.n_in), np.float64),
            "gram": ((self.n_in, self.n_in), np.float64),
            "gram32": ((self.n_in, self.n_in), np.float32),
        }[name]
        return self._scratch.get(name, shape, dtype)

    def _add_covariate_sums(
        self, windows, sets, side, rows, activity, cumulative, first_step, dt
    ) -> None:
        """Add the window sums of the driven layer's activity (and its cumulative sum), weighted
        by ``sets`` (w and w x per window)."""
        args = (activity, first_step, dt, cumulative)
        if not self.params.ols_pooled:
            covariates = outcome_sums(windows, sets, rows, 2 * self.n_in, *args)
            self.covariate_y += covariates[0].reshape(2, self.n_in, self.n_in)
            self.covariate_xy += covariates[1].reshape(2, self.n_in, self.n_in)
            return
        spiked = side == 0
        self.covariate_spiked += outcome_sums(
            windows.select(spiked), sets[0][spiked], windows.neuron[spiked], self.n_in, *args
        )[0]
        # one row per side: the windows' shared steps add up, so this costs a few steps' rows
        self.covariate_total += outcome_sums(windows, sets, side, 2, *args)
        start, end, length = window_steps(windows, first_step, len(activity), dt)
        own = _outcomes(activity, cumulative, start, end, length, columns=windows.neuron)
        for index, values in enumerate(sets):
            np.add.at(self.covariate_own[index].reshape(-1), rows, values * own)

    def _add_products(self, a: np.ndarray, b: np.ndarray, stride: int) -> None:
        """Add the regression's sums over steps: a (steps, n_in) activity, b (steps, n_out) q,
        every ``stride``-th step of the segment's, so each counts ``stride`` times.

        The products are the phase's largest: single precision halves them, and about the
        segment's means they lose nothing that matters (relative error ~1e-6 of a variance, not of
        a raw second moment, which the means could exceed: a test adds 1000 standard deviations to
        the activity); the means go back in double. Rows a block at a time keep the temporaries
        small (:class:`Scratch`).
        """
        if len(a) == 0:
            return
        mean_a, mean_b = a.mean(0), b.mean(0)
        gram = self._work_array("gram32")
        gram.fill(0.0)
        cross = np.zeros((self.n_in, self.n_out), np.float32)
        for first in range(0, len(a), _PRODUCT_ROWS):
            rows = slice(first, first + _PRODUCT_ROWS)
            centred_a = np.subtract(a[rows], mean_a, dtype=np.float32)
            gram += centred_a.T @ centred_a
            cross += centred_a.T @ np.subtract(b[rows], mean_b, dtype=np.float32)
        n = stride * len(a)
        self.steps += n
        self.sum_a += n * mean_a
        self.sum_q += n * mean_b
        self.sum_aa += stride * gram
        for first in range(0, self.n_in, _PRODUCT_ROWS // 8):  # + n m m^T, without a temporary
            rows = slice(first, first + _PRODUCT_ROWS // 8)
            self.sum_aa[rows] += np.multiply.outer(n * mean_a[rows], mean_a)
        self.sum_aq += stride * cross + n * np.outer(mean_a, mean_b)

    def se_trusted(self) -> bool:
        """Whether the standard errors count: with ``ols_adjust`` only once the adjustment's
        regression has ``se_min_steps_per_neuron`` time steps per driven neuron (before, its
        in-sample fit hides noise and sigma^2 comes out too small; module docstring)."""
        if not self.params.ols_adjust:
            return True
        return bool(self.steps >= self.params.se_min_steps_per_neuron * self.n_in)

    def effects_of_driven(self) -> np.ndarray:
        """(n_in, n_out) least-squares coefficients of q_k on every driven neuron's activity.

        The prediction the adjustment subtracts; not an RDD estimate (it is confounded wherever the
        driven neurons share input), and only ever applied to neurons other than the one whose
        windows are being adjusted.
        """
        if "effects" not in self._cache:
            n = max(float(self.steps), 1.0)
            mean_a = self.sum_a / n
            cross = self.sum_aq - n * np.outer(mean_a, self.sum_q / n)

            def ridged_gram():  # into scratch memory: 20 MB for 1600 neurons
                gram = self._work_array("gram")
                np.multiply.outer(n * mean_a, mean_a, out=gram)
                np.subtract(self.sum_aa, gram, out=gram)
                # the ridge is worth adjust_ridge_steps steps of a neuron's mean activity
                # variance: it keeps the fit from chasing noise early on and fades as steps
                # accumulate; its floor keeps neurons that never fired at zero effect
                variance = max(np.trace(gram) / self.n_in, 1e-300)  # summed over steps
                gram[np.diag_indices_from(gram)] += (
                    self.params.adjust_ridge_steps / n + 1e-6
                ) * variance
                return gram

            try:  # positive definite: Cholesky
                factor = cho_factor(ridged_gram(), overwrite_a=True, check_finite=False)
                self._cache["effects"] = cho_solve(factor, cross, check_finite=False)
            except np.linalg.LinAlgError:  # rounding beyond a faded ridge: any symmetric solve
                self._cache["effects"] = np.linalg.solve(ridged_gram(), cross)
        return self._cache["effects"]

    def line_sums(self) -> tuple[np.ndarray, np.ndarray]:
        """The sums the free lines are fitted to: (sum w dR, sum w x dR) per (side, i, k), of the
        adjusted outcomes with ``ols_adjust`` (kept per (side, i) only without ``ols_pooled``; the
        pooled lines use :meth:`_pooled_sums`)."""
        if not self.params.ols_adjust:
            return self.sum_y, self.sum_xy
        if self.params.ols_pooled:
            raise ValueError("adjusted sums per (side, i, k) are kept only with ols_pooled=False")
        if "line_sums" not in self._cache:
            effects = self.effects_of_driven()
            own = np.arange(self.n_in)
            adjusted = []
            for sums, covariates in (
                (self.sum_y, self.covariate_y),
                (self.sum_xy, self.covariate_xy),
            ):
                # a neuron's own activity carries its treatment: take its share back out
                own_share = covariates[:, own, own][..., None] * effects[None]
                adjusted.append(sums - (covariates @ effects - own_share))
            self._cache["line_sums"] = (adjusted[0], adjusted[1])
        return self._cache["line_sums"]

    def lines(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Slopes and intercepts (side, i, k) of the free lines and which neurons have both sides
        estimated."""
        sum_y, sum_xy = self.line_sums()
        n, sx, sxx = (self.scalar[..., c][..., None] for c in range(3))
        det = n * sxx - sx * sx
        # a side with one distinct x (or one sample) gets a flat line through its mean
        degenerate = det <= 1e-12 * np.maximum(n * sxx, 1e-300)
        safe_det = np.where(degenerate, 1.0, det)
        slope = np.where(degenerate, 0.0, (n * sum_xy - sx * sum_y) / safe_det)
        intercept = np.where(n > 0, (sum_y - slope * sx) / np.where(n > 0, n, 1.0), 0.0)
        estimated = (self.scalar[0, :, 0] > 0) & (self.scalar[1, :, 0] > 0)
        return slope, intercept, estimated

    def beta(self) -> np.ndarray:
        """Jump at threshold per (i, k); zero for neurons lacking either kind of window."""
        theta = self.params.threshold
        if not self.params.ols_pooled:
            slope, intercept, estimated = self.lines()
            fitted = slope * theta + intercept
            return np.where(estimated[:, None], fitted[0] - fitted[1], 0.0)
        fit = self._pooled_fit()
        if fit is None:
            return np.zeros((self.n_in, self.n_out))
        spiked = fit.mean_y + fit.slope[None, :] * (theta - fit.mean_x)[:, None]
        control = fit.control_mean_y + fit.control_slope * (theta - fit.control_mean_x)
        return np.where(fit.has[:, None], spiked - control[None, :], 0.0)

    def standard_errors(self, trusted_only: bool = True) -> np.ndarray:
        """(n_in, n_out) standard error of :meth:`beta`: sqrt(sum_s sigma_sk^2 V_s(theta)).

        ``inf`` where beta is not estimated or no segment has given sigma^2 yet, and everywhere
        until :meth:`se_trusted` unless ``trusted_only`` is false (then they are too small early
        on, but still rank layers: the adaptive schedule uses them so).
        """
        theta = self.params.threshold
        if self.params.ols_pooled:
            fit = self._pooled_fit()
            if fit is None:
                return np.full((self.n_in, self.n_out), np.inf)
            factor_spiked = fit.variance_factor(0, np.arange(self.n_in), theta)
            factor_control = fit.variance_factor(1, np.zeros(1, np.int64), theta)
            has = fit.has
        else:
            groups = self._free_groups()
            neurons = np.arange(self.n_in)
            factor_spiked = groups[0].variance_factor(neurons, theta)
            factor_control = groups[1].variance_factor(neurons, theta)
            has = (self.scalar[0, :, 0] > 0) & (self.scalar[1, :, 0] > 0)
        variance = (
            factor_spiked[:, None] * self.residual_var[0][None, :]
            + factor_control[:, None] * self.residual_var[1][None, :]
        )
        usable = has[:, None] & np.isfinite(variance) & (variance > 0)
        if trusted_only and not self.se_trusted():
            usable[:] = False  # the adjustment still overfits: sigma^2 is too small to trust
        return np.where(usable, np.sqrt(np.where(usable, variance, 1.0)), np.inf)

    # -- the fitted lines as groups of windows ----------------------------------------------------
    def _pooled_fit(self) -> _PooledFit | None:
        """The pooled lines (cached): per-neuron spiked means with one within slope per k, and
        one control line per k; None before any almost-spiked window."""
        if "pooled" in self._cache:
            return self._cache["pooled"]
        n, sx, sxx = (self.scalar[..., c] for c in range(3))
        fit = None
        if n[1].sum() > 0:
            spiked_y, spiked_xy, control_y, control_xy = self._pooled_sums()
            control = _Group.of(self.scalar[1].sum(0)[None], self.scalar_sq[1].sum(0)[None])
            control_mean_y = control_y / control.n[0]
            control_slope = (
                (control_xy - control.sx[0] * control_mean_y) / control.slope_xx
                if control.slope_xx > 0
                else np.zeros(self.n_out)
            )
            spiked = _Group.of(self.scalar[0], self.scalar_sq[0])
            mean_y = spiked_y / spiked.n[:, None]
            # a neuron without spiked windows has zero sums: the total over all is that over has
            within_xy = spiked_xy - (sx[0][:, None] * mean_y)[spiked.has].sum(0)
            slope = within_xy / spiked.slope_xx if spiked.slope_xx > 0 else 0.0 * within_xy
            fit = _PooledFit(
                has=spiked.has,
                mean_x=spiked.mean_x,
                mean_y=mean_y,
                slope=slope,
                control_mean_x=control.mean_x[0],
                control_mean_y=control_mean_y,
                control_slope=control_slope,
                groups=(spiked, control),
            )
        self._cache["pooled"] = fit
        return fit

    def _pooled_sums(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """What the pooled lines take of :meth:`line_sums`: sum w dR per (i, k) of the spiked
        side, and per k the totals over neurons of sum w x dR (spiked side), sum w dR and sum w x dR
        (control side). A total over i of the adjustment is one row of covariate sums times the
        effects, so only the first needs the full (n_in x n_in) by (n_in x n_out) product."""
        if not self.params.ols_adjust:
            return self.sum_y[0], self.sum_xy[0].sum(0), self.sum_y[1].sum(0), self.sum_xy[1].sum(0)
        effects = self.effects_of_driven()
        total, own = self.covariate_total, self.covariate_own  # [sum w, sum w x] x side

        def adjusted_total(sums, index, side):  # sum over i of sums - (dA @ effects - own share)
            return sums.sum(0) - (total[index, side] - own[index, side]) @ effects

        return (
            self.sum_y[0] - (self.covariate_spiked @ effects - own[0, 0][:, None] * effects),
            adjusted_total(self.sum_xy[0], 1, 0),
            adjusted_total(self.sum_y[1], 0, 1),
            adjusted_total(self.sum_xy[1], 1, 1),
        )

    def _free_groups(self) -> tuple[_Group, _Group]:
        """Two free lines per (i, k): every (side, neuron) is its own group with its own slope."""
        return tuple(
            _Group.of(self.scalar[s], self.scalar_sq[s], pooled_slope=False) for s in (0, 1)
        )

    def _fitted_and_factor(
        self, neuron: np.ndarray, x: np.ndarray, side: np.ndarray, weight: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Fitted outcome (windows, N_k) of windows in the fit, and E[residual^2] / sigma^2."""
        fitted = np.empty((len(x), self.n_out))
        factor = np.empty(len(x))
        if self.params.ols_pooled:
            fit = self._pooled_fit()
            for s in (0, 1):
                rows = side == s
                index = neuron[rows] if s == 0 else np.zeros(rows.sum(), np.int64)
                if s == 0:
                    fitted[rows] = (
                        fit.mean_y[index]
                        + fit.slope[None, :] * (x[rows] - fit.mean_x[index])[:, None]
                    )
                else:
                    fitted[rows] = (
                        fit.control_mean_y
                        + fit.control_slope * (x[rows] - fit.control_mean_x)[:, None]
                    )
                factor[rows] = fit.groups[s].residual_factor(index, x[rows], weight[rows])
            return fitted, factor
        slope, intercept, _ = self.lines()
        groups = self._free_groups()
        for s in (0, 1):
            rows = side == s
            index = neuron[rows]
            fitted[rows] = slope[s, index] * x[rows][:, None] + intercept[s, index]
            factor[rows] = groups[s].residual_factor(index, x[rows], weight[rows])
        return fitted, factor

    def _update_residual_var(self, windows, weight, side, q, first_step, dt, cumulatives) -> None:
        """sigma^2 per (side, k) from this segment's windows about the current lines:
        sum e_w^2 / sum (1 - 2 H_ww + (H H^T)_ww), unbiased for any fixed window weights. An even
        subsample of ``_RESIDUAL_WINDOWS`` windows is plenty (a few % on sigma^2). ``cumulatives``:
        the cumulative sum of q over steps, the activity and its cumulative sum, from :meth:`add`.
        """
        cumulative_q, activity, cumulative_a = cumulatives
        use = np.flatnonzero(weight > 0)
        if len(use) == 0 or (self.params.ols_pooled and self._pooled_fit() is None):
            return  # no windows, or no control line yet
        sample = np.linspace(0, len(use) - 1, min(len(use), _RESIDUAL_WINDOWS)).astype(int)
        use = use[np.unique(sample)]
        start, end, length = window_steps(windows, first_step, q.shape[0], dt)
        start, end, length, neuron = start[use], end[use], length[use], windows.neuron[use]
        outcome = _outcomes(q, cumulative_q, start, end, length)
        if self.params.ols_adjust:
            # the adjusted outcome dR'_w = dR_w - sum_{j != i} dA_wj gamma_jk (module docstring),
            # a block of windows at a time (dA of all of them would be 50 MB); the product in
            # single precision, as sigma^2 is a mean of squares known to a few % anyway
            effects = self.effects_of_driven()
            effects32 = effects.astype(np.float32)
            for first in range(0, len(use), _RESIDUAL_BLOCK):
                block = slice(first, first + _RESIDUAL_BLOCK)
                covariates = _outcomes(
                    activity, cumulative_a, start[block], end[block], length[block]
                )
                own = covariates[np.arange(len(covariates)), neuron[block]]
                outcome[block] -= covariates.astype(np.float32) @ effects32
                outcome[block] += own[:, None] * effects[neuron[block]]
        fitted, factor = self._fitted_and_factor(neuron, windows.u_max[use], side[use], weight[use])
        sides = np.eye(2)[side[use]].T  # (2, windows): sums per side as one product
        squares, factors = sides @ (outcome - fitted) ** 2, sides @ factor
        for s in (0, 1):
            if factors[s] > _MIN_RESIDUAL_DOF:
                self.residual_var[s] = squares[s] / factors[s]

    _STATE = ("scalar", "scalar_sq", "sum_y", "sum_xy", "residual_var")
    _ADJUST_STATE = ("steps", "sum_a", "sum_q", "sum_aa", "sum_aq")
    _POOLED_COVARIATES = ("covariate_spiked", "covariate_total", "covariate_own")
    _FREE_COVARIATES = ("covariate_y", "covariate_xy")

    def _state_names(self) -> tuple[str, ...]:
        if not self.params.ols_adjust:
            return self._STATE
        covariates = self._POOLED_COVARIATES if self.params.ols_pooled else self._FREE_COVARIATES
        return self._STATE + self._ADJUST_STATE + covariates

    def state_dict(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self._state_names()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        names = self._state_names()
        state = dict(state)
        if self.params.ols_pooled and "covariate_y" in state and "covariate_spiked" not in state:
            # saved before the pooled lines kept only what they use: derive it (set, side, i, j)
            full = np.stack([state.pop("covariate_y"), state.pop("covariate_xy")])
            state["covariate_spiked"] = full[0, 0]
            state["covariate_total"] = full.sum(2)
            state["covariate_own"] = np.diagonal(full, axis1=2, axis2=3)
        # states saved before the standard errors existed: unweighted sums of w^2 equal those of
        # w (0/1 weights), and sigma^2 is unknown until the next segment
        if "scalar_sq" not in state and self.params.ols_bandwidth is None:
            state["scalar_sq"] = state["scalar"]
        state.setdefault("residual_var", np.full((2, self.n_out), np.nan))
        for name in names:
            setattr(self, name, np.array(state[name], dtype=np.float64))
        self._cache.clear()


#: Neurons filtered at a time by :func:`filtered_spikes`, steps multiplied at a time by the
#: adjustment's regression, windows whose residuals are formed at a time: their temporaries stay
#: a few MB however long the segment.
_FILTER_BLOCK = 64
_PRODUCT_ROWS = 1024
_RESIDUAL_BLOCK = 512
#: Windows whose residuals estimate sigma^2 after each segment (an even subsample of the kept).
_RESIDUAL_WINDOWS = 4096
#: sigma^2 is re-estimated only from a segment with more residual degrees of freedom than this.
_MIN_RESIDUAL_DOF = 10.0


def _outcomes(q, cumulative, start, end, length, columns=None) -> np.ndarray:
    """dR of windows (start, end, length in steps) from q and its cumulative sum over steps: all
    columns, or one column per window."""
    if columns is None:
        return (cumulative[end] - cumulative[start]) / length[:, None] - q[start]
    return (cumulative[end, columns] - cumulative[start, columns]) / length - q[start, columns]


@dataclass
class _Group:
    """Windows fitted together: per member (neuron) n, sum w x, the w^2 sums and, for the slope,
    the centred sum of squares and D2 = sum w^2 (x - mean x)^2 over the windows it is fitted to.
    With ``pooled_slope`` the members share one slope (within-member), else each has its own."""

    n: np.ndarray
    sx: np.ndarray
    mean_x: np.ndarray
    has: np.ndarray
    squares: np.ndarray  # (members, 3): sum w^2, sum w^2 x, sum w^2 x^2
    slope_xx: np.ndarray | float  # centred sum w (x - mean x)^2: shared, or per member
    slope_d2: np.ndarray | float  # sum w^2 (x - mean x)^2: shared, or per member

    @classmethod
    def of(cls, scalar: np.ndarray, squares: np.ndarray, pooled_slope: bool = True) -> _Group:
        n, sx, sxx = scalar[:, 0], scalar[:, 1], scalar[:, 2]
        has = n > 0
        mean_x = sx / np.where(has, n, 1.0)
        centred = np.where(has, sxx - sx * mean_x, 0.0)
        w2, w2x, w2xx = squares[:, 0], squares[:, 1], squares[:, 2]
        d2 = np.where(has, w2xx - 2 * mean_x * w2x + mean_x**2 * w2, 0.0)
        # as in the lines, a degenerate slope is fixed at zero (and then has no variance)
        if pooled_slope:
            slope_xx = centred.sum() if centred.sum() > 1e-12 * max(sxx.sum(), 1e-300) else 0.0
            slope_d2 = d2.sum()
        else:
            flat = centred <= 1e-12 * np.maximum(sxx, 1e-300)
            slope_xx, slope_d2 = np.where(flat, 0.0, centred), d2
        return cls(np.where(has, n, 1.0), sx, mean_x, has, squares, slope_xx, slope_d2)

    def _slope_terms(self, index):
        xx = self.slope_xx if np.ndim(self.slope_xx) == 0 else self.slope_xx[index]
        d2 = self.slope_d2 if np.ndim(self.slope_d2) == 0 else self.slope_d2[index]
        inverse = np.divide(1.0, xx, out=np.zeros_like(np.asarray(xx, float)), where=xx > 0)
        return inverse, d2

    def variance_factor(self, index: np.ndarray, t) -> np.ndarray:
        """V(t) = sum_v c_v(t)^2 for the fitted value at t of each member in ``index``."""
        n, mean_x = self.n[index], self.mean_x[index]
        w2, w2x = self.squares[index, 0], self.squares[index, 1]
        inverse, d2 = self._slope_terms(index)
        offset = t - mean_x
        return (
            w2 / n**2 + 2 * offset * (w2x - mean_x * w2) * inverse / n + offset**2 * d2 * inverse**2
        )

    def residual_factor(self, index: np.ndarray, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """E[e_w^2] / sigma^2 = 1 - 2 H_ww + (H H^T)_ww for windows of the fit."""
        inverse, _ = self._slope_terms(index)
        offset = x - self.mean_x[index]
        leverage = weight * (1.0 / self.n[index] + offset**2 * inverse)
        return 1.0 - 2.0 * leverage + self.variance_factor(index, x)


@dataclass
class _PooledFit:
    """The pooled lines: spiked side per neuron ``mean_y + slope (x - mean_x)``, control side
    ``control_mean_y + control_slope (x - control_mean_x)``."""

    has: np.ndarray
    mean_x: np.ndarray
    mean_y: np.ndarray
    slope: np.ndarray
    control_mean_x: float
    control_mean_y: np.ndarray
    control_slope: np.ndarray
    groups: tuple[_Group, _Group]

    def variance_factor(self, side: int, index: np.ndarray, t) -> np.ndarray:
        return self.groups[side].variance_factor(index, t)


class LMSEstimator:
    """The reference's online least-mean-squares fit, window after window in time order.

    ``coef[side, i, k, :]`` holds (m, c) of side 0 (spiked) and 1 (almost spiked); beta is updated
    for a neuron whenever one of its windows ends, as in the reference, and kept otherwise.
    """

    def __init__(self, n_in: int, n_out: int, params: RDDParams) -> None:
        self.params = params
        self.n_in, self.n_out = n_in, n_out
        self.slope = np.zeros((2, n_in, n_out))
        self.intercept = np.zeros((2, n_in, n_out))
        self._beta = np.zeros((n_in, n_out))

    def add(
        self,
        windows: Windows,
        q: np.ndarray,
        first_step: int,
        dt: float,
        activity: np.ndarray | None = None,
        since_step: int | None = None,
        early_se: bool = False,
    ) -> None:
        """Fit the windows of one segment in time order (``activity`` and ``early_se`` are not
        used: LMS has no standard errors)."""
        kept, spiked = classify(windows, self.params)
        order = np.lexsort((windows.end, windows.neuron))
        order = order[kept[order]]
        if len(order) == 0:
            return
        neuron = windows.neuron[order]
        outcomes = window_outcomes(windows, q, first_step, dt)[order]
        x = windows.u_max[order]
        side = np.where(spiked[order], 0, 1)
        # rank of each window among its neuron's windows: LMS is sequential per neuron only,
        # so the r-th windows of all neurons are one vectorised step
        first = np.r_[0, np.flatnonzero(np.diff(neuron)) + 1]
        counts = np.diff(np.r_[first, len(neuron)])
        rank = np.arange(len(neuron)) - np.repeat(first, counts)
        rate, theta = self.params.lms_rate, self.params.threshold
        for r in range(int(rank.max()) + 1):
            pick = np.flatnonzero(rank == r)
            i, s, xr = neuron[pick], side[pick], x[pick][:, None]
            slope, intercept = self.slope[s, i], self.intercept[s, i]
            err = slope * xr + intercept - outcomes[pick]
            self.slope[s, i] = slope - rate * err * xr
            self.intercept[s, i] = intercept - rate * err
            self._beta[i] = (self.slope[0, i] * theta + self.intercept[0, i]) - (
                self.slope[1, i] * theta + self.intercept[1, i]
            )

    def beta(self) -> np.ndarray:
        return self._beta.copy()

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"slope": self.slope, "intercept": self.intercept, "beta": self._beta}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.slope = np.array(state["slope"], dtype=np.float64)
        self.intercept = np.array(state["intercept"], dtype=np.float64)
        self._beta = np.array(state["beta"], dtype=np.float64)


def make_estimator(name: str, n_in: int, n_out: int, params: RDDParams):
    """The estimator called ``name`` ("lms" or "ols") for an (n_in -> n_out) weight matrix."""
    if name == "lms":
        return LMSEstimator(n_in, n_out, params)
    if name == "ols":
        return OLSEstimator(n_in, n_out, params)
    raise ValueError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")


def predicted_sign_agreement(beta: np.ndarray, se: np.ndarray, max_fit: int = 50_000) -> float:
    """Predicted % of jumps whose estimated sign is the true one, from beta and its SEs alone.

    Empirical Bayes (module docstring): the true jumps b of the layer are drawn from a symmetric
    unimodal prior g = sum_m pi_m U(-a_m, a_m) (a_0 = 0 a point mass), beta_hat | b ~ N(b, se^2);
    the weights pi are the maximum-likelihood fit and the prediction is the mean of
    P(sign b = sign beta_hat | beta_hat), both over at most ``max_fit`` entries (an even stride,
    so the result is deterministic). Entries with an infinite SE (not estimated) count 1/2.
    """
    beta, se = np.ravel(beta), np.ravel(se)
    known = np.isfinite(se) & (se > 0)
    if not known.any():
        return 50.0
    b, s = beta[known], se[known]
    sample = np.unique(np.linspace(0, len(b) - 1, min(len(b), max_fit)).astype(np.int64))
    b, s = b[sample], s[sample]
    grid = _prior_grid(b, s)
    from scipy.special import ndtr

    at_zero = ndtr(b / s)  # the same for every component
    densities, right_sign = zip(*(_component(b, s, a, at_zero) for a in grid), strict=True)
    densities, right_sign = np.array(densities), np.array(right_sign)
    # one BLAS thread: the products are small, and the phase runs this while the next segment's
    # simulation holds a core (a BLAS team spinning against it took seconds instead of 0.1 s)
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency

    with threadpool_limits(limits=1, user_api="blas"):
        weights = _mixture_weights(densities / np.maximum(densities.max(0), 1e-300))
    posterior = weights[:, None] * densities
    right = (posterior * right_sign).sum(0) / np.maximum(posterior.sum(0), 1e-300)
    return 100.0 * (right.mean() * known.sum() + 0.5 * (~known).sum()) / len(beta)


def _mixture_weights(likelihood: np.ndarray, tol: float = 1e-10) -> np.ndarray:
    """Maximum-likelihood mixture weights pi (on the simplex) of components x samples densities:
    maximise mean log(sum_m pi_m L_mn). EM converges slowly here; instead minimise the convex
    ``f(x) = -mean log(L x) + sum x`` over x >= 0, whose minimum has sum x = 1 and is the MLE (the
    KKT conditions of the two problems coincide), by sequential quadratic programming (mix-SQP,
    Kim et al. 2020): with ``r_mn = L_mn / (L x)_n``, gradient ``g = 1 - mean_n r_n`` and Hessian
    ``H = mean_n r_n r_n^T``, each step solves ``min_y g^T (y - x) + (y - x)^T H (y - x) / 2``
    over y >= 0 (a non-negative least squares problem in the Cholesky factor of H) and backtracks
    along y - x. It stops once g >= -tol and x^T g <= tol (then f is within tol of its minimum)
    or the step promises less than 1e-14 decrease (rounding), in about 10 steps where L-BFGS-B
    took hundreds of evaluations."""
    from scipy.optimize import nnls

    n_components, n_samples = likelihood.shape
    # The likelihood's columns have maximum 1. A step can zero the only component under which a
    # far-out sample is likely; the floor keeps its ratio (and H) finite instead of 1e300.
    floor = 1e-12

    def objective(x):
        return -np.mean(np.log(np.maximum(x @ likelihood, floor))) + x.sum()

    x = np.full(n_components, 1.0 / n_components)
    value = objective(x)
    for _ in range(200):
        ratio = likelihood / np.maximum(x @ likelihood, floor)
        gradient = 1.0 - ratio.mean(1)
        # with g >= 0, f(x) - min f <= x^T g (convexity): stop at a duality gap below tol
        if gradient.min() >= -tol and x @ gradient <= tol:
            break
        hessian = ratio @ ratio.T / n_samples
        # components of (nearly) equal shape make H singular: a tiny ridge keeps it factorisable
        ridge = 1e-10 * max(np.trace(hessian) / n_components, 1e-300)
        upper = np.linalg.cholesky(hessian + ridge * np.eye(n_components)).T  # H = U^T U
        # 1/2 y^T H y + (g - H x)^T y = 1/2 |U y - d|^2 + const with U^T d = H x - g
        target = np.linalg.solve(upper.T, hessian @ x - gradient)
        direction = nnls(upper, target)[0] - x
        decrease, step = gradient @ direction, 1.0
        if decrease > -1e-14:  # the model promises no decrease beyond rounding: converged
            break
        while step > 1e-12:  # backtracking (Armijo) line search
            candidate = objective(x + step * direction)
            if candidate <= value + 1e-4 * step * decrease:
                break
            step /= 2
        else:
            break  # no decrease left at floating-point precision
        x, value = np.maximum(x + step * direction, 0.0), candidate
    return x / max(x.sum(), 1e-300)


def _prior_grid(b: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Half-widths a_m of the prior's uniform components: 0, then a factor sqrt(2) apart from
    min(se) / 10 to twice the largest plausible |b| (as in adaptive shrinkage, Stephens 2017)."""
    low = max(float(s.min()) / 10, 1e-300)
    high = 2 * np.sqrt(max(float(np.max(b**2 - s**2)), low**2 * 4))
    count = max(int(np.ceil(np.log(high / low) / np.log(np.sqrt(2)))), 1)
    return np.r_[0.0, low * np.sqrt(2) ** np.arange(count + 1)]


def _component(
    b: np.ndarray, s: np.ndarray, a: float, at_zero: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Density of beta_hat under the prior component U(-a, a) (a = 0: point mass at 0) and the
    probability that the true b has beta_hat's sign under it (``at_zero``: Phi(beta_hat / se))."""
    from scipy.special import ndtr

    if a == 0:
        return np.exp(-0.5 * (b / s) ** 2) / (np.sqrt(2 * np.pi) * s), np.full(len(b), 0.5)
    upper, lower = ndtr((b + a) / s), ndtr((b - a) / s)
    mass = upper - lower
    positive = (at_zero - lower) / np.maximum(mass, 1e-300)  # P(b > 0 | beta_hat)
    right = np.where(mass > 0, np.where(b >= 0, positive, 1 - positive), 0.5)
    return mass / (2 * a), right
