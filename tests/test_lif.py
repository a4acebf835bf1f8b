"""The compiled LIF program against closed-form single-neuron dynamics (METHOD 2 and 4).

Brian2 stamps events with the clock time at the start of the step in which v was advanced, so an
event recorded at step s sees v after s + 1 integration steps.

A very slow tau_L makes the drive constant: with trace_L = B * kernel_norm and trace_s = 0 the
drive is B for the whole test, and v follows v(t) = 6/7 B + (v0 - 6/7 B) exp(-(g_L + g_D) t).
"""

import math
import os

import numpy as np
import pytest

from spikealign.lif import LIFParams, LIFProgram, hash_uniform

PARAMS = LIFParams(tau_L=1e6, noise_rate=0.0)  # constant drive, no noise
STEPS = 100  # 0.1 s segment


@pytest.fixture(scope="module")
def program():
    return LIFProgram([2, 1], STEPS * PARAMS.dt, PARAMS)


def _run(program, drive):
    """One segment with a constant drive on neuron 0 of layer 0 (neuron 1 gets none)."""
    state = program.initial_state()
    state[0]["trace_L"] = np.array([drive * PARAMS.kernel_norm, 0.0])
    weights = [np.zeros((1, 2))]
    record, final = program.run_segment(weights, state, driven_layers=(0,), seed=0, t_offset=0.0)
    return record, final


def steady(drive):
    return PARAMS.g_D / (PARAMS.g_L + PARAMS.g_D) * drive


def v_after(n_steps, v0, drive):
    g = PARAMS.g_L + PARAMS.g_D
    return steady(drive) + (v0 - steady(drive)) * math.exp(-g * n_steps * PARAMS.dt)


def test_subthreshold_steady_state_is_six_sevenths_of_drive(program):
    drive = 1.0  # 6/7 < threshold - window band: never spikes, no window
    record, final = _run(program, drive)
    assert len(record.spike_times[0]) == 0
    assert final[0]["v"][0] == pytest.approx(v_after(STEPS, 0.0, drive), rel=1e-6)
    assert final[0]["v"][0] == pytest.approx(6 / 7 * drive, rel=1e-6)
    assert final[0]["u"][0] == pytest.approx(final[0]["v"][0])  # no window: u follows v
    assert final[0]["v"][1] == 0.0  # no drive, stays at rest
    assert len(record.windows[0].neuron) == 0


def first_spike_step(drive, v0=0.0, earliest=1):
    n = earliest
    while v_after(n, v0, drive) < PARAMS.threshold:
        n += 1
    return n


def test_spike_reset_and_refractory_period(program):
    refractory_steps = round(PARAMS.refractory / PARAMS.dt)
    for drive in (1.4, 3.0):  # interval set by the dynamics (1.4) or by t_ref (3.0)
        record, _ = _run(program, drive)
        steps = np.rint(record.spike_times[0] / PARAMS.dt).astype(int)
        assert set(record.spike_indices[0]) == {0}
        # closed form: first crossing from rest, then from v_reset, but not before t_ref
        first = first_spike_step(drive)
        interval = first_spike_step(drive, PARAMS.v_reset, earliest=refractory_steps)
        assert steps[0] == first - 1  # recorded at the start of the step (module docstring)
        assert np.all(np.diff(steps) == interval)
        assert interval >= refractory_steps
    assert interval == refractory_steps  # drive 3.0: refractoriness sets the rate


def test_rdd_windows_open_close_and_count_spikes(program):
    drive = 1.4  # v after 1, 2, 3 steps: 0.60, 0.90, 1.05 -> window opens at recorded step 1
    record, _ = _run(program, drive)
    length = round(PARAMS.window_length / PARAMS.dt)
    spikes = np.rint(record.spike_times[0] / PARAMS.dt).astype(int)
    starts = np.rint(record.windows[0].start / PARAMS.dt).astype(int)
    ends = np.rint(record.windows[0].end / PARAMS.dt).astype(int)
    assert starts[0] == 1
    assert np.all(ends - starts == length)
    # after a window closes, u = v again; the next opens when v is back in the band
    for start, end, count, u_max in zip(
        starts, ends, record.windows[0].spikes, record.windows[0].u_max, strict=True
    ):
        assert count == np.sum((spikes > start) & (spikes <= end))
        # u integrates without reset from v at the opening: its maximum is at the window's end
        if start == starts[0]:
            v_open = v_after(start + 1, 0.0, drive)
            assert u_max == pytest.approx(v_after(length, v_open, drive), rel=1e-6)
    # closed form: spikes at recorded steps first - 1, then every interval; (1, 31] holds 2..30
    first = first_spike_step(drive) - 1
    interval = first_spike_step(drive, PARAMS.v_reset, earliest=3)
    expected = len(range(first, 32, interval))
    assert (first, interval, expected) == (2, 4, 8)
    assert record.windows[0].spikes[0] == expected
    assert set(record.windows[0].neuron) == {0}
    assert starts[1] > ends[0]


