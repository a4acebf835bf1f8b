"""The feedback-training phase end to end on a small network, and python -m sims.rdd_phase."""

import json
import math
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from sims import rdd_phase
from spikealign.errors import UserError
from spikealign.metrics import alignment
from spikealign.phase import FeedbackPhase, PhaseConfig, expected_ranks, kaiming_uniform
from spikealign.spikelog import open_log

SIZES = [40, 20, 10]
DURATION = 20.0  # 10 s per fc layer: one segment each (one cached build for the whole file)


def weights_and_feedbacks(seed=0):
    rng = np.random.default_rng(seed)
    return kaiming_uniform(SIZES, rng), kaiming_uniform(SIZES, rng)


@pytest.fixture(scope="module")
def lms_run(tmp_path_factory):
    weights, feedbacks = weights_and_feedbacks()
    phase = FeedbackPhase(SIZES, PhaseConfig(duration=DURATION, seed=3), progress=False)
    log = tmp_path_factory.mktemp("phase") / "phase.h5"
    result = phase.run(weights, feedbacks, log_path=log)
    return phase, weights, feedbacks, result, log


def test_beta_is_proportional_to_forward_weights(lms_run):
    _, weights, feedbacks, result, _ = lms_run
    for fc in range(2):
        before = alignment(weights[fc], feedbacks[fc])
        after = alignment(weights[fc], result.feedbacks[fc])
        beta_alignment = alignment(weights[fc], result.beta[fc])
        assert 80 < before["angle_deg"] < 100  # random feedback: about orthogonal
        assert after["angle_deg"] < 75 and after["sign_agreement"] > 60
        assert beta_alignment["angle_deg"] == pytest.approx(after["angle_deg"], abs=1e-6)
    assert result.windows[0] > 100 and result.windows[1] > 50


def test_windows_opened_while_a_layer_settles_are_left_out(lms_run):
    from spikealign.phase import SETTLE_S

    _, _, _, result, log = lms_run  # reference: L0 driven 0-10 s, then L1 10-20 s
    with open_log(log) as spikes:
        first, second = spikes.windows("L0")["start"], spikes.windows("L1")["start"]
    assert first.min() < SETTLE_S  # from rest there is nothing to settle
    assert second.min() >= 10.0 + SETTLE_S  # L1 fired feed-forward until 10 s
    assert result.windows == [len(first), len(second)]


def test_ols_estimator_aligns_too():
    weights, feedbacks = weights_and_feedbacks()
    phase = FeedbackPhase(
        SIZES, PhaseConfig(duration=DURATION, seed=3, estimator="ols"), progress=False
    )
    result = phase.run(weights, feedbacks)
    fc1 = alignment(weights[0], result.feedbacks[0])
    assert fc1["angle_deg"] < 70 and fc1["sign_agreement"] > 65


def test_rescale_keeps_initial_feedback_scale_and_reproduces(lms_run):
    phase, weights, feedbacks, result, _ = lms_run
    for fc in range(2):
        assert result.feedbacks[fc].std() == pytest.approx(feedbacks[fc].std(), rel=0.05)
    # same seed and state: identical numbers (counter-based noise, no hidden randomness)
    again = FeedbackPhase(SIZES, PhaseConfig(duration=DURATION, seed=3), progress=False)
    repeat = again.run(weights, feedbacks)
    assert all(np.array_equal(a, b) for a, b in zip(result.beta, repeat.beta, strict=True))
    other = FeedbackPhase(SIZES, PhaseConfig(duration=DURATION, seed=4), progress=False)
    assert not np.array_equal(other.run(weights, feedbacks).beta[0], result.beta[0])


def test_state_is_carried_across_phases(lms_run):
    phase, weights, feedbacks, result, _ = lms_run
    restored = FeedbackPhase(SIZES, PhaseConfig(duration=DURATION, seed=3), progress=False)
    restored.load_state_dict(phase.state_dict())
    assert np.array_equal(restored._estimators[0].beta(), result.beta[0].T)


def test_gradient_update_moves_part_way_towards_rescaled_beta():
    weights, feedbacks = weights_and_feedbacks()
    config = PhaseConfig(duration=DURATION, seed=3, update="gradient", eta=0.5, omega=1, gamma=1)
    result = FeedbackPhase(SIZES, config, progress=False).run(weights, feedbacks)
    beta = result.beta[0]
    mask = beta != 0
    beta_hat = beta * feedbacks[0].std() / beta[mask].std()
    # one update in the fc1 share (one segment): Y = Y0 + 0.5 (beta_hat - Y0)
    expected = np.where(mask, feedbacks[0] + 0.5 * (beta_hat - feedbacks[0]), feedbacks[0])
    assert np.allclose(result.feedbacks[0], expected)


