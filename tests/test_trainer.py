"""Tests of the trainer (spikealign.trainer, python -m training.run / training.plot).

Runs are tiny (digits, 256 training / 128 test examples, batch 32, CPU); the runs several tests read
are made once per module. The rdd rule runs only through the command line, in subprocesses: its
spiking phase needs a Brian2 build per network shape (cached in the user cache dir: a minute or two
the first time), then some seconds to load it in each process.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from torch import nn

from spikealign import data, spikelog, trainer
from spikealign.errors import UserError
from spikealign.trainer import FC_LAYERS, TrainConfig
from training import plot as plot_cli
from training import run as run_cli

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(dataset="digits", limit_train=256, limit_test=128, batch_size=32, device="cpu")
SMALL_FLAGS = ["--dataset", "digits", "--limit-train", "256", "--limit-test", "128",
               "--batch-size", "32", "--device", "cpu", "--no-progress"]  # fmt: skip
TIME_COLUMNS = ("phase_s", "epoch_s")
PNG_MAGIC = b"\x89PNG"


def small_config(rule: str, epochs: int = 1, **changes) -> TrainConfig:
    return TrainConfig(rule=rule, epochs=epochs, **{**SMALL, **changes})


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def without_times(rows: list[dict]) -> list[dict]:
    """Rows without wall times; NaN (undefined alignment) as None, so equal rows compare equal."""
    return [
        {k: None if v != v else v for k, v in row.items() if k not in TIME_COLUMNS} for row in rows
    ]


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def load_checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / trainer.CHECKPOINT_FILE, weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """bp 1 epoch; fa 2 epochs straight; fa 1 epoch then resumed to 2 (command line, in process)."""
    root = tmp_path_factory.mktemp("runs")
    dirs = {name: root / name for name in ("bp", "fa", "fa_resumed")}
    trainer.train(small_config("bp"), dirs["bp"], progress=False)
    trainer.train(small_config("fa", epochs=2), dirs["fa"], progress=False)
    run_cli.main([*SMALL_FLAGS, "--rule", "fa", "--epochs", "1", "--out", str(dirs["fa_resumed"])])
    run_cli.main(["--resume", "--epochs", "2", "--no-progress", "--out", str(dirs["fa_resumed"])])
    return dirs


def check_run_files(run_dir: Path, epochs: int) -> list[dict]:
    """Files of a finished single-label run; returns the metrics.jsonl rows."""
    for name in ("config.json", "metrics.csv", "metrics.jsonl", "checkpoint.pt"):
        assert (run_dir / name).is_file(), name
    for name in ("error.png", "alignment.png"):
        assert (run_dir / name).read_bytes()[:4] == PNG_MAGIC, name
    rows = read_rows(run_dir)
    csv_rows = read_csv(run_dir / "metrics.csv")
    columns = trainer.metric_columns(multilabel=False)
    assert list(csv_rows[0]) == columns and list(rows[0]) == columns
    assert [row["epoch"] for row in rows] == list(range(1, epochs + 1))
    for row, csv_row in zip(rows, csv_rows, strict=True):
        assert all(float(csv_row[key]) == pytest.approx(row[key]) for key in columns)
        assert 0.0 <= row["train_error"] <= 1.0 and 0.0 <= row["test_error"] <= 1.0
        assert row["train_loss"] > 0 and row["test_loss"] > 0
        assert row["epoch_s"] > 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["epochs"] == epochs and config["dataset"] == "digits"
    return rows


def test_bp_run_writes_files_and_true_test_figures(runs):
    rows = check_run_files(runs["bp"], epochs=1)
    # Backprop's feedback is the weight itself: perfect alignment.
    for layer in FC_LAYERS:
        assert rows[0][f"{layer}_angle_deg"] == pytest.approx(0.0, abs=1e-3)
        assert rows[0][f"{layer}_sign_agreement"] == pytest.approx(100.0)
    assert rows[0]["phase_s"] == 0.0
    # The logged test loss / error are cross-entropy on the logits and top-1 error of the
    # checkpointed model on the test subset, recomputed here by hand.
    config = small_config("bp")
    bundle = data.load_dataset("digits", augment=False)
    model = trainer.build_model(config, bundle)
    model.load_state_dict(load_checkpoint(runs["bp"])["model"])
    model.eval()
    test_set = trainer._subset(bundle.test, config.limit_test)
    images, labels = (torch.stack(items) for items in zip(*test_set, strict=True))
    with torch.no_grad():
        logits = model(images)
    log_probs = logits - logits.logsumexp(dim=1, keepdim=True)
    loss = -log_probs[torch.arange(len(labels)), labels].mean().item()
    error = (logits.argmax(dim=1) != labels).float().mean().item()
    assert rows[0]["test_loss"] == pytest.approx(loss, rel=1e-5)
    assert rows[0]["test_error"] == pytest.approx(error)
    assert len(labels) == 128


def test_fa_run_keeps_fixed_random_feedback(runs):
    rows = check_run_files(runs["fa"], epochs=2)
    for row in rows:
        for layer in FC_LAYERS:
            assert 0.0 < row[f"{layer}_angle_deg"] < 180.0
            assert 0.0 <= row[f"{layer}_sign_agreement"] <= 100.0
            assert row[f"{layer}_norm_ratio"] > 0
    # fa feedback is fixed: the checkpoint holds the feedback drawn at initialisation.
    config = small_config("fa")
    initial = trainer.build_model(config, data.load_dataset("digits")).state_dict()
    final = load_checkpoint(runs["fa"])["model"]
    for layer in FC_LAYERS:
        assert torch.equal(final[f"{layer}.feedback"], initial[f"{layer}.feedback"])
        assert not torch.equal(final[f"{layer}.weight"], initial[f"{layer}.weight"])


def test_resume_ends_exactly_like_an_uninterrupted_run(runs):
    straight, resumed = runs["fa"], runs["fa_resumed"]
    resumed_rows = read_rows(resumed)
    assert len(resumed_rows) == 2
    assert without_times(resumed_rows) == without_times(read_rows(straight))
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    assert a["epoch"] == b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for slot_a, slot_b in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        assert torch.equal(slot_a["momentum_buffer"], slot_b["momentum_buffer"])


def test_feedback_decay_shrinks_fixed_feedback_after_every_step(tmp_path):
    decay, steps = 0.1, 64 // 32
    config = small_config("fa", limit_train=64, lr=0.0, feedback_decay=decay)
    trainer.train(config, tmp_path, progress=False)
    initial = trainer.build_model(config, data.load_dataset("digits")).state_dict()
    final = load_checkpoint(tmp_path)["model"]
    for layer in FC_LAYERS:
        expected = initial[f"{layer}.feedback"] * (1 - decay) ** steps
        torch.testing.assert_close(final[f"{layer}.feedback"], expected, rtol=1e-6, atol=0)
        assert torch.equal(final[f"{layer}.weight"], initial[f"{layer}.weight"])  # lr 0


def test_mean_average_precision_by_hand():
    scores = np.array([[0.9, 0.1, 0.3], [0.8, 0.7, 0.2], [0.1, 0.2, 0.9]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0]], dtype=float)
    # class 0: ranking 0.9 (+), 0.8 (-), 0.1 (+) -> AP = (1/1 + 2/3) / 2; class 1: AP = 1;
    # class 2 has no positive and is left out.
    assert trainer.mean_average_precision(scores, targets) == pytest.approx((5 / 6 + 1) / 2)
    # Ignoring image 1 for class 0 (VOC "difficult") leaves a perfect ranking there.
    ignore = np.zeros_like(targets, dtype=bool)
    ignore[1, 0] = True
    assert trainer.mean_average_precision(scores, targets, ignore) == pytest.approx(1.0)
    assert average_precision_score(targets[:, 0], scores[:, 0]) == pytest.approx(5 / 6)


def test_score_keeper_multilabel_mean_loss_and_map():
    keeper = trainer.ScoreKeeper(multilabel=True)
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = nn.BCEWithLogitsLoss()(logits, targets)
    keeper.add(loss, logits, targets)
    mean_loss, score = keeper.result()
    by_hand = -(
        torch.log(torch.sigmoid(torch.tensor([2.0, 1.0, -0.5, 0.3])))
    ).mean()  # log sigmoid of the logit signed by its target
    assert mean_loss == pytest.approx(by_hand.item(), rel=1e-6)
    assert score == pytest.approx(1.0)


def test_epoch_seeds_differ_between_epochs_and_seeds():
    seeds = {trainer.epoch_seed(seed, epoch) for seed in range(5) for epoch in range(1, 50)}
    assert len(seeds) == 5 * 49


def run_command_line(*flags: str) -> None:
    """python -m training.run in a subprocess (a fresh process per Brian2 program load: a second
    load in one process regenerates the program's code and recompiles it)."""
    command = [sys.executable, "-m", "training.run", "--no-progress", *flags]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope="module")
