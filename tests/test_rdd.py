"""RDD estimators on synthetic windows with a known discontinuity (METHOD 4)."""

import numpy as np
import pytest

from spikealign import rdd
from spikealign.lif import LIFParams
from spikealign.rdd import (
    LMSEstimator,
    OLSEstimator,
    RDDParams,
    Scratch,
    Windows,
    cumulative_sum,
    filtered_spikes,
    outcome_sums,
    predicted_sign_agreement,
    window_outcomes,
)

DT = 1e-3
LENGTH = 30
PLAIN = RDDParams(ols_adjust=False)  # synthetic windows without a driven layer to adjust for
FIELDS = ("neuron", "start", "end", "u_max", "spikes")


def synthetic(n_in, n_out, per_neuron, beta, slope_up, slope_down, noise, seed=0):
    """Windows whose outcome is exactly a line with a jump of ``beta`` at threshold 1.

    Each window gets its own stretch of time steps: q is 0 at the opening step and equal to the
    wanted outcome on the 30 steps after it, so dR is exactly that outcome.
    """
    rng = np.random.default_rng(seed)
    n_windows = n_in * per_neuron
    neuron = np.repeat(np.arange(n_in), per_neuron)
    rng.shuffle(neuron)
    x = rng.uniform(0.9, 1.3, n_windows)
    spiked = x >= 1.0
    intercept = rng.normal(size=n_out)
    outcome = intercept + np.where(
        spiked[:, None],
        beta[neuron] + slope_up * (x[:, None] - 1.0),
        slope_down * (x[:, None] - 1.0),
    )
    outcome += noise * rng.normal(size=outcome.shape)
    stride = LENGTH + 5
    start_step = 10 + stride * np.arange(n_windows)
    q = np.zeros((start_step[-1] + LENGTH + 10, n_out))
    for w in range(n_windows):
        q[start_step[w] + 1 : start_step[w] + LENGTH + 1] = outcome[w]
    windows = Windows(
        neuron=neuron.astype(np.int32),
        start=start_step * DT,
        end=(start_step + LENGTH) * DT,
        u_max=x,
        spikes=spiked.astype(np.int32),
    )
    return windows, q, outcome


def test_window_outcomes_match_definition():
    windows, q, outcome = synthetic(3, 4, 5, np.zeros((3, 4)), 0.0, 0.0, 0.3)
    assert np.allclose(window_outcomes(windows, q, 0, DT), outcome)
    # with a nonzero baseline the outcome is mean over (start, end] minus q(start)
    rng = np.random.default_rng(1)
    q2 = rng.normal(size=q.shape)
    direct = np.array(
        [
            q2[int(round(s / DT)) + 1 : int(round(e / DT)) + 1].mean(0) - q2[int(round(s / DT))]
            for s, e in zip(windows.start, windows.end, strict=True)
        ]
    )
    assert np.allclose(window_outcomes(windows, q2, 0, DT), direct)
    weights = rng.uniform(size=len(windows))
    sums = outcome_sums(windows, [weights, 2 * weights], windows.neuron, 3, q2, 0, DT)
    expected = np.zeros((3, 4))
    np.add.at(expected, windows.neuron, weights[:, None] * direct)
    assert sums.shape == (2, 3, 4)
    assert np.allclose(sums[0], expected)
    assert np.allclose(sums[1], 2 * expected)


def test_outcome_sums_from_a_given_cumulative_sum_are_identical():
    # OLSEstimator.add computes the cumulative sum once for the sums and the residuals
    windows, q, _ = synthetic(3, 4, 5, np.zeros((3, 4)), 0.0, 0.0, 0.3)
    q = np.random.default_rng(2).normal(size=q.shape)
    weights = np.random.default_rng(3).uniform(size=(2, len(windows)))
    own = outcome_sums(windows, weights, windows.neuron, 3, q, 0, DT)
    given = outcome_sums(windows, weights, windows.neuron, 3, q, 0, DT, np.cumsum(q, axis=0))
    assert np.array_equal(own, given)
    wrong = outcome_sums(windows, weights, windows.neuron, 3, q, 0, DT, np.cumsum(2 * q, axis=0))
    assert not np.allclose(own, wrong)  # the given cumulative sum is the one used


