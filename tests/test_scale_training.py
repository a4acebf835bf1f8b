"""Training at ImageNet scale on tiny data: resnet18 and alexnet_bn on an ImageFolder of real
JPEGs (2 classes x 4 images, batch 4, one epoch), recipes, the lr schedule, bf16 autocast and
channels_last through the command line, and the one-line errors of issue 9.

Image sizes are the smallest each network takes: 32 for resnet18, 63 for alexnet_bn.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from spikealign import trainer
from spikealign.errors import UserError
from spikealign.trainer import TrainConfig
from tests.test_trainer import read_csv, read_rows, run_main
from tests.tiny_images import write_image_folder
from training import run as run_cli

SIZES = {"resnet18": 32, "alexnet_bn": 63}
RULES = ("bp", "usf", "fa")


def tiny_flags(data_dir, arch: str) -> list[str]:
    return ["--dataset", "imagefolder", "--data-dir", str(data_dir), "--arch", arch,
            "--image-size", str(SIZES[arch]), "--epochs", "1", "--batch-size", "4",
            "--device", "cpu", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("tiny_imagenet"), per_class=4)


@pytest.fixture(scope="module")
def runs(tree, tmp_path_factory):
    """{(arch, rule): run dir}: one epoch each. resnet18/usf goes through the command line with
    the xiao2019 recipe, --amp and --channels-last; the others through trainer.train."""
    root = tmp_path_factory.mktemp("scale_runs")
    dirs = {}
    for arch in SIZES:
        for rule in RULES:
            out = root / f"{arch}-{rule}"
            dirs[arch, rule] = out
            if (arch, rule) == ("resnet18", "usf"):
                run_cli.main([*tiny_flags(tree, arch), "--rule", rule, "--recipe", "xiao2019",
                              "--amp", "--channels-last", "--out", str(out)])  # fmt: skip
                continue
            config = TrainConfig(
                dataset="imagefolder", data_dir=str(tree), arch=arch, rule=rule,
                image_size=SIZES[arch], epochs=1, batch_size=4, device="cpu",
            )  # fmt: skip
            trainer.train(config, out, progress=False)
    return dirs


@pytest.mark.parametrize("arch", list(SIZES))
@pytest.mark.parametrize("rule", RULES)
def test_one_epoch_records_top5_and_every_layers_alignment(runs, arch, rule):
    out = runs[arch, rule]
    (row,) = read_rows(out)
    assert row["epoch"] == 1 and 0 <= row["test_error"] <= 1
    assert row["test_top5_error"] == 0.0  # 2 classes: the target is always among the top 5
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["test_loss"])

    state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    converted = {key.removesuffix(".feedback") for key in state if key.endswith(".feedback")}
    # conv weights are 4-d, linear weights 2-d; the last linear layer stays on backprop
    layers = [key.removesuffix(".weight") for key, value in state.items()
              if key.endswith(".weight") and value.dim() in (2, 4)]  # fmt: skip
    assert converted == set(layers[:-1]) and layers[-1] in ("fc", "classifier.6")
    assert set(row["alignment"]) == converted
    angles = [layer["angle_deg"] for layer in row["alignment"].values()]
    signs = [layer["sign_agreement"] for layer in row["alignment"].values()]
    if rule == "bp":
        assert max(angles) < 1e-3 and min(signs) == 100.0
    elif rule == "usf":
        assert min(signs) == 100.0 and 0 < min(angles) and max(angles) < 90
    else:  # fixed random feedback, after one epoch still close to orthogonal to W
        assert min(angles) > 60 and max(signs) < 80
    assert row["mean_angle_deg"] == pytest.approx(sum(angles) / len(angles))

    (csv_row,) = read_csv(out / "metrics.csv")
    assert "alignment" not in csv_row and float(csv_row["mean_angle_deg"]) == pytest.approx(
        row["mean_angle_deg"]
    )
    assert (out / "alignment.png").read_bytes()[:4] == b"\x89PNG"


def test_command_line_recipe_amp_and_channels_last_are_recorded(runs):
    config = json.loads((runs["resnet18", "usf"] / "config.json").read_text())
    # the recipe's values, except what the flags gave (epochs, batch size)
    assert config["recipe"] == "xiao2019" and config["feedback_scales"] == "xiao2019"
    assert (config["lr"], config["weight_decay"], config["momentum"]) == (0.053, 1e-4, 0.9)
    assert config["lr_milestones"] == [10, 20, 30, 40] and config["lr_gamma"] == 0.1
    assert (config["epochs"], config["batch_size"]) == (1, 4)
    assert config["amp"] and config["channels_last"] and config["last_layer"] == "bp"
    (row,) = read_rows(runs["resnet18", "usf"])
    assert row["lr"] == 0.053
    # xiao2019 scales: |B| = sqrt(2 / (7 * 7 * 64)) on the stem
    stem = row["alignment"]["conv1"]
    assert stem["sign_agreement"] == 100.0
    weight = torch.load(runs["resnet18", "usf"] / "checkpoint.pt", weights_only=True)["model"]
    magnitude = weight["conv1.feedback_magnitude"].item()
    assert magnitude == pytest.approx(math.sqrt(2 / (49 * 64)))


def test_recipes_resolve_per_arch_and_rule_and_flags_override():
    base = dict(dataset="imagenet", recipe="xiao2019")
    bp = TrainConfig.from_flags({**base, "arch": "resnet18", "rule": "bp"})
    assert (bp.lr, bp.weight_decay, bp.epochs, bp.batch_size) == (0.1, 1e-4, 50, 256)
    fa = TrainConfig.from_flags({**base, "arch": "resnet18", "rule": "fa", "lr": 0.2})
    assert (fa.lr, fa.weight_decay) == (0.2, 1e-4)
    alex = TrainConfig.from_flags({**base, "arch": "alexnet_bn", "rule": "usf"})
    assert (alex.lr, alex.weight_decay) == (0.01, 5e-4)
    assert [alex.lr_at(e) for e in (1, 10, 11, 21, 41, 50)] == pytest.approx(
        [0.01, 0.01, 1e-3, 1e-4, 1e-6, 1e-6]
    )
    bio = TrainConfig.from_flags({**base, "recipe": "biotorch", "arch": "resnet18", "rule": "fa"})
    assert (bio.epochs, bio.lr_milestones) == (75, [20, 40, 60])
    with pytest.raises(UserError, match="recipe biotorch has no values for arch alexnet_bn"):
        TrainConfig.from_flags({**base, "recipe": "biotorch", "arch": "alexnet_bn", "rule": "fa"})
    with pytest.raises(UserError, match="unknown recipe 'nope'; choose one of xiao2019, biotorch"):
        TrainConfig.from_flags({**base, "recipe": "nope", "arch": "resnet18", "rule": "fa"})


def test_list_recipes(capsys):
    run_cli.main(["--list-recipes"])
    out = capsys.readouterr().out
    assert "xiao2019:" in out and "resnet18/bp: lr=0.1" in out and "alexnet_bn: lr=0.01" in out
    assert "biotorch:" in out and "lr_milestones=[20, 40, 60]" in out


def test_lr_milestones_decay_the_lr_per_epoch(tmp_path):
    config = TrainConfig(dataset="digits", rule="fa", limit_train=32, limit_test=16,
                         batch_size=16, device="cpu", epochs=2, lr=0.05, lr_milestones=[1],
                         lr_gamma=0.5)  # fmt: skip
    rows = trainer.train(config, tmp_path / "run", progress=False)
    assert [row["lr"] for row in rows] == [0.05, 0.025]


def test_default_workers():
    assert trainer.default_workers(torch.device("cpu")) == 0
    cuda = torch.device("cuda", 0)  # arithmetic only: no GPU needed
    assert 1 <= trainer.default_workers(cuda) <= 8
    assert trainer.default_workers(cuda, local_world_size=10_000) == 1


def test_scale_user_errors_are_one_line(runs, tree, tmp_path, capsys):
    resnet_run = str(runs["resnet18", "fa"])
    cases = {
        "arch alexnet_bn needs images of at least 63x63 pixels": [
            *tiny_flags(tree, "alexnet_bn"), "--image-size", "28", "--rule", "fa",
            "--out", str(tmp_path / "x")],
        "arch: 'resnet18' in the checkpoint, 'alexnet_bn' asked": [
            "--resume", "--arch", "alexnet_bn", "--out", resnet_run],
        "rule rdd learns the feedback of the paper net": [
            *tiny_flags(tree, "resnet18"), "--rule", "rdd", "--out", str(tmp_path / "x")],
        "has no train/ folder": [
            *tiny_flags(tree / "train", "resnet18"), "--rule", "fa", "--out", str(tmp_path / "x")],
        "feedback_scale and feedback_scales xiao2019 both set": [
            *tiny_flags(tree, "resnet18"), "--rule", "fa", "--feedback-scale", "0.1",
            "--feedback-scales", "xiao2019", "--out", str(tmp_path / "x")],
        "fc3 cannot stay on backprop": ["--dataset", "digits", "--rule", "rdd", "--last-layer",
                                        "bp", "--out", str(tmp_path / "x")],
        "invalid choice": [*tiny_flags(tree, "resnet18"), "--last-layer", "all", "--rule", "fa",
                           "--out", str(tmp_path / "x")],
    }  # fmt: skip
    for needle, argv in cases.items():
        err = run_main(run_cli.main, argv, capsys)
        assert needle in err, (needle, err)
    assert not (tmp_path / "x" / "checkpoint.pt").exists()
    assert not (tmp_path / "x" / "config.json").exists()


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_corrupt_image_is_a_one_line_error(tmp_path, capsys, workers):
    """Also when a DataLoader worker process meets it (its error arrives with its traceback)."""
    root = write_image_folder(tmp_path / "data", per_class=2)
    broken = sorted((root / "train" / "n01440764").iterdir())[0]
    broken.write_bytes(b"\xff\xd8 not a JPEG")
    argv = [*tiny_flags(root, "resnet18"), "--rule", "fa", "--workers", workers,
            "--out", str(tmp_path / "run")]  # fmt: skip
    err = run_main(run_cli.main, argv, capsys)
    assert err.count("\n") == 1 and err.startswith("error: cannot decode image "), err
    assert f"{broken}" in err and err.rstrip().endswith("replace or remove the file")


def test_two_process_torchrun_on_an_image_folder(tree, tmp_path):
    """gloo on the CPU: one set of files, identical parameters and feedback on both ranks."""
    from tests.test_distributed import torchrun

    states = tmp_path / "states"
    states.mkdir()
    out = tmp_path / "run"
    done = torchrun(states, *tiny_flags(tree, "resnet18"), "--rule", "usf", "--amp",
                    "--channels-last", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run written to") == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "alignment.png", "checkpoint.pt", "config.json", "error.png", "metrics.csv",
        "metrics.jsonl",
    ]  # fmt: skip
    rank0, rank1 = (torch.load(states / f"rank{r}.pt") for r in (0, 1))
    assert any(key.endswith("layer4.1.conv2.feedback") for key in rank0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    (row,) = read_rows(out)
    assert row["test_error"] * 8 == round(row["test_error"] * 8)  # 8 test images over 2 ranks


def test_resume_with_decoding_workers_ends_like_an_uninterrupted_run(tree, tmp_path):
    """Random crops drawn in a DataLoader worker, lr milestone between the epochs."""
    config = TrainConfig(dataset="imagefolder", data_dir=str(tree), arch="paper", rule="frsf",
                         image_size=32, epochs=2, batch_size=4, device="cpu", workers=1,
                         lr_milestones=[1])  # fmt: skip
    straight = trainer.train(config, tmp_path / "straight", progress=False)
    trainer.train(replace(config, epochs=1), tmp_path / "resumed", progress=False)
    resumed = trainer.train(config, tmp_path / "resumed", resume=True, progress=False)
    drop = ("epoch_s", "phase_s")
    assert [{k: v for k, v in row.items() if k not in drop} for row in resumed] == [
        {k: v for k, v in row.items() if k not in drop} for row in straight
    ]
    assert straight[1]["lr"] == pytest.approx(0.1 * straight[0]["lr"])


def test_resnet50_run_gives_the_trunk_retinanet_loads(tree, tmp_path):
    """--arch resnet50 (usf) trains, and its checkpoint is what training.detect's
    --backbone-checkpoint reads: the ResNet-50 trunk without fc and without feedback buffers."""
    from spikealign import detection

    out = tmp_path / "r50"
    config = TrainConfig(
        dataset="imagefolder", data_dir=str(tree), arch="resnet50", rule="usf",
        image_size=32, epochs=1, batch_size=4, device="cpu",
    )  # fmt: skip
    trainer.train(config, out, progress=False)
    (row,) = read_rows(out)
    assert math.isfinite(row["train_loss"]) and "layer4.2.conv3" in row["alignment"]
    trunk = detection.load_trunk(out / "checkpoint.pt")
    state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert "fc.weight" not in trunk and not any(key.endswith("feedback") for key in trunk)
    assert torch.equal(trunk["layer4.2.conv3.weight"], state["layer4.2.conv3.weight"])
