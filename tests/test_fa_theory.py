"""Tests of spikealign.fa_theory (batched training, subsets, label noise, experiments), its CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spikealign import fa_theory
from spikealign.conservation import conserved_quantities
from spikealign.errors import UserError
from spikealign.feedback import feedback_layers
from training import fa_theory as cli

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG"


def package_training(model, inputs, labels, index, recipe, seed):
    """The reference: one package model, torch.optim.SGD + MultiStepLR, the run's batch order."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
    )  # fmt: skip
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, recipe.milestones, recipe.gamma)
    generator = fa_theory._generator(seed, 4)
    for _ in range(recipe.epochs):
        order = fa_theory.epoch_order(generator, len(index))
        for begin in range(0, len(index), recipe.batch_size):
            positions = order[begin : begin + recipe.batch_size]
            loss = F.cross_entropy(model(inputs[index[positions]]), labels[positions])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()


def batched_case(device):
    specs = [("bp", 0), ("fa", 1), ("fa", 2), ("usf", 3), ("frsf", 4)]
    model, reference = fa_theory.build_batched(specs, 12, [16, 8], 4)
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(50, 12, generator=generator)
    index = torch.stack([torch.randperm(50, generator=generator)[:40] for _ in specs])
    labels = torch.randint(0, 4, (len(specs), 40), generator=generator)
    recipe = fa_theory.Recipe(3, 0.1, 0.9, 1e-3, 16, (2,), 0.5)
    sweep = fa_theory.Sweep(
        model.to(device), inputs.to(device), index.to(device), labels.to(device), recipe,
        [seed for _, seed in specs],
    )  # fmt: skip
    fa_theory.train_sweep(sweep, progress=False)
    return specs, model, reference, inputs, index, labels, recipe


def test_batched_training_equals_the_package_layers():
    specs, model, reference, inputs, index, labels, recipe = batched_case("cpu")
    for run, (_, seed) in enumerate(specs):
        start = [layer.weight.detach().clone() for _, layer in feedback_layers(reference[run])]
        package_training(reference[run], inputs, labels[run], index[run], recipe, seed)
        for layer, (_, package_layer) in enumerate(feedback_layers(reference[run])):
            moved = (package_layer.weight.detach() - start[layer]).abs().max()
            assert moved > 1e-2  # the comparison is not of untrained weights
            torch.testing.assert_close(
                model.weights[layer][run].detach(), package_layer.weight.detach(),
                rtol=1e-5, atol=1e-6,
            )  # fmt: skip
            torch.testing.assert_close(
                model.biases[layer][run].detach(), package_layer.bias.detach(), rtol=1e-5,
                atol=1e-6,
            )  # fmt: skip
        # the batched quantities are the library's on the package model
        package = conserved_quantities(reference[run])
        batched = model.quantities(run)
        assert list(batched) == list(package) == ["0", "2"]
        for name in package:
            torch.testing.assert_close(batched[name], package[name], rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_training_on_cuda_matches_cpu():
    cpu = batched_case("cpu")[1]
    cuda = batched_case("cuda")[1]
    for weight_cpu, weight_cuda in zip(cpu.weights, cuda.weights, strict=True):
        torch.testing.assert_close(weight_cuda.detach().cpu(), weight_cpu.detach(), rtol=1e-4,
                                   atol=1e-5)  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_experiments_run_on_cuda(tmp_path):
    config = fa_theory.TheoryConfig(
        "min-norm", epochs=500, scales=(1e-3, 1.0), device="cuda", progress=False
    )
    summary = fa_theory.run_experiment(config, tmp_path / "min-norm")
    assert summary["device"].startswith("cuda")
    distance = {(r["rule"], r["scale"]): r["relative_distance"] for r in summary["runs"]}
    assert distance["fa", 1e-3] < 0.01 and distance["fa", 1.0] > 0.1
    config = fa_theory.TheoryConfig(
        "label-noise", dataset="digits", subset=500, epochs=2, hidden=(32,), device="cuda",
        progress=False,
    )  # fmt: skip
    summary = fa_theory.run_experiment(config, tmp_path / "label-noise")
    assert all(0 <= a <= 1 for accuracies in summary["final"]["test"].values() for a in accuracies)


def test_batched_sgd_step_equals_torch_sgd():
    torch.manual_seed(0)
    lrs = [0.1, 0.2, 0.05]
    singles = [torch.randn(4, 5, requires_grad=True) for _ in lrs]
    optimizers = [
        torch.optim.SGD([p], lr=lr, momentum=0.9, weight_decay=0.01)
        for p, lr in zip(singles, lrs, strict=True)
    ]
    stacked = torch.stack([p.detach() for p in singles]).requires_grad_()
    buffers = [None]
    for step in range(4):
        grad = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(step))
        for run, (single, optimizer) in enumerate(zip(singles, optimizers, strict=True)):
            single.grad = grad[run].clone()
            optimizer.step()
        stacked.grad = grad.clone()
        fa_theory.batched_sgd_step([stacked], buffers, torch.tensor(lrs), 0.9, 0.01)
    torch.testing.assert_close(stacked.detach(), torch.stack([p.detach() for p in singles]))