def test_filtered_spikes_is_the_kernel_convolution():
    p = LIFParams()
    times = np.array([0.005, 0.012, 0.013, 0.030])
    indices = np.array([0, 1, 0, 1])
    q = filtered_spikes(times, indices, 2, 0, 60, DT, p.tau_L, p.tau_s)
    kappa = p.kernel(60)
    expected = np.zeros((60, 2))
    for t, i in zip(times, indices, strict=True):
        m = int(round(t / DT))
        expected[m + 1 :, i] += kappa[: 60 - m - 1]  # a spike at m counts from m + 1 on
    assert np.allclose(q, expected)


@pytest.mark.parametrize("pooled", [True, False])
@pytest.mark.parametrize("bandwidth", [None, 0.5])
def test_ols_recovers_known_jump_exactly_without_noise(bandwidth, pooled):
    beta = np.array([[0.5, -1.0, 2.0], [-0.3, 0.0, 1.5]])
    # slopes are per k (shared over neurons), as the pooled estimator assumes
    windows, q, _ = synthetic(2, 3, 40, beta, slope_up=0.7, slope_down=-0.4, noise=0.0)
    estimator = OLSEstimator(
        2, 3, RDDParams(ols_bandwidth=bandwidth, ols_pooled=pooled, ols_adjust=False)
    )
    # statistics accumulate over several calls (segments) exactly as over one
    half = len(windows) // 2
    for part in (slice(0, half), slice(half, None)):
        sub = Windows(
            *(getattr(windows, f)[part] for f in ("neuron", "start", "end", "u_max", "spikes"))
        )
        estimator.add(sub, q, 0, DT)
    assert np.allclose(estimator.beta(), beta, atol=1e-9)


def test_ols_with_noise_is_close_and_unestimated_neurons_are_zero():
    beta = np.random.default_rng(3).normal(size=(4, 5))
    windows, q, _ = synthetic(4, 5, 400, beta, 0.3, 0.2, noise=0.05)
    keep = windows.neuron != 3  # neuron 3 has no windows at all
    windows = Windows(
        *(getattr(windows, f)[keep] for f in ("neuron", "start", "end", "u_max", "spikes"))
    )
    for pooled in (True, False):
        estimator = OLSEstimator(4, 5, RDDParams(ols_pooled=pooled, ols_adjust=False))
        estimator.add(windows, q, 0, DT)
        estimate = estimator.beta()
        assert np.allclose(estimate[:3], beta[:3], atol=0.05)
        assert np.all(estimate[3] == 0)


def test_pooled_ols_has_less_error_than_free_lines_with_few_windows():
    beta = np.random.default_rng(5).normal(size=(30, 4))
    windows, q, _ = synthetic(30, 4, 12, beta, 0.5, -0.5, noise=0.5, seed=2)
    errors = {}
    for pooled in (True, False):
        estimator = OLSEstimator(30, 4, RDDParams(ols_pooled=pooled, ols_adjust=False))
        estimator.add(windows, q, 0, DT)
        errors[pooled] = np.sqrt(np.mean((estimator.beta() - beta) ** 2))
    assert errors[True] < 0.5 * errors[False]


def test_windows_far_from_threshold_are_dropped():
    beta = np.ones((1, 2))
    windows, q, _ = synthetic(1, 2, 60, beta, 0.0, 0.0, noise=0.0)
    windows.u_max[:5] = 50.0  # |u_max - theta| > u_band: would break the lines if kept
    estimator = OLSEstimator(1, 2, RDDParams(u_band=10.0, ols_adjust=False))
    estimator.add(windows, q, 0, DT)
    assert np.allclose(estimator.beta(), beta)


def test_lms_follows_reference_update_and_converges():
    beta = np.array([[1.0, -0.5]])
    windows, q, outcome = synthetic(1, 2, 4000, beta, 0.0, 0.0, noise=0.0)
    # one step by hand: from zero, err = -y, m += rate*y*x, c += rate*y
    first = np.argsort(windows.end)[0]
    one = Windows(
        *(getattr(windows, f)[[first]] for f in ("neuron", "start", "end", "u_max", "spikes"))
    )
    estimator = LMSEstimator(1, 2, RDDParams(lms_rate=0.01))
    estimator.add(one, q, 0, DT)
    side = 0 if one.spikes[0] > 0 else 1
    y, x = outcome[first], one.u_max[0]
    assert np.allclose(estimator.slope[side, 0], 0.01 * y * x)
    assert np.allclose(estimator.intercept[side, 0], 0.01 * y)
    other = 1 - side
    assert np.all(estimator.slope[other] == 0)
    # many windows: the online fit reaches the jump
    estimator = LMSEstimator(1, 2, RDDParams(lms_rate=0.05))
    for _ in range(5):
        estimator.add(windows, q, 0, DT)
    assert np.allclose(estimator.beta(), beta, atol=0.05)


