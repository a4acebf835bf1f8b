"""Tests of RetinaNet training (spikealign.trainer.detect, python -m training.detect).

Runs are tiny: the tiny COCO of tests/coco_tiny.py (4 usable training images, 3 validation
images), images resized to at most 48 px, global batch 4 (one step per epoch), on the CPU.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18

from spikealign import detection
from spikealign.trainer import detect
from tests.coco_tiny import write_tiny_coco
from tests.test_distributed import torchrun
from tests.test_trainer import run_main as run_entry_point
from training import detect as detect_cli

TIME_COLUMNS = ("train_s", "eval_s")


def flags(coco_dir, out, *extra) -> list[str]:
    return ["--data-dir", str(coco_dir), "--out", str(out), "--min-size", "32", "--max-size",
            "48", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--no-progress",
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    return write_tiny_coco(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="module")
def full_run(coco_dir, tmp_path_factory):
    """Two epochs of usf in one go."""
    out = tmp_path_factory.mktemp("runs") / "usf"
    detect_cli.main(flags(coco_dir, out, "--rule", "usf", "--epochs", "2"))
    return out


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def without_times(rows):
    return [{k: v for k, v in row.items() if k not in TIME_COLUMNS} for row in rows]


def load_model_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def test_learning_rate_warms_up_then_steps_down():
    config = detect.DetectConfig(rule="fa", lr=0.02, warmup_iterations=4, warmup_factor=0.1)
    lr = [detect.learning_rate(config, 1, i, iterations=100) for i in range(6)]
    # factor 0.1 + 0.9 * i / 4 for i < 4, then 1
    assert lr == pytest.approx([0.002, 0.0065, 0.011, 0.0155, 0.02, 0.02])
    assert detect.learning_rate(config, 2, 0, 100) == 0.02  # warm-up is in epoch 1 only
    assert detect.learning_rate(config, 16, 0, 100) == 0.02
    assert detect.learning_rate(config, 17, 0, 100) == pytest.approx(0.002)
    assert detect.learning_rate(config, 23, 0, 100) == pytest.approx(0.0002)
    # an epoch shorter than the warm-up ends it at its last iteration
    short = [detect.learning_rate(config, 1, i, iterations=3) for i in range(3)]
    assert short == pytest.approx([0.002, 0.011, 0.02])


def test_run_writes_one_ap_column_per_coco_figure(full_run):
    rows = read_csv(full_run / "metrics.csv")
    assert list(rows[0]) == list(detect.METRIC_COLUMNS)
    assert [row["epoch"] for row in rows] == ["1", "2"]
    for row in rows:
        assert math.isfinite(float(row["train_loss"])) and float(row["train_loss"]) > 0
        for key in ("AP", "AP50", "AP75", "APs"):
            assert 0.0 <= float(row[key]) <= 1.0
        assert math.isnan(float(row["APm"])) and math.isnan(float(row["APl"]))  # small boxes only
    config = json.loads((full_run / "config.json").read_text())
    assert config["rule"] == "usf" and config["lr_milestones"] == [16, 22]
    checkpoint = torch.load(full_run / "checkpoint.pt", weights_only=True)
    assert checkpoint["data"] == {"category_ids": [3, 7], "train_images": 4, "test_images": 3}
    state = checkpoint["model"]
    assert "head.classification_head.cls_logits.feedback_magnitude" in state  # converted: all
    assert "backbone.body.conv1.feedback" in state


def test_resume_ends_with_the_numbers_of_an_uninterrupted_run(full_run, coco_dir, tmp_path):
    out = tmp_path / "resumed"
    detect_cli.main(flags(coco_dir, out, "--rule", "usf", "--epochs", "1"))
    detect_cli.main(["--resume", "--epochs", "2", "--out", str(out), "--no-progress"])
    assert without_times(read_csv(out / "metrics.csv")) == without_times(
        read_csv(full_run / "metrics.csv")
    )
    resumed, full = load_model_state(out), load_model_state(full_run)
    assert resumed.keys() == full.keys()
    for key in full:
        assert torch.equal(resumed[key], full[key]), key


def run_main(argv, capsys) -> str:
    """training.detect with ``argv``, expecting a one-line user error; returns its stderr."""
    return run_entry_point(detect_cli.main, argv, capsys)


def test_bad_input_is_one_line_and_writes_nothing(coco_dir, tmp_path, capsys):
    broken = write_tiny_coco(tmp_path / "broken")
    (broken / "annotations" / "instances_val2017.json").write_text('{"images": [')
    no_images = write_tiny_coco(tmp_path / "no_images")
    (no_images / "train2017").rename(no_images / "moved")
    no_json = write_tiny_coco(tmp_path / "no_json")
    (no_json / "annotations" / "instances_train2017.json").unlink()
    r18 = tmp_path / "r18.pt"
    torch.save({"format": 1, "config": {"arch": "resnet18"}, "model": resnet18().state_dict()}, r18)
    out = tmp_path / "out"
    cases = {
        "no image folder": flags(no_images, out, "--rule", "fa"),
        "no annotation file": flags(no_json, out, "--rule", "fa"),
        "not valid json": flags(broken, out, "--rule", "fa"),
        "spiking feedback phase": flags(coco_dir, out, "--rule", "rdd"),
        "one output tensor": flags(coco_dir, out, "--rule", "dfa"),
        "holds a resnet18 model": flags(
            coco_dir, out, "--rule", "usf", "--backbone-checkpoint", str(r18)
        ),
        "nothing to resume": ["--resume", "--out", str(out)],
        "--rule required": flags(coco_dir, out),
        "invalid choice": flags(coco_dir, out, "--rule", "fa", "--convert", "heads"),
        "below min_size": flags(coco_dir, out, "--rule", "fa", "--max-size", "16"),
        "fewer than one batch": flags(coco_dir, out, "--rule", "fa", "--limit-train", "3"),
        "lr must be a finite number": flags(coco_dir, out, "--rule", "fa", "--lr", "nan"),
        "seed must lie in [0, 2**63)": flags(coco_dir, out, "--rule", "fa", "--seed", str(2**70)),
    }
    for needle, argv in cases.items():
        err = run_main(argv, capsys)
        assert needle in err, (needle, err)
        assert not out.exists(), needle


def test_resume_refuses_another_experiment(full_run, capsys):
    err = run_main(["--resume", "--rule", "fa", "--out", str(full_run)], capsys)
    assert "another run" in err and "'usf' in the checkpoint" in err


def test_torchrun_two_processes_keep_identical_parameters(coco_dir, tmp_path):
    out, states = tmp_path / "ddp", tmp_path / "states"
    states.mkdir()
    result = torchrun(
        states, *flags(coco_dir, out, "--rule", "fa", "--epochs", "1"), entry="training.detect"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run written to") == 1  # rank 0 alone reports
    rank0, rank1 = (torch.load(states / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    saved = load_model_state(out)
    torch.manual_seed(0)  # the run's seed: its initial model
    initial = detection.build_retinanet(3, 32, 48).state_dict()
    moved = "head.classification_head.cls_logits.weight"
    assert not torch.equal(initial[moved], rank0[moved])
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
        assert torch.equal(rank0[key], saved[key]), key
    rows = read_csv(out / "metrics.csv")
    assert len(rows) == 1 and math.isfinite(float(rows[0]["train_loss"]))


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                          reason="needs CUDA"))],
)  # fmt: skip
def test_amp_run(coco_dir, tmp_path, device):
    out = tmp_path / device
    argv = flags(coco_dir, out, "--rule", "usf", "--epochs", "1", "--amp")
    argv[argv.index("--device") + 1] = device
    detect_cli.main(argv)
    row = read_csv(out / "metrics.csv")[0]
    assert math.isfinite(float(row["train_loss"])) and 0.0 <= float(row["AP"]) <= 1.0