def test_label_noise_flips_exactly_twenty_percent_reproducibly():
    labels = torch.randint(0, 10, (4000,), generator=torch.Generator().manual_seed(0))
    noisy, flipped = fa_theory.label_noise(labels, 10, seed=3)
    assert len(flipped) == 800 and len(set(flipped.tolist())) == 800
    changed = torch.nonzero(noisy != labels).squeeze(1)
    assert torch.equal(changed, flipped)  # every flipped label is another class, nothing else
    again, flipped_again = fa_theory.label_noise(labels, 10, seed=3)
    assert torch.equal(again, noisy) and torch.equal(flipped_again, flipped)
    other, other_flipped = fa_theory.label_noise(labels, 10, seed=4)
    assert not torch.equal(other_flipped, flipped)
    # new labels spread over all other classes
    shifts = (noisy[flipped] - labels[flipped]) % 10
    assert set(shifts.tolist()) == set(range(1, 10))
    assert len(fa_theory.label_noise(labels[:7], 2, seed=0)[1]) == 1  # round(0.2 * 7)


def test_subsets_are_reproducible_and_distinct():
    first = fa_theory.random_subset(60000, 4000, seed=0)
    assert len(first) == 4000 and len(set(first.tolist())) == 4000
    assert torch.equal(first, fa_theory.random_subset(60000, 4000, seed=0))
    assert not torch.equal(first, fa_theory.random_subset(60000, 4000, seed=1))
    classes = fa_theory.class_subset(100, 5, seed=2)
    assert len(set(classes.tolist())) == 5 and torch.equal(
        classes, fa_theory.class_subset(100, 5, seed=2)
    )
    with pytest.raises(UserError, match="subset size"):
        fa_theory.random_subset(10, 11, seed=0)


def test_min_norm_from_small_init_reaches_the_minimum_norm_solution(tmp_path):
    config = fa_theory.TheoryConfig(
        "min-norm", epochs=500, scales=(1e-3, 1.0), device="cpu", progress=False
    )
    summary = fa_theory.run_experiment(config, tmp_path)
    distance = {(r["rule"], r["scale"]): r["relative_distance"] for r in summary["runs"]}
    for rule in ("fa", "bp"):
        assert distance[rule, 1e-3] < 0.01
        assert distance[rule, 1.0] > 0.1
    assert all(r["relative_residual"] < 1e-2 for r in summary["runs"])  # both fit the data
    assert (tmp_path / "min_norm.png").read_bytes().startswith(PNG_MAGIC)


def test_conservation_experiment_drift_shrinks_with_lr(tmp_path):
    config = fa_theory.TheoryConfig(
        "conservation", epochs=10, hidden=(16, 16), lrs=(0.2, 0.05), device="cpu", progress=False,
        eval_every=20,
    )  # fmt: skip
    summary = fa_theory.run_experiment(config, tmp_path)
    for rule in ("fa", "usf", "bp"):
        drift = {r["lr"]: r["max_drift"] for r in summary["runs"] if r["rule"] == rule}
        assert drift[0.05] < drift[0.2] / 2  # drift ~ lr at the same time lr * steps
        assert 0.5 < summary["drift_lr_slope"][rule] < 1.5
    for name in ("conservation_drift.png", "conservation_law.png", "conservation_alignment.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "training.fa_theory", *args],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
    )  # fmt: skip