def test_estimator_state_round_trip():
    beta = np.ones((2, 2))
    windows, q, _ = synthetic(2, 2, 30, beta, 0.1, 0.1, noise=0.1)
    activity = np.random.default_rng(0).normal(size=(len(q), 2))
    for cls in (LMSEstimator, OLSEstimator):
        a = cls(2, 2, RDDParams())
        a.add(windows, q, 0, DT, activity=activity)
        b = cls(2, 2, RDDParams())
        b.load_state_dict(a.state_dict())
        assert np.array_equal(a.beta(), b.beta())
        if cls is OLSEstimator:  # and the standard errors; a state from before they existed loads
            assert np.array_equal(a.standard_errors(), b.standard_errors())
            old = {
                k: v for k, v in a.state_dict().items() if k not in ("scalar_sq", "residual_var")
            }
            b.load_state_dict(old)
            assert np.array_equal(a.beta(), b.beta()) and np.all(np.isinf(b.standard_errors()))


def test_filtered_spikes_go_a_block_of_neurons_at_a_time_into_scratch_memory():
    p = LIFParams()
    rng = np.random.default_rng(1)
    n, steps = 150, 90  # three blocks of neurons
    times, indices = rng.integers(0, steps, 400) * DT, rng.integers(0, n, 400)
    scratch = Scratch()
    out = scratch.get("q", (steps, n))
    out.fill(np.nan)  # whatever the memory held before
    q = filtered_spikes(times, indices, n, 0, steps, DT, p.tau_L, p.tau_s, out=out)
    assert q is out
    counts = np.zeros((steps, n))
    np.add.at(counts, (np.rint(times / DT).astype(int), indices), 1.0)
    kappa = np.r_[0.0, p.kernel(steps)]  # a spike at m counts from m + 1 on
    expected = np.stack([np.convolve(counts[:, i], kappa)[:steps] for i in range(n)], axis=1)
    assert np.allclose(q, expected)
    assert np.shares_memory(scratch.get("q", (steps - 5, n)), out)  # a shorter segment reuses it
    assert not np.shares_memory(scratch.get("q", (2 * steps, n)), out)  # a longer one cannot
    with pytest.raises(ValueError, match=r"out must be float64 of shape \(90, 150\)"):
        filtered_spikes(times, indices, n, 0, steps, DT, p.tau_L, p.tau_s, out=np.empty((90, 9)))


def test_cumulative_sum_is_numpys_bit_for_bit_and_works_in_place():
    rng = np.random.default_rng(0)
    for width in (3, 200):  # numpy's own below 64 columns, row after row above
        values = rng.normal(size=(500, width))
        expected = np.cumsum(values, axis=0)
        assert np.array_equal(cumulative_sum(values), expected)
        assert cumulative_sum(values, out=values) is values and np.array_equal(values, expected)


def test_filtered_twice_is_the_double_convolution():
    p = LIFParams()
    times, indices = np.array([0.004, 0.020]), np.array([1, 0])
    twice = filtered_spikes(times, indices, 2, 0, 80, DT, p.tau_L, p.tau_s, times=2)
    kappa_kappa = np.convolve(np.r_[0.0, p.kernel(80)], np.r_[0.0, p.kernel(80)])[:80]
    expected = np.zeros((80, 2))
    for t, i in zip(times, indices, strict=True):
        m = int(round(t / DT))
        expected[m:, i] += kappa_kappa[: 80 - m]
    assert np.allclose(twice, expected)


