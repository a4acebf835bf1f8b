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
  connections, independent noise). A least-squares regression of q_k on the activity
  ``a_j = kappa * kappa * s_j`` of every driven neuron, over every time step, predicts their part of
  each window's outcome, which is subtracted before the lines are fitted::

      dR'_ik = dR_ik - sum_{j != i} gamma_jk dA_j      dA_j: the outcome of a_j over the window

  i's own activity is never subtracted: it carries the treatment. Covariates the treatment cannot
  move are balanced at threshold, so the jump stays unbiased whatever gamma is; a good gamma only
  removes variance. On 1600-384-192-10 this raises sign agreement after one 90 s phase from about
  63 / 75 / 81 % to 68 / 83 / 88 % (``benchmarks/rdd_phase.py``). All of it is sufficient
  statistics: per (side, i) the window sums of dA_j, and the regression's sums over steps.

The outcome sums never touch an (N_i x N_k) array per time step: ``sum_n q_k(n)`` over a window is a
difference of the running cumulative sum of ``q_k``, and the per-neuron sums over windows are one
sparse (neurons x time steps) by dense (time steps x N_k) product.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
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
) -> np.ndarray:
    """q(n) = sum_{m<n} kappa(n - m) s(m) for steps first_step .. first_step + n_steps - 1.

    ``times=2`` filters twice (kappa * kappa * s): the activity of the driven layer that the
    adjusted OLS uses as covariates, each neuron's drive to the layer above filtered once more as
    that layer's spikes are into q. Spikes before ``first_step`` are ignored, so start the range
    early enough (a few tau_L) for the windows that need it. Returns float64 (n_steps, n_neurons).
    """
    steps = np.rint(np.asarray(spike_times) / dt).astype(np.int64) - first_step
    keep = (steps >= 0) & (steps < n_steps)
    flat = steps[keep] * n_neurons + np.asarray(spike_indices)[keep]
    counts = np.bincount(flat, minlength=n_steps * n_neurons).reshape(n_steps, n_neurons)
    # kappa as a recursive filter: sum_{n>=1} kappa(n) z^-n
    #   = z^-1 (d_L - d_s) / kernel_norm / ((1 - d_L z^-1)(1 - d_s z^-1)),  d = exp(-dt / tau)
    decay_L, decay_s = np.exp(-dt / tau_L), np.exp(-dt / tau_s)
    numerator = np.array([0.0, (decay_L - decay_s) / ((tau_L - tau_s) / dt)])
    denominator = np.array([1.0, -(decay_L + decay_s), decay_L * decay_s])
    b, a = numerator, denominator
    for _ in range(times - 1):
        b, a = np.convolve(b, numerator), np.convolve(a, denominator)
    return lfilter(b, a, counts, axis=0)


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
) -> np.ndarray:
    """sum over windows w with rows[w] == r of weights[s, w] * dR_w, for every set s and row r.

    ``weights`` is (n_sets, n_windows); the result is (n_sets, n_rows, N_k). dR_w =
    (C(end) - C(start)) / length - q(start), with C the cumulative sum of q over steps, computed
    once for all sets.
    """
    weights = np.atleast_2d(weights)
    n_sets, n_steps = len(weights), q.shape[0]
    start, end, length = window_steps(windows, first_step, n_steps, dt)
    cumulative = np.cumsum(q, axis=0)  # C(n) = q(0) + ... + q(n), so q(n) = C(n) - C(n - 1)
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
    cumulative = np.cumsum(q, axis=0)
    return (cumulative[end] - cumulative[start]) / length[:, None] - q[start]


def classify(windows: Windows, params: RDDParams) -> tuple[np.ndarray, np.ndarray]:
    """(kept, spiked): which windows enter the fit, and which of those are "spiked"."""
    kept = np.abs(windows.u_max - params.threshold) <= params.u_band
    return kept, windows.spikes > 0