def test_label_noise_cli_on_digits_records_subsets(tmp_path):
    out = tmp_path / "label-noise"
    result = run_cli(
        "label-noise", "--out", str(out), "--dataset", "digits", "--subset", "500",
        "--epochs", "3", "--hidden", "32", "--seeds", "2", "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [row["epoch"] for row in summary["history"]] == [0, 1, 2, 3]
    assert set(summary["final"]) == {"train_noisy", "train_clean", "flipped_memorised", "test"}
    assert set(summary["final"]["test"]) == {"bp", "fa", "usf"}
    records = summary["subsets"]
    assert set(records) == {"0", "1"}
    for record in records.values():
        assert len(record["indices"]) == 500 and len(record["flipped"]) == 100
        noisy, clean = torch.tensor(record["noisy_labels"]), torch.tensor(record["clean_labels"])
        assert torch.equal(
            torch.nonzero(noisy != clean).squeeze(1), torch.tensor(record["flipped"])
        )
    assert records["0"]["indices"] != records["1"]["indices"]
    assert (out / "label_noise.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize(
    "args, message",
    [
        (["nonsense", "--out", "x"], "invalid choice"),
        (["min-norm"], "--out DIR is required"),
        (["min-norm", "--out", "x", "--epochs", "0"], "--epochs must be at least 1"),
        (["min-norm", "--out", "x", "--hidden", "a,b"], "comma-separated int"),
        (["min-norm", "--out", "x", "--rules", "fa,dfa"], "unbatched rule 'dfa'"),
        (["min-norm", "--out", "x", "--scales", "0"], "--scales must be positive"),
        (["label-noise", "--out", "x", "--dataset", "imagenet-x"], "unknown dataset"),
        (["label-noise", "--out", "x", "--recipe", "c"], "invalid choice"),
    ],
)
def test_cli_misuse_is_one_line(tmp_path, capsys, args, message):
    args = [str(tmp_path / a) if a == "x" else a for a in args]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_missing_dataset_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["label-noise", "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "MNIST not found" in lines[0] and "--download" in lines[0]


def test_conservation_on_the_small_convnet(tmp_path):
    config = fa_theory.TheoryConfig(
        "conservation", arch="convnet", epochs=3, lrs=(0.2, 0.1), rules=("fa", "bp"),
        device="cpu", progress=False,
    )  # fmt: skip
    summary = fa_theory.run_experiment(config, tmp_path)
    for run in summary["runs"]:
        assert set(run["drift"]) == {"0", "3"}  # conv -> conv and conv -> linear (flatten)
        assert run["skipped"] == {"7": "last weight layer: no layer above it"}
        assert run["max_drift"] < 0.05 and run["weight_change"]["0"] > 0
    assert (tmp_path / "conservation_law.png").read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(UserError, match="--arch convnet"):
        fa_theory.resolved(fa_theory.TheoryConfig("label-noise", arch="convnet"))


def test_n_class_on_digits(tmp_path):
    config = fa_theory.TheoryConfig(
        "n-class", dataset="digits", classes=(2, 3), epochs=2, hidden=(16,), device="cpu",
        progress=False,
    )  # fmt: skip
    summary = fa_theory.run_experiment(config, tmp_path)
    runs = summary["runs"]
    assert [(r["n"], r["rule"]) for r in runs] == [(2, "bp"), (2, "fa"), (3, "bp"), (3, "fa")]
    for run in runs:
        assert len(set(run["classes"])) == run["n"]
        assert run["classes"] == fa_theory.class_subset(10, run["n"], 0).tolist()
        assert 0 <= run["test_accuracy"] <= 1
    assert runs[0]["angle_deg"]["2"] == pytest.approx(0.0, abs=1e-3)  # bp: B = W
    assert (tmp_path / "n_class.png").read_bytes().startswith(PNG_MAGIC)