def test_log_round_trip(lms_run):
    _, weights, feedbacks, result, log = lms_run
    with open_log(log) as spikes:
        assert spikes.complete and list(spikes.sizes) == SIZES
        assert spikes.simulated_until == pytest.approx(DURATION)
        stored = spikes.weights("fc1")
        assert np.allclose(stored["W"], weights[0], atol=1e-6)
        assert np.allclose(stored["Y_before"], feedbacks[0], atol=1e-6)
        assert np.allclose(stored["Y_after"], result.feedbacks[0], atol=1e-6)
        windows = spikes.windows(0)
        assert len(windows["neuron"]) == result.windows[0]
        times, _ = spikes.spikes(0)
        assert times.max() < DURATION / 2 + 0.05  # driven in the fc1 share; traces then decay
        assert len(spikes.alignment()["time"]) == 2 + 2  # before, and after each segment


def test_interrupted_phase_stops_the_next_segment_and_keeps_the_partial_log(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where segments keep their files
    weights, feedbacks = weights_and_feedbacks()
    phase = FeedbackPhase(SIZES, PhaseConfig(duration=DURATION, seed=3), progress=False)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # while the second segment runs in the background

    monkeypatch.setattr(phase._estimators[0], "add", interrupted)
    program, started = phase.program(), []
    start_segment = program.start_segment

    def recording_start(*args):
        started.append(start_segment(*args))
        return started[-1]

    monkeypatch.setattr(program, "start_segment", recording_start)
    with pytest.raises(KeyboardInterrupt):
        phase.run(weights, feedbacks, log_path=tmp_path / "phase.h5")
    assert len(started) == 2 and started[1]._process.returncode < 0  # killed, not finished
    assert not list(tmp_path.glob("spikealign-segment-*"))  # and its files deleted
    with open_log(tmp_path / "phase.h5.partial") as log:
        assert not log.complete and log.simulated_until == 0.0
        assert len(log.alignment()["time"]) == 2  # the records from before the phase


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"weights": [np.eye(20, 40), np.zeros((10, 21))]}, "fc2 has shape"),
        ({"feedbacks": [np.full((20, 40), np.nan), np.zeros((10, 20))]}, "NaN"),
        ({"weights": [np.zeros((20, 40))]}, "expected 2 weight matrices"),
    ],
)
def test_bad_weights_give_clear_errors(bad, message):
    from spikealign.errors import UserError

    weights, feedbacks = weights_and_feedbacks()
    args = {"weights": weights, "feedbacks": feedbacks} | bad
    with pytest.raises(UserError, match=message):
        FeedbackPhase(SIZES, PhaseConfig(duration=DURATION), progress=False).run(**args)