class OLSEstimator:
    """Exact (optionally kernel-weighted) least squares of both lines, from sufficient statistics.

    Per neuron i and side (spiked / almost spiked) it accumulates sum w, sum w x, sum w x^2 and per
    (i, k) sum w dR, sum w x dR. Statistics persist across :meth:`add` calls (segments of a phase)
    and, when the caller keeps the estimator, across phases. With ``ols_adjust`` it also keeps the
    regression of the layer above on the driven layer and, per (side, i), the window sums of every
    driven neuron's activity; for 1600 -> 384 that is about 100 MB.
    """

    def __init__(self, n_in: int, n_out: int, params: RDDParams) -> None:
        self.params = params
        self.n_in, self.n_out = n_in, n_out
        self.scalar = np.zeros((2, n_in, 3))  # side, neuron, [sum w, sum w x, sum w x^2]
        self.sum_y = np.zeros((2, n_in, n_out))
        self.sum_xy = np.zeros((2, n_in, n_out))
        if params.ols_adjust:
            # window sums of the covariates: like sum_y and sum_xy with a_j in place of dR_k
            self.covariate_y = np.zeros((2, n_in, n_in))
            self.covariate_xy = np.zeros((2, n_in, n_in))
            # regression of q (layer above) on a (driven layer) over time steps: sums
            self.steps = np.zeros(())
            self.sum_a, self.sum_q = np.zeros(n_in), np.zeros(n_out)
            self.sum_aa, self.sum_aq = np.zeros((n_in, n_in)), np.zeros((n_in, n_out))

    def add(
        self,
        windows: Windows,
        q: np.ndarray,
        first_step: int,
        dt: float,
        activity: np.ndarray | None = None,
        since_step: int | None = None,
    ) -> None:
        """Add the windows of one segment.

        ``q`` is the filtered activity of the layer above from ``first_step`` on. With
        ``ols_adjust``, ``activity`` is ``kappa * kappa * s_j`` of the driven layer over the same
        steps (:func:`filtered_spikes` with ``times=2``); steps before ``since_step`` (history
        shared with the previous segment) enter window outcomes but not the regression.
        """
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
        sums = outcome_sums(windows, [weight, weight * x], rows, 2 * self.n_in, q, first_step, dt)
        self.sum_y += sums[0].reshape(2, self.n_in, self.n_out)
        self.sum_xy += sums[1].reshape(2, self.n_in, self.n_out)
        if not self.params.ols_adjust:
            return
        if activity is None or activity.shape != (q.shape[0], self.n_in):
            raise ValueError(
                "ols_adjust needs the driven layer's activity over the steps of q, shape "
                f"({q.shape[0]}, {self.n_in}); pass activity= or set ols_adjust=False"
            )
        covariates = outcome_sums(
            windows, [weight, weight * x], rows, 2 * self.n_in, activity, first_step, dt
        )
        self.covariate_y += covariates[0].reshape(2, self.n_in, self.n_in)
        self.covariate_xy += covariates[1].reshape(2, self.n_in, self.n_in)
        new = slice(
            max((since_step if since_step is not None else first_step) - first_step, 0), None
        )
        a, b = activity[new], q[new]
        self.steps += len(a)
        self.sum_a += a.sum(0)
        self.sum_q += b.sum(0)
        self.sum_aa += a.T @ a
        self.sum_aq += a.T @ b

    def effects_of_driven(self) -> np.ndarray:
        """(n_in, n_out) least-squares coefficients of q_k on every driven neuron's activity.

        The prediction the adjustment subtracts; not an RDD estimate (it is confounded wherever the
        driven neurons share input), and only ever applied to neurons other than the one whose
        windows are being adjusted.
        """
        n = max(float(self.steps), 1.0)
        mean_a = self.sum_a / n
        gram = self.sum_aa - n * np.outer(mean_a, mean_a)
        cross = self.sum_aq - n * np.outer(mean_a, self.sum_q / n)
        # a tiny ridge keeps neurons that never fired (zero rows) at zero effect
        ridge = 1e-6 * max(np.trace(gram) / self.n_in, 1e-300)
        return np.linalg.solve(gram + ridge * np.eye(self.n_in), cross)

    def line_sums(self) -> tuple[np.ndarray, np.ndarray]:
        """The sums the lines are fitted to: (sum w dR, sum w x dR) per (side, i, k), of the
        adjusted outcomes with ``ols_adjust``."""
        if not self.params.ols_adjust:
            return self.sum_y, self.sum_xy
        effects = self.effects_of_driven()
        own = np.arange(self.n_in)
        adjusted = []
        for sums, covariates in ((self.sum_y, self.covariate_y), (self.sum_xy, self.covariate_xy)):
            # a neuron's own activity carries its treatment: take its share back out
            own_share = covariates[:, own, own][..., None] * effects[None]
            adjusted.append(sums - (covariates @ effects - own_share))
        return adjusted[0], adjusted[1]

    def lines(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Slopes and intercepts (side, i, k) and which neurons have both sides estimated."""
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
        if self.params.ols_pooled:
            return self._pooled_beta()
        slope, intercept, estimated = self.lines()
        theta = self.params.threshold
        fitted = slope * theta + intercept
        return np.where(estimated[:, None], fitted[0] - fitted[1], 0.0)

    def _pooled_beta(self) -> np.ndarray:
        theta = self.params.threshold
        n, sx, sxx = (self.scalar[..., c] for c in range(3))
        # control line of k over the almost-spiked windows of every neuron
        n0, sx0, sxx0 = n[1].sum(), sx[1].sum(), sxx[1].sum()
        if n0 <= 0:
            return np.zeros((self.n_in, self.n_out))
        sum_y, sum_xy = self.line_sums()
        sy0, sxy0 = sum_y[1].sum(0), sum_xy[1].sum(0)
        det0 = n0 * sxx0 - sx0 * sx0
        slope0 = (n0 * sxy0 - sx0 * sy0) / det0 if det0 > 1e-12 * n0 * sxx0 else 0.0 * sy0
        control = (sy0 - slope0 * sx0) / n0 + slope0 * theta
        # spiked side: per-neuron means, one within-neuron slope per k
        has = n[0] > 0
        n1 = np.where(has, n[0], 1.0)
        mean_x = sx[0] / n1
        mean_y = sum_y[0] / n1[:, None]
        within_xx = (sxx[0] - sx[0] * mean_x)[has].sum()
        within_xy = (sum_xy[0] - sx[0][:, None] * mean_y)[has].sum(0)
        slope1 = within_xy / within_xx if within_xx > 1e-12 else 0.0 * within_xy
        spiked = mean_y + slope1[None, :] * (theta - mean_x)[:, None]
        return np.where(has[:, None], spiked - control[None, :], 0.0)

    _STATE = ("scalar", "sum_y", "sum_xy")
    _ADJUST_STATE = ("covariate_y", "covariate_xy", "steps", "sum_a", "sum_q", "sum_aa", "sum_aq")

    def state_dict(self) -> dict[str, np.ndarray]:
        names = self._STATE + (self._ADJUST_STATE if self.params.ols_adjust else ())
        return {name: getattr(self, name) for name in names}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        names = self._STATE + (self._ADJUST_STATE if self.params.ols_adjust else ())
        for name in names:
            setattr(self, name, np.array(state[name], dtype=np.float64))


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
    ) -> None:
        """Fit the windows of one segment in time order (``activity`` is not used)."""
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