def adjusted_case(seed=0, n_in=20, n_out=3, per_neuron=60):
    """Windows whose outcomes carry a known jump plus the linear effect of every driven neuron.

    q = a @ effects + (the synthetic line of each window on its 30 steps), with ``a`` the
    twice-filtered random spikes of the driven layer: the other neurons' part is large noise to
    the plain estimator and predictable to the adjusted one.
    """
    rng = np.random.default_rng(seed)
    beta = rng.normal(size=(n_in, n_out))
    windows, lines, _ = synthetic(n_in, n_out, per_neuron, beta, 0.3, -0.2, 0.02, seed=seed)
    n_steps = len(lines)
    p = LIFParams()
    spike_steps = np.flatnonzero(rng.random(n_steps * n_in) < 0.03)
    activity = filtered_spikes(
        (spike_steps // n_in) * DT, spike_steps % n_in, n_in, 0, n_steps, DT, p.tau_L, p.tau_s, 2
    )
    effects = rng.normal(size=(n_in, n_out)) * 3 / activity.std()
    return windows, lines + activity @ effects, activity, beta


def test_adjusted_ols_keeps_the_jump_and_removes_the_other_neurons_noise():
    windows, q, activity, beta = adjusted_case(per_neuron=150)
    errors, estimates = {}, {}
    for adjust in (False, True):
        estimator = OLSEstimator(*beta.shape, RDDParams(ols_adjust=adjust))
        estimator.add(windows, q, 0, DT, activity=activity)
        estimates[adjust] = estimator.beta()
        errors[adjust] = np.sqrt(np.mean((estimates[adjust] - beta) ** 2))
    # what remains is the neuron's own activity, which is never subtracted (1/20 of the noise)
    assert errors[True] < 0.25 * errors[False]
    assert np.corrcoef(estimates[True].ravel(), beta.ravel())[0, 1] > 0.9


def test_adjusted_ols_regression_finds_the_effects_and_needs_activity():
    windows, q, activity, beta = adjusted_case(seed=1)
    estimator = OLSEstimator(*beta.shape, RDDParams())
    with pytest.raises(ValueError, match="ols_adjust needs the driven layer's activity"):
        estimator.add(windows, q, 0, DT)
    # statistics accumulate over segments: the regression skips the steps before since_step
    # (every step: a segment's every fourth step starts at its own first)
    every_step = RDDParams(adjust_stride=1)
    estimator = OLSEstimator(*beta.shape, every_step)
    estimator.add(windows, q, 0, DT, activity=activity, since_step=0)
    whole = estimator.effects_of_driven()
    half = len(q) // 2
    split = OLSEstimator(*beta.shape, every_step)
    for start, stop in ((0, half), (half, len(q))):
        inside = (windows.start >= start * DT) & (windows.end < stop * DT)
        part = Windows(
            *(getattr(windows, f)[inside] for f in ("neuron", "start", "end", "u_max", "spikes"))
        )
        first = max(start - 50, 0)  # 50 steps of history shared with the previous segment
        split.add(part, q[first:stop], first, DT, activity=activity[first:stop], since_step=start)
    assert np.allclose(split.effects_of_driven(), whole)


def test_adjustment_is_unchanged_by_a_constant_in_the_activity():
    # the regression's products are summed in single precision about each segment's mean: a
    # layer firing fast (mean activity far above its spread) must not lose the regression to it
    windows, q, activity, beta = adjusted_case(seed=4)
    fits = []
    for offset in (0.0, 1e3 * activity.std()):
        estimator = OLSEstimator(*beta.shape, RDDParams())
        half = len(q) // 2  # two segments, each about its own mean
        estimator.add(windows.select(windows.end < half * DT), q, 0, DT, activity=activity + offset)
        estimator.add(
            windows.select(windows.end >= half * DT),
            q,
            0,
            DT,
            activity=activity + offset,
            since_step=half,
            early_se=True,
        )
        fits.append(
            (estimator.effects_of_driven(), estimator.beta(), estimator.standard_errors(False))
        )
    for plain, shifted in zip(*fits, strict=True):
        assert np.allclose(shifted, plain, rtol=1e-4, atol=1e-6 * np.abs(plain).max())


def test_adjustment_solves_without_cholesky_when_rounding_makes_it_indefinite(monkeypatch):
    windows, q, activity, beta = adjusted_case(seed=6)
    estimator = OLSEstimator(*beta.shape, RDDParams())
    estimator.add(windows, q, 0, DT, activity=activity)
    effects = estimator.effects_of_driven().copy()

    def indefinite(*args, **kwargs):
        raise np.linalg.LinAlgError("not positive definite")

    monkeypatch.setattr(rdd, "cho_factor", indefinite)
    estimator._cache.clear()
    assert np.allclose(estimator.effects_of_driven(), effects, rtol=1e-8, atol=1e-12)


def test_regression_on_every_fourth_step_is_the_regression_on_every_step():
    # the activity is kappa * kappa of spikes: a step says little its neighbour has not said
    windows, q, activity, beta = adjusted_case(seed=7, per_neuron=150)
    fits = {}
    for stride in (1, 4):
        estimator = OLSEstimator(*beta.shape, RDDParams(adjust_stride=stride))
        estimator.add(windows, q, 0, DT, activity=activity, early_se=True)
        assert abs(estimator.steps - len(q)) < stride  # steps still count time, not samples
        assert np.allclose(estimator.sum_a, activity.sum(0), rtol=1e-3)
        fits[stride] = estimator
    every, fourth = fits[1].effects_of_driven(), fits[4].effects_of_driven()
    assert np.abs(fourth - every).max() < 2e-3 * np.abs(every).max()
    assert np.allclose(fits[4].standard_errors(), fits[1].standard_errors(), rtol=1e-3)
    assert np.abs(fits[4].beta() - fits[1].beta()).max() < 1e-2 * np.abs(beta).max()
    with pytest.raises(ValueError, match="adjust_stride must be a positive integer"):
        OLSEstimator(2, 2, RDDParams(adjust_stride=0))


def test_pooled_state_saved_with_every_covariate_sum_still_loads():
    # before, the pooled lines kept the covariate sums per (side, i, j) as the free lines do
    windows, q, activity, beta = adjusted_case(seed=5)
    pooled, free = (OLSEstimator(*beta.shape, RDDParams(ols_pooled=p)) for p in (True, False))
    for estimator in (pooled, free):
        estimator.add(windows, q, 0, DT, activity=activity, early_se=True)
    old = {k: v for k, v in pooled.state_dict().items() if not k.startswith("covariate")}
    old.update(covariate_y=free.covariate_y, covariate_xy=free.covariate_xy)
    loaded = OLSEstimator(*beta.shape, RDDParams())
    loaded.load_state_dict(old)
    assert set(loaded.state_dict()) == set(pooled.state_dict())
    # the same sums added in another order: equal to rounding, which the regression amplifies
    assert np.allclose(loaded.beta(), pooled.beta(), rtol=1e-8, atol=1e-8)
    assert np.allclose(loaded.standard_errors(False), pooled.standard_errors(False), rtol=1e-8)
    with pytest.raises(ValueError, match="only with ols_pooled=False"):
        pooled.line_sums()


def test_adjusted_ols_leaves_the_neurons_own_activity_alone():
    # the effect of i's spike reaches q only through i's own activity: subtracting it would
    # erase the jump, so the estimate must equal effects[i] times the outcome of one spike
    rng = np.random.default_rng(4)
    n_in, n_out = 10, 3
    windows, _, _ = synthetic(n_in, n_out, 100, np.zeros((n_in, n_out)), 0.0, 0.0, 0.0, seed=4)
    p = LIFParams()
    n_steps = int(round(windows.end.max() / DT)) + 40
    steps = np.flatnonzero(rng.random(n_steps * n_in) < 0.03)
    times, neurons = (steps // n_in) * DT, steps % n_in
    spiked = windows.spikes > 0  # each spiked window holds one spike of its neuron
    times = np.r_[times, windows.start[spiked] + 2 * DT]
    neurons = np.r_[neurons, windows.neuron[spiked]]
    activity = filtered_spikes(times, neurons, n_in, 0, n_steps, DT, p.tau_L, p.tau_s, times=2)
    effects = rng.normal(size=(n_in, n_out)) / activity.std()
    q = activity @ effects
    estimator = OLSEstimator(n_in, n_out, RDDParams())
    estimator.add(windows, q, 0, DT, activity=activity)
    one = Windows(np.array([0]), np.array([0.01]), np.array([0.04]), np.array([1.1]), np.ones(1))
    impulse = filtered_spikes(np.array([0.012]), np.array([0]), 1, 0, 60, DT, 10e-3, 3e-3, 2)
    expected = effects * window_outcomes(one, impulse, 0, DT)[0, 0]
    assert np.corrcoef(estimator.beta().ravel(), expected.ravel())[0, 1] > 0.95


# -- standard errors and the stopping criterion ---------------------------------------------------
def direct_jump_and_se(windows, y, params, n_in):
    """Jump and its standard error per (i, k) by direct weighted least squares on a design matrix.

    Each side is one regression of y on [its columns]; the pooled spiked side has one intercept per
    neuron and one slope, the control side one line; free lines give every (side, neuron) its own
    line. With weights w the covariance is the sandwich s2 A^-1 X'W^2X A^-1 (A = X'WX), which is
    s2 (X'X)^-1 for 0/1 weights, and s2 = RSS / trace((I - H)(I - H)') (= RSS / (n - p) then).
    """
    kept = np.abs(windows.u_max - params.threshold) <= params.u_band
    x = windows.u_max
    weight = kept.astype(float)
    if params.ols_bandwidth is not None:
        weight *= np.clip(1 - np.abs(x - params.threshold) / params.ols_bandwidth, 0, None)
    theta = params.threshold
    parts = []
    for spiked in (True, False):
        rows = np.flatnonzero((weight > 0) & ((windows.spikes > 0) == spiked))
        onehot = np.eye(n_in)[windows.neuron[rows]]
        if params.ols_pooled and spiked:  # a_i + m x
            design = np.column_stack([onehot, x[rows]])
            at_theta = np.column_stack([np.eye(n_in), np.full(n_in, theta)])
        elif params.ols_pooled:  # c + m x, the same for every neuron
            design = np.column_stack([np.ones(len(rows)), x[rows]])
            at_theta = np.tile([1.0, theta], (n_in, 1))
        else:  # a_i + m_i x
            design = np.column_stack([onehot, onehot * x[rows, None]])
            at_theta = np.column_stack([np.eye(n_in), theta * np.eye(n_in)])
        w = weight[rows]
        a_inv = np.linalg.inv(design.T @ (w[:, None] * design))
        hat = design @ a_inv @ (design.T * w)
        coef = a_inv @ (design.T * w) @ y[rows]
        residual = y[rows] - design @ coef
        dof = np.trace((np.eye(len(rows)) - hat) @ (np.eye(len(rows)) - hat).T)
        s2 = (residual**2).sum(0) / dof
        sandwich = a_inv @ (design.T * w**2) @ design @ a_inv
        factor = np.einsum("ip,pq,iq->i", at_theta, sandwich, at_theta)
        parts.append((at_theta @ coef, factor[:, None] * s2[None, :]))
    jump = parts[0][0] - parts[1][0]
    return jump, np.sqrt(parts[0][1] + parts[1][1])


@pytest.mark.parametrize(
    "params",
    [
        RDDParams(ols_adjust=False),
        RDDParams(ols_adjust=False, ols_pooled=False),
        RDDParams(ols_adjust=False, ols_bandwidth=0.25),
    ],
)
def test_standard_errors_match_direct_least_squares(params):
    beta = np.random.default_rng(7).normal(size=(6, 3))
    windows, q, outcome = synthetic(6, 3, 40, beta, 0.4, -0.3, noise=0.3, seed=7)
    windows.u_max[:4] = 30.0  # dropped (outside u_band); must not count
    estimator = OLSEstimator(6, 3, params)
    estimator.add(windows, q, 0, DT)
    jump, se = direct_jump_and_se(windows, outcome, params, 6)
    assert np.allclose(estimator.beta(), jump)
    assert np.allclose(estimator.standard_errors(), se, rtol=1e-9)


def direct_ridge(activity: np.ndarray, q: np.ndarray, ridge_steps: float) -> np.ndarray:
    """Ridge regression of q on the activity with an unpenalised intercept, as least squares on
    the centred data stacked over sqrt(lambda) I: lambda is ridge_steps steps' worth of the mean
    variance of a neuron's activity."""
    centred_a, centred_q = activity - activity.mean(0), q - q.mean(0)
    n_steps, n_in = activity.shape
    lam = ridge_steps * (centred_a**2).sum() / n_in / n_steps
    design = np.vstack([centred_a, np.sqrt(lam) * np.eye(n_in)])
    target = np.vstack([centred_q, np.zeros((n_in, q.shape[1]))])
    return np.linalg.lstsq(design, target, rcond=None)[0]


@pytest.mark.parametrize("ridge", [0.0, 1000.0, 30000.0])
def test_adjusted_standard_errors_match_direct_least_squares_of_adjusted_outcomes(ridge):
    windows, q, activity, beta = adjusted_case(seed=2, n_in=8, per_neuron=50)
    params = RDDParams(adjust_ridge_steps=ridge, adjust_stride=1)  # the direct one takes every step
    estimator = OLSEstimator(*beta.shape, params)
    estimator.add(windows, q, 0, DT, activity=activity)
    # the regression of q on the driven layer, directly, and dR'_w = dR_w - sum_{j != i} dA_wj g_jk
    if ridge == 0:  # plain least squares with an intercept
        design = np.column_stack([np.ones(len(q)), activity])
        effects = np.linalg.lstsq(design, q, rcond=None)[0][1:]
    else:
        effects = direct_ridge(activity, q, ridge)
        plain = np.linalg.lstsq(np.column_stack([np.ones(len(q)), activity]), q, rcond=None)[0]
        assert not np.allclose(effects, plain[1:], rtol=1e-3)  # the ridge does something
    assert np.allclose(estimator.effects_of_driven(), effects, rtol=1e-4, atol=1e-8)
    covariates = window_outcomes(windows, activity, 0, DT)
    own = covariates[np.arange(len(windows)), windows.neuron]
    adjusted = (
        window_outcomes(windows, q, 0, DT)
        - covariates @ effects
        + own[:, None] * effects[windows.neuron]
    )
    jump, se = direct_jump_and_se(windows, adjusted, params, beta.shape[0])
    assert np.allclose(estimator.beta(), jump, rtol=1e-4, atol=1e-5)  # the ridge's 1e-6 floor
    assert np.allclose(estimator.standard_errors(), se, rtol=1e-4)


def test_residual_variance_is_skipped_until_the_standard_errors_count():
    # below se_min_steps_per_neuron the SEs are infinite whatever sigma^2 is, so add() skips it;
    # the segment that crosses the limit estimates sigma^2 itself (from its own windows only)
    windows, q, activity, beta = adjusted_case(seed=3, n_in=8, per_neuron=60)
    half = len(q) // 2
    segments = []
    for start, stop in ((0, half), (half, len(q))):
        inside = (windows.start >= start * DT) & (windows.end < stop * DT)
        segments.append((Windows(*(getattr(windows, f)[inside] for f in FIELDS)), start, stop))
    limit = 0.75 * len(q) / beta.shape[0]  # steps per driven neuron: reached by the second
    gated = OLSEstimator(*beta.shape, RDDParams(se_min_steps_per_neuron=limit))
    always = OLSEstimator(*beta.shape, RDDParams(se_min_steps_per_neuron=0.0))
    for number, (part, start, stop) in enumerate(segments):
        for estimator in (gated, always):
            first = max(start - 50, 0)
            estimator.add(
                part, q[first:stop], first, DT, activity=activity[first:stop], since_step=start
            )
        if number == 0:
            assert np.all(np.isnan(gated.residual_var))  # skipped
            assert np.all(np.isinf(gated.standard_errors()))
            assert np.all(np.isfinite(always.standard_errors()))
    assert np.all(np.isfinite(gated.standard_errors()))
    assert np.array_equal(gated.standard_errors(), always.standard_errors())


def test_early_standard_errors_rank_before_they_are_trusted():
    # with early_se, sigma^2 is estimated from the first segment on: standard_errors() stays
    # infinite until the limit, standard_errors(trusted_only=False) is what an ungated one says
    windows, q, activity, beta = adjusted_case(seed=3, n_in=8, per_neuron=60)
    limit = 2.0 * len(q) / beta.shape[0]  # never reached here
    early = OLSEstimator(*beta.shape, RDDParams(se_min_steps_per_neuron=limit))
    always = OLSEstimator(*beta.shape, RDDParams(se_min_steps_per_neuron=0.0))
    early.add(windows, q, 0, DT, activity=activity, early_se=True)
    always.add(windows, q, 0, DT, activity=activity)
    assert not early.se_trusted() and always.se_trusted()
    assert np.all(np.isinf(early.standard_errors()))
    assert np.array_equal(early.standard_errors(trusted_only=False), always.standard_errors())
    assert np.all(np.isfinite(always.standard_errors()))


def test_standard_errors_are_calibrated_over_segments():
    # (beta_hat - beta) / se is standard normal: the errors match the stated uncertainty
    beta = np.random.default_rng(8).normal(size=(60, 4))
    windows, q, _ = synthetic(60, 4, 30, beta, 0.4, -0.3, noise=0.5, seed=8)
    estimator = OLSEstimator(60, 4, RDDParams(ols_adjust=False))
    half = len(windows) // 2
    for part in (slice(0, half), slice(half, None)):  # sigma^2 from the last segment
        estimator.add(Windows(*(getattr(windows, f)[part] for f in FIELDS)), q, 0, DT)
    z = (estimator.beta() - beta) / estimator.standard_errors()
    assert 0.85 < z.std() < 1.15 and abs(z.mean()) < 0.15
    assert np.all(np.isinf(OLSEstimator(60, 4, PLAIN).standard_errors()))  # nothing estimated


@pytest.mark.parametrize("noise", [0.3, 1.0])
def test_predicted_sign_agreement_matches_the_truth_without_seeing_it(noise):
    # uniform true jumps (like Kaiming-uniform W) with heteroscedastic errors of known size
    rng = np.random.default_rng(9)
    truth = rng.uniform(-1, 1, 50000)
    se = noise * rng.uniform(0.5, 1.5, truth.size)
    estimate = truth + se * rng.normal(size=truth.size)
    measured = 100 * np.mean(np.sign(estimate) == np.sign(truth))
    assert predicted_sign_agreement(estimate, se) == pytest.approx(measured, abs=1.5)
    # entries never estimated (infinite SE) count as a coin flip
    half = np.where(np.arange(truth.size) < truth.size // 2, se, np.inf)
    expected = (
        predicted_sign_agreement(estimate[: truth.size // 2], se[: truth.size // 2]) + 50
    ) / 2
    assert predicted_sign_agreement(estimate, half) == pytest.approx(expected, abs=1.0)


def test_mixture_weights_reach_the_maximum_likelihood():
    # mix-SQP against a general bound-constrained optimiser on the same convex problem
    from scipy.optimize import minimize
    from scipy.special import ndtr

    from spikealign.rdd import _component, _mixture_weights, _prior_grid

    rng = np.random.default_rng(11)
    truth = rng.uniform(-1, 1, 5000) * (rng.random(5000) < 0.7)  # a point mass at 0 too
    se = rng.uniform(0.2, 0.6, truth.size)
    estimate = truth + se * rng.normal(size=truth.size)
    at_zero = ndtr(estimate / se)
    grid = _prior_grid(estimate, se)
    densities = np.array([_component(estimate, se, a, at_zero)[0] for a in grid])
    likelihood = densities / densities.max(0)

    def objective(x):
        mixture = x @ likelihood
        return -np.mean(np.log(mixture)) + x.sum(), 1.0 - (likelihood / mixture).mean(1)

    weights = _mixture_weights(likelihood)
    assert weights.min() >= 0 and weights.sum() == pytest.approx(1.0)
    start = np.full(len(likelihood), 1.0 / len(likelihood))
    bounds = [(0.0, None)] * len(likelihood)
    options = {"maxiter": 20000, "ftol": 1e-15, "gtol": 1e-12}
    reference = minimize(objective, start, jac=True, bounds=bounds, options=options)
    assert objective(weights)[0] <= reference.fun + 1e-12
    gradient = objective(weights)[1]
    assert gradient.min() > -1e-7  # KKT: no component would raise the likelihood


def test_stopping_rule_stops_on_a_known_jump_and_not_on_noise():
    beta = np.random.default_rng(10).choice([-1.0, 1.0], size=(30, 4)) * 0.5
    for jump, stops in ((beta, True), (np.zeros_like(beta), False)):
        windows, q, _ = synthetic(30, 4, 40, jump, 0.3, -0.2, noise=0.5, seed=10)
        estimator = OLSEstimator(30, 4, PLAIN)
        estimator.add(windows, q, 0, DT)
        value = predicted_sign_agreement(estimator.beta(), estimator.standard_errors())
        assert (value >= 80) == stops, value
        if not stops:
            assert value < 60  # pure noise: about a coin flip, not the 75 % of mean Phi(|z|)


def test_criterion_survives_jumps_far_out_in_their_errors():
    # 5,000 (beta, se) of fc1 of 1600-384-192-10 after 10 s with an unregularised adjustment and
    # untrusted SEs, |beta| / se up to 39: a mix-SQP step used to zero the only prior component
    # under which the far ones are likely, their ratio became 1e300 and H infinite (nnls raised)
    from pathlib import Path

    from scipy.special import ndtr

    data = np.load(Path(__file__).parent / "data" / "criterion_far_jumps.npz")
    beta, se = data["beta"].astype(np.float64), data["se"].astype(np.float64)
    value = predicted_sign_agreement(beta, se)
    # shrinkage keeps it below the naive mean of Phi(|z|), which is biased up
    assert 50 < value < 100 * ndtr(np.abs(beta) / se).mean()