def test_windows_only_in_driven_layer(program):
    state = program.initial_state()
    state[0]["trace_L"] = np.array([1.4 * PARAMS.kernel_norm, 0.0])
    weights = [np.zeros((1, 2))]
    record, _ = program.run_segment(weights, state, driven_layers=(1,), seed=0, t_offset=0)
    assert list(record.windows) == [1]  # layer 0 spikes but is not driven: no windows read
    assert len(record.spike_times[0]) > 0
    both, _ = program.run_segment(weights, state, driven_layers=(0, 1), seed=0, t_offset=0)
    assert list(both.windows) == [0, 1]
    np.testing.assert_array_equal(both.windows[0].start, _run(program, 1.4)[0].windows[0].start)


def test_a_driven_layer_takes_no_synaptic_input(program):
    # layer 0's neuron 0 spikes steadily; through a strong weight it makes layer 1 fire, unless
    # layer 1 is driven too: its drive is then its own noise alone (METHOD 2; none here), whatever
    # W is. A weight of 1e10 is a drive step of 10: the kernel norm is 1e9 with this tau_L.
    state = program.initial_state()
    state[0]["trace_L"] = np.array([3.0 * PARAMS.kernel_norm, 0.0])
    strong, silent = [np.array([[1e10, 0.0]])], [np.zeros((1, 2))]
    listening, _ = program.run_segment(strong, state, driven_layers=(0,), seed=0, t_offset=0)
    assert len(listening.spike_times[1]) > 10
    driven = [
        program.run_segment(w, state, driven_layers=(0, 1), seed=0, t_offset=0)[0]
        for w in (strong, silent)
    ]
    assert len(driven[0].spike_times[1]) == 0 and len(driven[0].windows[1].neuron) == 0
    np.testing.assert_array_equal(driven[0].spike_times[0], listening.spike_times[0])
    np.testing.assert_array_equal(driven[0].spike_times[0], driven[1].spike_times[0])
    np.testing.assert_array_equal(driven[0].windows[0].u_max, driven[1].windows[0].u_max)


def test_subnormal_values_are_flushed_to_zero(program):
    # A silent layer's traces decay towards zero; as subnormal numbers they would stay there
    # (x * 0.72 rounds back to the smallest one) and slow every later step by two orders.
    state = program.initial_state()
    state[0]["trace_s"] = np.array([0.0, 1e-300])  # exp(-100 steps / 3) later: ~3e-315
    _, final = program.run_segment(
        [np.zeros((1, 2))], state, driven_layers=(1,), seed=0, t_offset=0
    )
    assert 1e-300 * math.exp(-STEPS * PARAMS.dt / PARAMS.tau_s) > 0  # representable, subnormal
    assert final[0]["trace_s"][1] == 0.0
    assert final[0]["v"][1] == 0.0 and final[0]["u"][1] == 0.0


def test_counter_based_noise_is_uniform_and_reproducible():
    u = hash_uniform(7, 1, np.arange(20000), 3)
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01
    assert np.array_equal(u, hash_uniform(7, 1, np.arange(20000), 3))
    assert not np.array_equal(u, hash_uniform(8, 1, np.arange(20000), 3))


def test_weights_are_written_once_and_again_only_when_they_change(program):
    # layer 0's neuron 0 fires 34 times in the segment; through 1e9 its spikes drive layer 1 to
    # fire too (tau_L = 1e6 s: a spike adds weight / kernel_norm to the drive)
    def start(weights):
        state = program.initial_state()
        state[0]["trace_L"] = np.array([3.0 * PARAMS.kernel_norm, 0.0])
        return program.start_segment([weights], state, (0,), seed=0, t_offset=0.0)

    def files():
        return sorted(os.listdir(program._weight_directory.name))

    weights = np.array([[1e9, 0.0]])
    first, _ = start(weights).result()
    assert len(first.spike_times[0]) == 34 and len(first.spike_times[1]) > 0
    written = files()
    again, _ = start(weights.copy()).result()  # equal weights: the same file
    assert files() == written and np.array_equal(again.spike_times[1], first.spike_times[1])
    running = start(weights)
    weights[0, 0] = 0.0  # changed in place: written anew, the old file removed
    silent, _ = start(weights).result()
    assert len(silent.spike_times[1]) == 0 and len(files()) == 1 and files() != written
    # the segment started before the change still reads the weights it was started with
    assert np.array_equal(running.result()[0].spike_times[1], first.spike_times[1])
