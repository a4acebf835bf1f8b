"""RDD estimators on synthetic windows with a known discontinuity (METHOD 4)."""

import numpy as np
import pytest

from spikealign.lif import LIFParams
from spikealign.rdd import (
    LMSEstimator,
    OLSEstimator,
    RDDParams,
    Windows,
    filtered_spikes,
    outcome_sums,
    window_outcomes,
)

DT = 1e-3
LENGTH = 30


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
    estimator = OLSEstimator(2, 3, RDDParams(ols_bandwidth=bandwidth, ols_pooled=pooled))
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
        estimator = OLSEstimator(4, 5, RDDParams(ols_pooled=pooled))
        estimator.add(windows, q, 0, DT)
        estimate = estimator.beta()
        assert np.allclose(estimate[:3], beta[:3], atol=0.05)
        assert np.all(estimate[3] == 0)


def test_pooled_ols_has_less_error_than_free_lines_with_few_windows():
    beta = np.random.default_rng(5).normal(size=(30, 4))
    windows, q, _ = synthetic(30, 4, 12, beta, 0.5, -0.5, noise=0.5, seed=2)
    errors = {}
    for pooled in (True, False):
        estimator = OLSEstimator(30, 4, RDDParams(ols_pooled=pooled))
        estimator.add(windows, q, 0, DT)
        errors[pooled] = np.sqrt(np.mean((estimator.beta() - beta) ** 2))
    assert errors[True] < 0.5 * errors[False]


def test_windows_far_from_threshold_are_dropped():
    beta = np.ones((1, 2))
    windows, q, _ = synthetic(1, 2, 60, beta, 0.0, 0.0, noise=0.0)
    windows.u_max[:5] = 50.0  # |u_max - theta| > u_band: would break the lines if kept
    estimator = OLSEstimator(1, 2, RDDParams(u_band=10.0))
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
    for cls in (LMSEstimator, OLSEstimator):
        a = cls(2, 2, RDDParams())
        a.add(windows, q, 0, DT)
        b = cls(2, 2, RDDParams())
        b.load_state_dict(a.state_dict())
        assert np.array_equal(a.beta(), b.beta())