def rdd_run(tmp_path_factory) -> Path:
    """rdd, 2 epochs, through the command line."""
    out = tmp_path_factory.mktemp("rdd") / "straight"
    run_command_line(*SMALL_FLAGS, "--rule", "rdd", "--epochs", "2", "--rdd-time", "0.6",
                     "--out", str(out))  # fmt: skip
    return out


def test_command_line_rdd_run_end_to_end(rdd_run):
    rows = check_run_files(rdd_run, epochs=2)
    assert all(0 < row["phase_s"] < row["epoch_s"] for row in rows)
    checkpoint = load_checkpoint(rdd_run)
    assert checkpoint["phase"] is not None and "feedback_std" in checkpoint["phase"]
    for epoch in (1, 2):
        with spikelog.open_log(rdd_run / "spikes" / f"epoch_{epoch:03d}.h5") as log:
            assert log.complete
            assert log.sizes == (1024, 384, 192, 10)
            assert log.simulated_until == pytest.approx(0.6)
            assert log.spike_count(0) > 0
            last_log_weights = [log.weights(layer) for layer in FC_LAYERS]
    for layer, logged in zip(FC_LAYERS, last_log_weights, strict=True):
        assert not np.array_equal(logged["Y_after"], logged["Y_before"]), layer
        # The last phase set the feedback epoch 2 trained with; learned feedback does not move
        # during forward training (no feedback decay).
        np.testing.assert_allclose(
            checkpoint["model"][f"{layer}.feedback"].numpy(), logged["Y_after"], rtol=1e-6
        )
    # Loading the checkpoint restores the phase's estimator state (no simulation needed).
    run = trainer.Training(small_config("rdd", epochs=2, rdd_time=0.6), rdd_run, progress=False)
    run.load(checkpoint)
    restored = run.phase.state_dict()
    assert restored.keys() == checkpoint["phase"].keys()
    for key, value in checkpoint["phase"].items():
        np.testing.assert_array_equal(restored[key], torch.as_tensor(value).numpy())