def test_cli_runs_a_phase_end_to_end(tmp_path, capsys):
    weights, feedbacks = weights_and_feedbacks(1)
    source = tmp_path / "w.npz"
    np.savez(source, W1=weights[0], W2=weights[1], Y1=feedbacks[0], Y2=feedbacks[1])
    summary_path, out, log = tmp_path / "s.json", tmp_path / "out.npz", tmp_path / "log.h5"
    rdd_phase.main(
        [
            "--weights", str(source), "--duration", str(DURATION), "--log", str(log),
            "--summary-json", str(summary_path), "--out-weights", str(out), "--no-progress",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "fc1" in printed and "sign agreement" in printed
    summary = json.loads(summary_path.read_text())
    assert summary["simulated_s"] == pytest.approx(DURATION)
    assert [layer["name"] for layer in summary["layers"]] == ["fc1", "fc2"]
    assert set(summary) == {"simulated_s", "wall_s", "build_s", "layers"}
    with np.load(out) as arrays:
        assert np.array_equal(arrays["W1"], weights[0])
        after = alignment(weights[0], arrays["Y1"])
    assert after["sign_agreement"] == pytest.approx(summary["layers"][0]["sign_agreement"])
    assert log.exists() and not (tmp_path / "log.h5.partial").exists()


def _cli_error(tmp_path, *args):
    process = subprocess.run(
        [sys.executable, "-m", "sims.rdd_phase", "--no-progress", *args],
        capture_output=True,
        text=True,
    )
    assert process.returncode == 2, process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in process.stderr
    return lines[0]


def test_cli_bad_inputs(tmp_path):
    chain = tmp_path / "chain.npz"
    np.savez(chain, W1=np.ones((20, 40)), W2=np.ones((10, 21)))
    assert "do not chain" in _cli_error(tmp_path, "--weights", str(chain))
    nan = tmp_path / "nan.npz"
    np.savez(nan, W1=np.full((20, 40), np.nan), W2=np.ones((10, 20)))
    assert "NaN" in _cli_error(tmp_path, "--weights", str(nan))
    assert "positive" in _cli_error(tmp_path, "--duration", "0")
    text = tmp_path / "text.npz"
    text.write_text("not an archive")
    assert "cannot read" in _cli_error(tmp_path, "--weights", str(text))
    assert "no such file" in _cli_error(tmp_path, "--weights", str(tmp_path / "missing.npz"))
    assert "checkpoint" in _cli_error(tmp_path, "--checkpoint", str(text))
    assert "--sizes" in _cli_error(tmp_path, "--sizes", "40,x")
    assert "is a file, not a directory" in _cli_error(tmp_path, "--log", str(text / "log.h5"))


def adaptive(seed, target=90.0, **extra):
    config = PhaseConfig(
        duration=3 * DURATION, seed=seed, estimator="ols", schedule="adaptive", target=target
    )  # six 10 s segments at most: the same program as the other tests
    return FeedbackPhase(SIZES, replace(config, **extra), progress=False)


def test_adaptive_schedule_follows_the_criterion_reproduces_and_survives_resume():
    weights, feedbacks = weights_and_feedbacks()
    first = adaptive(3)
    one, two = first.run(weights, feedbacks), first.run(weights, feedbacks)
    for result in (one, two):
        assert [fc for fc, _, _ in result.schedule[:2]] == [0, 1]  # every layer once first
        assert result.simulated_s == pytest.approx(60.0)  # target 90 % not reached: the cap
        criteria = {}
        for (fc, _, end), record in zip(result.schedule, result.criterion, strict=True):
            if len(criteria) == 2:  # later segments go to the least certain layer below target
                assert fc == min(criteria, key=lambda layer: (criteria[layer], layer))
            assert record["time"] == end and record["layer"] == f"fc{fc + 1}"
            criteria[fc] = record["predicted_sign_agreement"]
        assert 50 <= min(criteria.values()) and max(criteria.values()) < 90
        # 40 steps per driven neuron (1.6 s of 40 neurons) come before the first segment ends
        assert all(record["trusted"] for record in result.criterion)
    # a fresh phase with the same seed repeats the first, and one resumed from the state after
    # it repeats the second (the estimator statistics, SEs and residual variances carry over)
    again = adaptive(3)
    repeat = again.run(weights, feedbacks)
    assert repeat.schedule == one.schedule and repeat.criterion == one.criterion
    resumed = adaptive(3)
    resumed.load_state_dict(again.state_dict())
    continued = resumed.run(weights, feedbacks)
    assert continued.schedule == two.schedule and continued.criterion == two.criterion
    assert all(np.array_equal(a, b) for a, b in zip(continued.beta, two.beta, strict=True))


def test_adaptive_phase_stops_when_every_layer_is_at_target(tmp_path):
    weights, feedbacks = weights_and_feedbacks()
    result = adaptive(3, target=55.0).run(weights, feedbacks, log_path=tmp_path / "phase.h5")
    layers = [fc for fc, _, _ in result.schedule]
    assert layers[:2] == [0, 1] and result.simulated_s < 60.0  # stopped before the cap
    final = {r["layer"]: r["predicted_sign_agreement"] for r in result.criterion}
    assert min(final.values()) >= 55 and len(final) == 2
    assert all(r["predicted_sign_agreement"] < 55 for r in result.criterion[:-1][2:])
    with open_log(tmp_path / "phase.h5") as log:
        assert log.schedule_kind() == "adaptive"
        np.testing.assert_array_equal(log.schedule()["layer"], layers)
        stored = log.criterion()["predicted_sign_agreement"]
        assert stored.tolist() == [r["predicted_sign_agreement"] for r in result.criterion]
    with pytest.raises(UserError, match="needs estimator 'ols'"):
        adaptive(3, estimator="lms")


def test_adaptive_schedule_ranks_layers_whose_errors_are_not_yet_trusted():
    phase, nan = adaptive(0), float("nan")  # target 90 %, six segments
    # fc1's SEs are not trusted yet (no criterion), but they say it is further than fc2
    assert phase.next_segment([(0,), (1,)], [nan, 70.0], [85.0, 70.0]) == (1,)
    # fc2 is at target: fc1 goes next, its untrusted 95 % cannot stop it
    assert phase.next_segment([(0,), (1,), (1,)], [nan, 95.0], [95.0, 95.0]) == (0,)
    both_at_target = [92.0, 95.0]
    assert phase.next_segment([(0,), (1,), (1,), (0,)], both_at_target, both_at_target) is None
    assert phase.next_segment([(0,), (1,)], [nan, 70.0]) == (0,)  # without ranks: 50 %
    assert phase.next_segment([(0,), (1,)], [60.0, 70.0], [60.0, 70.0]) == (0,)  # least certain


def test_adaptive_schedule_estimates_layers_two_apart_together():
    sizes = [40, 20, 10, 5]  # fc1 and fc3 share no layer: 0 -> 1 and 2 -> 3
    config = PhaseConfig(duration=90.0, estimator="ols", schedule="adaptive", target=90.0)
    phase, nan = FeedbackPhase(sizes, config, progress=False), float("nan")
    assert phase.segment_plan() == (10.0, 9)
    # first every layer once: fc1 with fc3, then fc2 alone
    assert phase.next_segment([], [nan] * 3) == (0, 2)
    assert phase.next_segment([(0, 2)], [60.0, nan, 70.0]) == (1,)
    # fc3 (least certain) is chosen and fc1 joins it; fc2 cannot join either
    assert phase.next_segment([(0, 2), (1,)], [70.0, 60.0, 55.0]) == (0, 2)
    assert phase.next_segment([(0, 2), (1,)], [60.0, 70.0, 80.0]) == (0, 2)
    # fc2 the least certain: alone; fc1 and fc3 at target and the phase stops there
    assert phase.next_segment([(0, 2), (1,)], [95.0, 70.0, 92.0]) == (1,)
    # a layer at target does not join when the phase stops at target
    assert phase.next_segment([(0, 2), (1,)], [60.0, 95.0, 92.0]) == (0,)
    # spending the whole budget (the trainer), a layer never falls a segment behind an even split
    budget = FeedbackPhase(sizes, replace(config, stop_at_target=False), progress=False)
    segments, criteria = [], [60.0, 95.0, 70.0]  # fc2 is far ahead, never the least certain
    while (chosen := budget.next_segment(segments, criteria)) is not None:
        segments.append(chosen)
    assert segments == [(0, 2), (1,), (0, 2), (0, 2), (0, 2), (1,), (0, 2), (0, 2), (1,)]
    # and every layer joins, at target or not
    assert budget.next_segment([(0, 2), (1,)], [95.0, 60.0, 95.0]) == (1,)
    assert budget.next_segment([(0, 2), (1,)], [60.0, 95.0, 95.0]) == (0, 2)
    # the reference schedule drives one layer at a time (METHOD 3)
    reference = FeedbackPhase(sizes, replace(config, schedule="reference"), progress=False)
    assert reference.next_segment([], [nan] * 3) == (0,)
    assert reference.next_segment([(0,)] * 3, [nan] * 3) == (1,)


def test_layers_driven_together_see_what_they_see_alone(tmp_path):
    from spikealign.lif import scaled_weights

    sizes = [40, 20, 10, 5]  # fc1 (layers 0 -> 1) and fc3 (2 -> 3) share no layer
    weights = kaiming_uniform(sizes, np.random.default_rng(1))
    config = PhaseConfig(
        duration=30.0, seed=4, estimator="ols", schedule="adaptive", target=99.0
    )  # three 10 s segments
    phase = FeedbackPhase(sizes, config, progress=False)
    program = phase.program()
    scaled = [scaled_weights(w, config.drive_gain) for w in weights]
    state = program.initial_state()
    both, _ = program.run_segment(scaled, state, (0, 2), 4, 0.0)
    for alone_layers, layers in (((0,), (0, 1)), ((2,), (2, 3))):
        alone, _ = program.run_segment(scaled, state, alone_layers, 4, 0.0)
        for layer in layers:  # the same noise (counter-based), the same spikes
            assert len(alone.spike_times[layer]) >= 10
            np.testing.assert_array_equal(alone.spike_times[layer], both.spike_times[layer])
            np.testing.assert_array_equal(alone.spike_indices[layer], both.spike_indices[layer])
        driven = alone_layers[0]
        assert len(both.windows[driven]) > 100
        for column in ("neuron", "start", "end", "u_max", "spikes"):
            np.testing.assert_array_equal(
                getattr(alone.windows[driven], column), getattr(both.windows[driven], column)
            )

    result = phase.run(weights, log_path=tmp_path / "phase.h5")
    assert result.schedule[:3] == [(0, 0.0, 10.0), (2, 0.0, 10.0), (1, 10.0, 20.0)]
    seconds = result.seconds_per_layer()  # fc1 and fc3 always go together here
    assert result.simulated_s == 30.0 and seconds[0] == seconds[2] and sum(seconds) > 30.0
    assert [r["layer"] for r in result.criterion[:3]] == ["fc1", "fc3", "fc2"]
    with open_log(tmp_path / "phase.h5") as log:
        np.testing.assert_array_equal(log.schedule()["layer"], [fc for fc, _, _ in result.schedule])
        assert log.simulated_seconds("L3") == 30.0
        assert len(log.windows("L2")["neuron"]) == result.windows[2]


def test_untrusted_layers_are_ranked_by_their_untrusted_errors_but_never_stop():
    from spikealign.rdd import RDDParams

    weights, feedbacks = weights_and_feedbacks()
    never = adaptive(3, target=55.0, rdd=RDDParams(se_min_steps_per_neuron=1e9))
    always = adaptive(3, target=99.0, rdd=RDDParams(se_min_steps_per_neuron=0.0))
    gated, ungated = never.run(weights, feedbacks), always.run(weights, feedbacks)
    # the gated phase runs to the cap (no layer is ever at target) along the ungated phase's
    # schedule, whose criteria are exactly the gated phase's ranks
    assert gated.simulated_s == pytest.approx(60.0) and gated.schedule == ungated.schedule
    assert all(not r["trusted"] and r["predicted_sign_agreement"] == 50 for r in gated.criterion)
    assert all(r["trusted"] and r["predicted_sign_agreement"] > 50 for r in ungated.criterion)
    # ranked at 50 % (a tie: the lowest fc) fc1 would have taken every later segment
    assert 1 in [fc for fc, _, _ in gated.schedule[2:]]


def test_noise_period_is_a_phase_parameter(tmp_path, monkeypatch):
    from spikealign.lif import LIFParams

    with pytest.raises(UserError, match="noise period"):
        PhaseConfig(lif=LIFParams(noise_period=0.0)).validate()
    assert "noise period" in _cli_error(tmp_path, "--noise-period", "0")
    seen = []
    monkeypatch.setattr(rdd_phase, "FeedbackPhase", lambda sizes, config, **_: seen.append(config))
    with pytest.raises(AttributeError):  # stops at the stand-in phase, after the config is made
        rdd_phase.main(["--noise-period", "0.01", "--no-progress"])
    assert seen[0].lif.noise_period == 0.01


def test_drive_gain_scales_the_spiking_weights():
    from spikealign.lif import scaled_weights

    weights, _ = weights_and_feedbacks()
    half = scaled_weights(weights[0], 0.1)
    assert np.allclose(half, 0.1 * 40 * weights[0] / weights[0].std())
    with pytest.raises(UserError, match="drive gain"):
        PhaseConfig(drive_gain=0.0).validate()


def test_the_next_segment_is_guessed_from_each_layers_last_gain():
    # while fc1 and fc3 are estimated, the segment after is guessed: fc1 gained 6 points last
    # time, so it will pass fc2; fc3 has no gain yet, so it is taken not to be the least certain
    config = PhaseConfig(duration=60.0, estimator="ols", schedule="adaptive")
    phase = FeedbackPhase([40, 20, 10, 5], config, progress=False)
    segments, unknown = [(0, 2), (1,), (0, 2)], [math.nan] * 3
    ranks, gains = [70.0, 75.0, 72.0], [6.0, 2.0, math.nan]
    expected = expected_ranks(ranks, gains, (0, 2))
    assert expected == [76.0, 75.0, math.inf]
    assert phase.next_segment(segments, unknown, ranks) == (0, 2)  # the ranks before
    assert phase.next_segment(segments, unknown, expected) == (1,)
