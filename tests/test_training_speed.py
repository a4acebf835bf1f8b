"""Tests of the trainer's fast paths: data on the device, --rdd-overlap, --compile.

Runs are tiny (digits, or 12 Fashion-MNIST-format images, CPU). The spiking phase is replaced by a
recording stand-in (``RecordingPhase``), so the overlap schedule is checked without Brian2: which
weights each phase saw and which phase's feedback each epoch trained with. ``--compile`` is traced
with the ``aot_eager`` backend (dynamo and AOTAutograd, where graph breaks and the custom autograd
Functions' tracing happen, without inductor's code generation, which takes minutes on 2 cores);
the benchmark runs the inductor. Precision: CPU float32; eager and compiled runs agree to 1e-5.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spikealign import feedback, models, spikelog
from spikealign.errors import UserError
from spikealign.phase_process import PhaseProcess
from spikealign.trainer import TrainConfig, classify, epoch_seed
from tests.test_data import write_fashion_mnist

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(dataset="digits", limit_train=128, limit_test=64, batch_size=32, device="cpu")


@pytest.fixture(autouse=True)
def no_figures(monkeypatch):
    """The figures at the end of a run are tested in test_trainer; here they only cost time."""
    monkeypatch.setattr(classify.Training, "finish", lambda self: None)


def state_equal(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(
        torch.equal(first[key], second[key]) for key in first
    )


def without_times(rows):
    return [{k: v for k, v in row.items() if k not in ("phase_s", "epoch_s")} for row in rows]


def test_device_data_resume_is_exact_with_augmentation(tmp_path):
    write_fashion_mnist(tmp_path / "data")
    config = TrainConfig(
        dataset="fashion-mnist", rule="fa", data_dir=str(tmp_path / "data"), batch_size=4,
        epochs=3, device="cpu",
    )  # fmt: skip
    run = classify.Training(config, tmp_path / "a", progress=False)
    assert run.loader_kind == "device"
    assert run.train_loader.dataset.augments  # crop and flip on the device

    rows = classify.train(config, tmp_path / "a", progress=False)
    classify.train(replace(config, epochs=1), tmp_path / "b", progress=False)
    resumed = classify.train(config, tmp_path / "b", resume=True, progress=False)
    assert without_times(resumed) == without_times(rows)
    final = [torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in "ab"]
    assert state_equal(final[0]["model"], final[1]["model"])
    assert state_equal(final[0]["optimizer"]["state"][0], final[1]["optimizer"]["state"][0])

    # the per-image path stays available and trains on the same examples
    per_image = classify.Training(replace(config, loader="dataloader"), tmp_path / "c", False)
    assert per_image.loader_kind == "dataloader" and per_image.train_loader.num_workers >= 0


def test_loader_device_refused_for_data_read_per_image(tmp_path, monkeypatch):
    config = TrainConfig(**SMALL, rule="fa", loader="device")
    monkeypatch.setattr(classify.device_data, "device_dataset", lambda *args, **kwargs: None)
    with pytest.raises(UserError, match="--loader device: digits cannot be held on cpu"):
        classify.Training(config, tmp_path, progress=False)


def test_config_checks_the_new_fields():
    for changes, message in (
        (dict(rule="fa", rdd_overlap=True), "rdd_overlap applies to rule rdd only"),
        (dict(rule="fa", compile="fast"), "unknown compile mode 'fast'"),
        (dict(rule="fa", loader="gpu"), "unknown loader 'gpu'"),
        (dict(rule="fa", workers=-1), "workers must not be negative"),
    ):
        with pytest.raises(UserError, match=message):
            TrainConfig(**SMALL, **changes).validate()


# ------------------------------------------------------------------ --rdd-overlap


@dataclass
class _Config:
    seed: int = 0
    run_seed: int = 0
    epochs: int = 4
    sleep_s: float = 0.05  # long enough that the training loop runs meanwhile
    fail_at: int | None = None  # the epoch whose phase raises fail_with("phase failed")
    fail_with: type = RuntimeError
    slow_at: int | None = None  # the epoch whose phase takes a minute


class RecordingPhase:
    """Stands in for FeedbackPhase: records what it saw, returns feedback marking its epoch.

    With --rdd-overlap it runs in the phase process, built there from (sizes, config, cache dir)
    and the state of the trainer's copy, as FeedbackPhase is; what it saw comes back in its state.
    """

    def __init__(self, sizes, config, cache_dir=None, progress=False):
        self.sizes, self.config, self.cache_dir, self.progress = (
            list(sizes),
            config,
            cache_dir,
            progress,
        )
        self.epoch_of_seed = {
            epoch_seed(config.run_seed, e): e for e in range(1, config.epochs + 2)
        }
        self.seen: dict[int, list[np.ndarray]] = {}
        self.calls = 0
        self.pids: list[int] = []  # the process of each run

    def run(self, weights, feedbacks, log_path):
        epoch = self.epoch_of_seed[self.config.seed]
        if epoch == self.config.fail_at:
            raise self.config.fail_with("phase failed")
        time.sleep(60 if epoch == self.config.slow_at else self.config.sleep_s)
        self.seen[epoch] = [w.copy() for w in weights]
        self.calls += 1
        self.pids.append(os.getpid())
        return _Result([np.full_like(f, 0.01 * epoch) for f in feedbacks])

    def state_dict(self):
        state = {"calls": np.array([self.calls]), "pids": np.array(self.pids, dtype=np.int64)}
        for epoch, weights in self.seen.items():
            state.update({f"seen.{epoch}.{i}": w for i, w in enumerate(weights)})
        return state

    def load_state_dict(self, state):
        self.calls = int(state["calls"][0])
        self.pids = [int(pid) for pid in state["pids"]]
        self.seen = {}
        for key in sorted(k for k in state if k.startswith("seen.")):
            _, epoch, _ = key.split(".")
            self.seen.setdefault(int(epoch), []).append(np.asarray(state[key]))


@dataclass
class _Result:
    feedbacks: list


@pytest.fixture
def recording(monkeypatch):
    """Training runs with RecordingPhase; returns {"phase": ..., "start": {epoch: (W, Y)}};
    ``record["phase_config"]`` (a dict of _Config fields) is read when the phase is made."""
    record: dict = {"start": {}, "phase_config": {}}

    def make_phase(self):
        fc1, fc2, fc3 = (layer for _, layer in models.fc_layers(self.model))
        sizes = [fc1.in_features, fc1.out_features, fc2.out_features, fc3.out_features]
        config = _Config(
            run_seed=self.config.seed, epochs=self.config.epochs, **record["phase_config"]
        )
        record["phase"] = RecordingPhase(sizes, config)
        return record["phase"]

    train_epoch = classify.Training.train_epoch

    def recording_train_epoch(self, epoch):
        layers = [layer for _, layer in models.fc_layers(self.model)]
        record["start"][epoch] = (
            [layer.weight.detach().double().numpy().copy() for layer in layers],
            [layer.feedback.detach().clone() for layer in layers],
        )
        return train_epoch(self, epoch)

    monkeypatch.setattr(classify.Training, "_make_phase", make_phase)
    monkeypatch.setattr(classify.Training, "train_epoch", recording_train_epoch)
    return record


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize(("overlap", "every"), [(False, 1), (True, 1), (True, 2)])
def test_each_phase_feeds_its_epoch_from_the_right_weights(recording, tmp_path, overlap, every):
    config = TrainConfig(**SMALL, rule="rdd", epochs=4, rdd_every=every, rdd_overlap=overlap)
    rows = classify.train(config, tmp_path, progress=False)
    phase, start = recording["phase"], recording["start"]
    due = [e for e in range(1, 5) if (e - 1) % every == 0]
    # with overlap the phase for epoch 5 has run too, so that a longer resumed run is exact
    assert sorted(phase.seen) == due + ([5] if overlap and 4 % every == 0 else [])
    for epoch in range(1, 5):
        last_phase = max(e for e in due if e <= epoch)
        for feedback_used in start[epoch][1]:  # trained with the feedback of its own phase
            assert torch.all(feedback_used == 0.01 * last_phase)
    for epoch in due:
        # without overlap the phase sees the weights at the start of its epoch; with overlap
        # those at the start of the epoch before (it runs during that epoch); epoch 1: initial
        seen_at = epoch - 1 if overlap and epoch > 1 else epoch
        for seen, weight in zip(phase.seen[epoch], start[seen_at][0], strict=True):
            assert np.array_equal(seen, weight)
    assert all(row["phase_s"] > 0 for row in rows if row["epoch"] in due)
    # with overlap every phase after the first ran in one other process, gone after the run
    background = set(phase.pids[1:]) if overlap else set()
    assert (len(background), os.getpid() in background) == ((1, False) if overlap else (0, False))
    assert all(process_gone(pid) for pid in background)


def test_overlap_resume_is_exact(recording, tmp_path):
    config = TrainConfig(**SMALL, rule="rdd", epochs=3, rdd_overlap=True)
    rows = classify.train(config, tmp_path / "a", progress=False)
    classify.train(replace(config, epochs=2), tmp_path / "b", progress=False)
    checkpoint = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert checkpoint["pending_phase"]["epoch"] == 3  # computed during epoch 2, applied at 3
    resumed = classify.train(config, tmp_path / "b", resume=True, progress=False)
    # the resumed run applies the stored feedback of epoch 3 and simulates only epoch 4's (in a
    # phase process of its own); what the phases saw before comes with the checkpoint's state
    phase = recording["phase"]
    assert sorted(phase.seen) == [1, 2, 3, 4] and phase.calls == 4
    first, second, third, resumed_phase = phase.pids  # epoch 1's phase ran in the trainer
    assert first == os.getpid() and second == third != first and resumed_phase not in phase.pids[:3]
    assert without_times(resumed) == without_times(rows)
    final = [torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in "ab"]
    assert state_equal(final[0]["model"], final[1]["model"])


# ------------------------------------------------------------------ --compile


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(classify, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("rule", ["fa", "rdd_layers"])
def test_converted_net_traces_without_graph_breaks(rule):
    torch.manual_seed(0)
    rules = classify.RDD_LAYER_RULES if rule == "rdd_layers" else rule
    model = feedback.convert(models.paper_convnet(1, 28, 10), rules).train()
    inputs, targets = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda x, y: F.cross_entropy(model(x), y))(inputs, targets)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


@pytest.mark.parametrize("rule", ["bp", "usf"])
def test_compiled_training_equals_eager(aot_eager, tmp_path, rule):
    config = TrainConfig(**SMALL, rule=rule, epochs=1)
    eager = classify.train(config, tmp_path / "eager", progress=False)
    compiled = classify.train(replace(config, compile="default"), tmp_path / "c", progress=False)
    for key, value in without_times(eager)[0].items():
        assert compiled[0][key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    states = [torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("eager", "c")]
    for key, value in states[0]["model"].items():
        torch.testing.assert_close(states[1]["model"][key], value, rtol=1e-5, atol=1e-6)


def test_compile_refuses_dfa(tmp_path):
    with pytest.raises(UserError, match="--compile does not support rule dfa"):
        classify.Training(TrainConfig(**SMALL, rule="dfa", compile="default"), tmp_path, False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_keeps_data_and_metrics_on_the_device(tmp_path):
    """float32 on CUDA (cuDNN may use TF32): a run trains from device data with fused SGD."""
    config = TrainConfig(**{**SMALL, "device": "cuda"}, rule="fa", epochs=2)
    run = classify.Training(config, tmp_path, progress=False)
    assert run.loader_kind == "device" and run.train_loader.dataset.images.is_cuda
    assert run.optimizer.defaults["fused"]
    rows = classify.train(config, tmp_path, progress=False)
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    assert 0 <= rows[1]["test_error"] <= 1


@pytest.mark.parametrize("error", [RuntimeError, UserError])
def test_an_error_in_the_background_phase_reaches_the_run(recording, tmp_path, error):
    recording["phase_config"] = {"fail_at": 2, "fail_with": error}  # the phase run during epoch 1
    config = TrainConfig(**SMALL, rule="rdd", epochs=2, rdd_overlap=True)
    with pytest.raises(error, match="^phase failed$"):
        classify.train(config, tmp_path, progress=False)
    assert sorted(recording["start"]) == [1]  # epoch 2 never started
    assert not multiprocessing.active_children()  # the phase process has ended


def test_an_interrupted_epoch_stops_the_background_phase(recording, tmp_path, monkeypatch):
    # the phase of epoch 3 would take a minute; Ctrl-C (KeyboardInterrupt) during epoch 2
    recording["phase_config"] = {"slow_at": 3}
    train_epoch = classify.Training.train_epoch

    def interrupted(self, epoch):
        if epoch == 2:
            time.sleep(0.5)  # the phase is under way
            raise KeyboardInterrupt
        return train_epoch(self, epoch)

    monkeypatch.setattr(classify.Training, "train_epoch", interrupted)
    config = TrainConfig(**SMALL, rule="rdd", epochs=3, rdd_overlap=True)
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        classify.train(config, tmp_path, progress=False)
    assert time.perf_counter() - start < 30  # not the minute of the slow phase
    assert not multiprocessing.active_children()
    (worker,) = set(recording["phase"].pids) - {os.getpid()}  # ran epoch 2's phase
    assert process_gone(worker)


class InProcessPhase:
    """PhaseProcess's stand-in with the thread version's computation: the trainer's own phase
    object runs on the same matrices in this process (at start: timing cannot matter)."""

    def start(self, phase, weights, feedbacks, log_path):
        start = time.perf_counter()
        result = phase.run(weights=weights, feedbacks=feedbacks, log_path=log_path)
        self.job = (result.feedbacks, time.perf_counter() - start)

    def result(self, phase):
        return self.job

    def close(self, stop=False):
        pass


def test_overlapped_phases_in_their_process_equal_phases_run_in_the_trainer(tmp_path, monkeypatch):
    """The real FeedbackPhase (Brian2): feedback, estimator state, metrics and logs of an
    overlapped run are those of the same run with its phases run in the trainer's process."""
    config = TrainConfig(**SMALL, rule="rdd", epochs=2, rdd_time=0.6, rdd_overlap=True)
    rows = classify.train(config, tmp_path / "process", progress=False)
    monkeypatch.setattr(classify, "PhaseProcess", InProcessPhase)
    reference = classify.train(config, tmp_path / "trainer", progress=False)
    assert without_times(rows) == without_times(reference)
    ours, theirs = (
        torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
        for name in ("process", "trainer")
    )
    assert state_equal(ours["model"], theirs["model"])
    assert state_equal(ours["phase"], theirs["phase"])  # estimator state came back exactly
    pending = [ours["pending_phase"], theirs["pending_phase"]]
    assert pending[0]["epoch"] == pending[1]["epoch"] == 3
    assert all(map(torch.equal, pending[0]["feedbacks"], pending[1]["feedbacks"]))
    for epoch in (1, 2, 3):  # 2 and 3 written by the phase process
        logs = [
            tmp_path / name / "spikes" / f"epoch_{epoch:03d}.h5" for name in ("process", "trainer")
        ]
        with spikelog.open_log(logs[0]) as log, spikelog.open_log(logs[1]) as reference_log:
            assert log.complete and log.spike_count(0) == reference_log.spike_count(0) > 0
            for layer in ("fc1", "fc2", "fc3"):
                ours_y, theirs_y = log.weights(layer), reference_log.weights(layer)
                assert np.array_equal(ours_y["Y_after"], theirs_y["Y_after"]), (epoch, layer)