def test_rdd_resume_ends_exactly_like_an_uninterrupted_run(rdd_run, tmp_path):
    resumed = tmp_path / "resumed"
    run_command_line(*SMALL_FLAGS, "--rule", "rdd", "--epochs", "1", "--rdd-time", "0.6",
                     "--out", str(resumed))  # fmt: skip
    run_command_line("--resume", "--epochs", "2", "--out", str(resumed))
    assert without_times(read_rows(resumed)) == without_times(read_rows(rdd_run))
    a, b = load_checkpoint(rdd_run), load_checkpoint(resumed)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["phase"]:
        assert torch.equal(torch.as_tensor(a["phase"][key]), torch.as_tensor(b["phase"][key]))


def run_main(main, argv, capsys) -> str:
    """Run an entry point expecting a user error; return its stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_user_errors_are_one_line(runs, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    fa = str(runs["fa"])
    cases = {
        "unknown dataset": [*SMALL_FLAGS, "--dataset", "kmnist", "--rule", "bp", "--out",
                            str(tmp_path / "x")],
        "unknown rule": [*SMALL_FLAGS, "--rule", "magic", "--out", str(tmp_path / "x")],
        "cannot write": [*SMALL_FLAGS, "--rule", "bp", "--out", str(blocker / "run")],
        "nothing to resume": ["--resume", "--out", str(tmp_path / "empty")],
        "another run": ["--resume", "--rule", "bp", "--out", fa],
        "already holds a run": [*SMALL_FLAGS, "--rule", "fa", "--out", fa],
        "required": ["--rule", "fa", "--out", str(tmp_path / "x")],
        "invalid choice": ["--estimator", "bogus", "--out", fa],
        "more than the 1 asked": ["--resume", "--epochs", "1", "--out", fa],
        "only for rule kp": [*SMALL_FLAGS, "--rule", "fa", "--kp-lr", "0.1", "--out",
                             str(tmp_path / "x")],
        "applies to rules fa and rdd": [*SMALL_FLAGS, "--rule", "bp", "--feedback-decay", "0.1",
                                        "--out", str(tmp_path / "x")],
        "needs estimator 'ols'": [*SMALL_FLAGS, "--rule", "rdd", "--schedule", "adaptive",
                                  "--out", str(tmp_path / "x")],
        "drive gain must be": [*SMALL_FLAGS, "--rule", "rdd", "--drive-gain", "-1", "--out",
                               str(tmp_path / "x")],
    }  # fmt: skip
    for needle, argv in cases.items():
        err = run_main(run_cli.main, argv, capsys)
        assert needle in err, (needle, err)
    assert not (tmp_path / "x" / "checkpoint.pt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_one_line_error(tmp_path):
    command = [sys.executable, "-m", "training.run", *SMALL_FLAGS, "--rule", "bp", "--device",
               "cuda", "--out", str(tmp_path / "run")]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: device cuda requested but CUDA is not available")
    assert result.stderr.count("\n") == 1


def test_resume_refuses_other_data(runs, tmp_path, capsys):
    run_dir = tmp_path / "copy"
    run_dir.mkdir()
    for name in ("config.json", "metrics.jsonl", "metrics.csv"):
        (run_dir / name).write_bytes((runs["bp"] / name).read_bytes())
    checkpoint = load_checkpoint(runs["bp"])
    checkpoint["data"]["train_examples"] = 999
    torch.save(checkpoint, run_dir / "checkpoint.pt")
    err = run_main(run_cli.main, ["--resume", "--epochs", "2", "--out", str(run_dir)], capsys)
    assert "data does not match" in err and "999" in err


def test_overwrite_replaces_a_finished_run(runs, tmp_path):
    out = tmp_path / "run"
    config = small_config("bp", limit_train=64)
    trainer.train(config, out, progress=False)
    (out / "spikes").mkdir()
    (out / "spikes" / "epoch_001.h5").write_text("stale")
    rows = trainer.train(config, out, overwrite=True, progress=False)
    assert len(rows) == 1 and not (out / "spikes" / "epoch_001.h5").exists()


def test_plot_overlays_runs_and_prints_table(runs, tmp_path, capsys):
    fig_dir = tmp_path / "figures"
    plot_cli.main([str(runs["bp"]), str(runs["fa"]), "--out", str(fig_dir)])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["run", "rule", "dataset", "epochs", "test"]
    fa_row = read_rows(runs["fa"])[-1]
    assert lines[1].split()[:4] == [str(runs["bp"]), "bp", "digits", "1"]
    assert lines[2].split()[:4] == [str(runs["fa"]), "fa", "digits", "2"]
    assert f"{fa_row['test_error']:.4f}" in lines[2]
    assert f"{fa_row['fc1_angle_deg']:5.1f}".strip() in lines[2]
    for name in ("error.png", "alignment.png"):
        assert (fig_dir / name).read_bytes()[:4] == PNG_MAGIC
    err = run_main(plot_cli.main, [str(tmp_path / "nowhere")], capsys)
    assert "not a training run directory" in err


@pytest.mark.parametrize("rule", ["brsf", "dfa", "wm", "kp"])
def test_rules_with_state_resume_exactly(rule, tmp_path):
    """State a rule keeps (lazily drawn dfa feedback, kp / wm updates, brsf redraws) survives."""
    config = small_config(rule, epochs=2, limit_train=64, limit_test=32)
    straight = trainer.train(config, tmp_path / "straight", progress=False)
    trainer.train(replace(config, epochs=1), tmp_path / "resumed", progress=False)
    resumed = trainer.train(config, tmp_path / "resumed", resume=True, progress=False)
    assert without_times(resumed) == without_times(straight)
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_multilabel_run_uses_bce_and_mean_average_precision(tmp_path, monkeypatch):
    """A VOC-like multi-label bundle (digits images, two-hot targets) stands in for VOC files."""
    digits = data.load_dataset("digits")

    def two_hot(dataset):
        images, labels = (torch.stack(items) for items in zip(*dataset, strict=True))
        targets = torch.zeros(len(labels), 10)
        targets[torch.arange(len(labels)), labels] = 1.0
        targets[torch.arange(len(labels)), (labels + 1) % 10] = 1.0
        return torch.utils.data.TensorDataset(images[:128], targets[:128])

    bundle = data.DatasetBundle(
        train=two_hot(digits.train),
        test=two_hot(digits.test),
        in_channels=1,
        image_size=28,
        num_classes=10,
        multilabel=True,
        class_names=data.DIGIT_CLASSES,
    )
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: bundle)
    config = small_config("fa", dataset="voc", limit_train=None, limit_test=None)
    rows = trainer.train(config, tmp_path, progress=False)
    assert list(rows[0]) == trainer.metric_columns(multilabel=True)
    assert 0.0 < rows[0]["train_map"] <= 1.0
    # test loss and mAP by hand from the checkpointed model
    model = trainer.build_model(config, bundle)
    model.load_state_dict(load_checkpoint(tmp_path)["model"])
    model.eval()
    images, targets = bundle.test.tensors
    with torch.no_grad():
        logits = model(images)
    probabilities = torch.sigmoid(logits)
    loss = -(targets * probabilities.log() + (1 - targets) * (1 - probabilities).log()).mean()
    assert rows[0]["test_loss"] == pytest.approx(loss.item(), rel=1e-4)
    by_class = [average_precision_score(targets[:, k], logits[:, k]) for k in range(10)]
    assert rows[0]["test_map"] == pytest.approx(np.mean(by_class))
    assert trainer.read_run(tmp_path).multilabel


def test_download_only_mode_is_the_command_the_missing_data_error_prints(tmp_path):
    from spikealign.data import FETCH_COMMAND

    command = FETCH_COMMAND.format(name="digits", data_dir=str(tmp_path)).split()
    assert command[:3] == ["python", "-m", "training.run"]
    process = subprocess.run(
        [sys.executable, *command[1:]], capture_output=True, text=True, timeout=120
    )
    assert process.returncode == 0, process.stderr
    assert "digits is in" in process.stdout
    assert not any(tmp_path.iterdir())  # no run directory was made


def test_phase_config_carries_the_schedule_and_spends_the_whole_budget():
    config = small_config("rdd", rdd_time=30.0, estimator="ols", schedule="adaptive", target=85.0)
    config.drive_gain = 0.1
    phase = config.phase_config(seed=5)
    assert (phase.duration, phase.schedule, phase.target, phase.drive_gain, phase.seed) == (
        30.0, "adaptive", 85.0, 0.1, 5,
    )  # fmt: skip
    assert phase.estimator == "ols" and not phase.stop_at_target  # the same rdd_time every epoch
    assert phase.lif.noise_period == 0.1  # METHOD's
    config.noise_period = 0.01
    assert config.phase_config().lif.noise_period == 0.01
    config.noise_period = 0.0
    with pytest.raises(UserError, match="noise period"):
        config.validate()


@pytest.mark.parametrize("kp_lr", [None, 0.05])
def test_kolen_pollack_rate_follows_the_lr_schedule(tmp_path, monkeypatch, kp_lr):
    """B gets the weight's update, so its rate decays with the weights' at each milestone."""
    from spikealign.feedback import FeedbackLinear

    seen = []  # the lr of every kp update, in order
    update = FeedbackLinear.kolen_pollack_update

    def recording(self, lr, weight_decay):
        seen.append(lr)
        return update(self, lr, weight_decay)

    monkeypatch.setattr(FeedbackLinear, "kolen_pollack_update", recording)
    config = small_config("kp", epochs=3, lr=0.02, lr_milestones=[1, 2], lr_gamma=0.5, kp_lr=kp_lr)
    trainer.train(config, tmp_path, progress=False)
    base = 0.02 if kp_lr is None else kp_lr
    per_epoch = len(seen) // 3
    for epoch, expected in enumerate([base, base * 0.5, base * 0.25]):
        assert (
            seen[epoch * per_epoch : (epoch + 1) * per_epoch]
            == [pytest.approx(expected)] * per_epoch
        )


@pytest.mark.parametrize(
    ("module", "argv", "message"),
    [
        ("run", ["--rule", "fa"], "error: --out DIR is required"),
        ("run", ["--dataset", "digits", "--out", "x"], "error: --rule required to start a run"),
        ("run", ["--out", "x"], "error: --dataset and --rule required to start a run"),
        (
            "run",
            [
                "--dataset",
                "digits",
                "--rule",
                "fa",
                "--drive-gain",
                "0.1",
                "--noise-period",
                "0.01",
                "--out",
                "x",
            ],
            "error: --drive-gain, --noise-period: only for rule rdd (the spiking phase), but the "
            "rule is fa",
        ),  # fmt: skip
        ("detect", ["--rule", "fa"], "error: --out DIR is required"),
        ("detect", ["--out", "x"], "error: --rule required to start a run (or pass --resume)"),
    ],
)
def test_entry_points_name_the_missing_flags(module, argv, message, capsys, tmp_path):
    from training import detect as detect_cli

    main = {"run": run_cli.main, "detect": detect_cli.main}[module]
    argv = [str(tmp_path / a) if a == "x" else a for a in argv]
    assert run_main(main, argv, capsys).startswith(message)
    assert not (tmp_path / "x").exists()