def test_a_user_error_in_the_phase_process_is_raised_as_is():
    from spikealign.phase import FeedbackPhase, PhaseConfig

    phase = FeedbackPhase([6, 4, 2], PhaseConfig(duration=2.0), progress=False)
    wrong = [np.zeros((4, 5)), np.zeros((2, 4))]  # fc1 takes 6 inputs
    with pytest.raises(UserError) as in_trainer:
        phase.run(wrong)
    process = PhaseProcess()
    try:
        process.start(phase, wrong, None, None)
        with pytest.raises(UserError) as in_process:
            process.result(phase)
    finally:
        process.close()
    assert str(in_process.value) == str(in_trainer.value)


def test_a_phase_process_that_dies_is_one_line_error():
    phase = RecordingPhase([2, 2], _Config(seed=epoch_seed(0, 1), epochs=1, slow_at=1))
    process = PhaseProcess()
    try:
        process.start(phase, [np.zeros((2, 2))], [np.zeros((2, 2))], None)
        deadline = time.monotonic() + 60
        while not multiprocessing.active_children() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)
        with pytest.raises(UserError, match="process ended unexpectedly.*--resume"):
            process.result(phase)
    finally:
        process.close()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_the_phase_process_ends_when_the_trainer_is_killed(tmp_path):
    # a trainer whose phase takes a minute, killed with SIGKILL (no Python code of it runs)
    code = (
        "import multiprocessing, time, numpy as np\n"
        "from spikealign.phase_process import PhaseProcess\n"
        "from spikealign.trainer import epoch_seed\n"
        "from tests.test_training_speed import RecordingPhase, _Config\n"
        "phase = RecordingPhase([2, 2], _Config(seed=epoch_seed(0, 1), epochs=1, slow_at=1))\n"
        "process = PhaseProcess()\n"
        "process.start(phase, [np.zeros((2, 2))], [np.zeros((2, 2))], None)\n"
        "while not multiprocessing.active_children(): time.sleep(0.05)\n"
        "print(multiprocessing.active_children()[0].pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    trainer = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        worker = int(trainer.stdout.readline())
        time.sleep(2)  # the job has begun (or is about to)
        assert _alive(worker)
    finally:
        trainer.kill()
        trainer.wait()
        trainer.stdout.close()
    deadline = time.monotonic() + 15
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker)
