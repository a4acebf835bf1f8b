"""Tests of the CUDA-graphed training pass (spikealign.trainer.graphs, ``--cuda-graph``).

On the CPU: the batches a graph reads by a position on the device are the loader's own, and the
recorded step body, run eagerly, trains exactly as the ordinary loop (bit for bit: the same
operations in the same order). On CUDA (when present): whole runs with and without the graph agree
to float32 rounding, with IEEE float32 and deterministic cuDNN algorithms on both sides (TF32 or
autotuning could pick different kernels per run, which would say nothing about the graph), across
an lr change between passes (the lr is baked into a capture), for a rule with a sign refresh in its
backward (usf) and one that updates feedback from the gradient (kp).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from spikealign.device_data import DeviceLoader, device_dataset
from spikealign.errors import UserError
from spikealign.trainer import TrainConfig, classify, graphs
from spikealign.trainer.scores import ScoreKeeper
from tests.test_device_data import plain_bundle

SMALL = dict(dataset="digits", limit_train=320, limit_test=64, batch_size=32, device="cpu")


@pytest.fixture(autouse=True)
def no_figures(monkeypatch):
    monkeypatch.setattr(classify.Training, "finish", lambda self: None)


@pytest.mark.parametrize("shard", [(0, 1), (1, 2)])
def test_batch_at_a_device_position_is_the_loaders_batch(tmp_path, shard):
    bundle = plain_bundle("fashion-mnist", tmp_path, augment=True)
    stored = device_dataset(bundle.train, "cpu")

    def loader():
        return DeviceLoader(
            stored, 2, shuffle=True, drop_last=True, augment=True,
            generator=torch.Generator().manual_seed(3), shard=shard,
        )  # fmt: skip

    batches = list(loader())
    plan_loader = loader()
    plan = plan_loader.plan()
    position = torch.zeros((), dtype=torch.int64)
    for inputs, targets in batches:
        read_inputs, read_targets = plan_loader.batch_at(plan, position)
        assert torch.equal(read_inputs, inputs) and torch.equal(read_targets, targets)
        position += 2


@pytest.mark.parametrize("rule", ["usf", "kp"])
def test_the_recorded_step_trains_as_the_ordinary_loop(tmp_path, rule):
    config = TrainConfig(**SMALL, rule=rule, epochs=1)
    ordinary = classify.Training(config, tmp_path / "a", progress=False)
    recorded = classify.Training(config, tmp_path / "b", progress=False)
    assert recorded.loader_kind == "device"
    recorded.graphed = graphs.GraphedPass(
        recorded.train_loader,
        lambda x, y: recorded.train_step(*recorded._inputs(x, y)),
        capture=False,
    )
    for epoch in (1, 2):
        for run in (ordinary, recorded):
            run.generator.manual_seed(epoch)
        scores = [run.train_epoch(epoch) for run in (ordinary, recorded)]
        assert scores[1] == pytest.approx(scores[0], rel=1e-6)
        for key, value in ordinary.model.state_dict().items():
            assert torch.equal(recorded.model.state_dict()[key], value), key
    assert int(recorded.graphed.position) == len(recorded.train_loader) * config.batch_size


def test_graphed_pass_needs_full_batches(tmp_path):
    bundle = plain_bundle("fashion-mnist", tmp_path)
    loader = DeviceLoader(device_dataset(bundle.train, "cpu"), 5)
    with pytest.raises(ValueError, match="full batches"):
        graphs.GraphedPass(loader, lambda x, y: None, capture=False)


def test_keeper_sums_equal_per_batch_adds():
    torch.manual_seed(0)
    batches = [(torch.rand(()), torch.randn(4, 10), torch.randint(0, 10, (4,))) for _ in range(3)]
    per_batch, summed = ScoreKeeper(False, top_k=5), ScoreKeeper(False, top_k=5)
    for loss, logits, targets in batches:
        per_batch.add(loss, logits, targets)
    summed.add_sums(
        12,
        sum(loss * 4 for loss, _, _ in batches),
        sum((logits.argmax(1) != targets).sum() for _, logits, targets in batches),
        sum(
            (~(logits.topk(5, 1).indices == targets[:, None]).any(1)).sum()
            for _, logits, targets in batches
        ),
    )
    assert summed.result() == pytest.approx(per_batch.result(), rel=1e-6)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(compile="reduce-overhead"), "both make CUDA graphs"),
        (dict(rule="dfa"), "does not support rule dfa"),
    ],
)
def test_cuda_graph_config_errors(changes, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(**{**SMALL, "rule": "fa", **changes}, cuda_graph=True).validate()


def test_cuda_graph_refused_off_cuda(tmp_path):
    config = TrainConfig(**SMALL, rule="fa", cuda_graph=True)
    with pytest.raises(UserError, match="--cuda-graph needs a CUDA device"):
        classify.Training(config, tmp_path, progress=False)


def test_cuda_graph_refused_for_dataloader_data(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("the CPU check comes first without CUDA (test above)")
    config = TrainConfig(**{**SMALL, "device": "cuda"}, rule="fa", cuda_graph=True)
    with pytest.raises(UserError, match="needs the training data on the device"):
        classify.Training(replace(config, loader="dataloader"), tmp_path, progress=False)


@pytest.fixture
def same_kernels_each_run():
    """IEEE float32 and deterministic algorithms (no TF32, no cuDNN autotuning), restored after."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
    )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        deterministic,
    ) = saved
    torch.use_deterministic_algorithms(deterministic)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rule", ["usf", "kp", "frsf"])
def test_graphed_run_equals_eager_on_cuda(tmp_path, rule, same_kernels_each_run):
    """float32, IEEE, deterministic cuDNN: the replayed kernels are the eager ones (rtol 1e-5)."""
    config = TrainConfig(
        **{**SMALL, "device": "cuda"}, rule=rule, epochs=2, lr_milestones=[1], deterministic=True
    )
    eager = classify.train(config, tmp_path / "eager", progress=False)
    graphed = classify.train(replace(config, cuda_graph=True), tmp_path / "g", progress=False)
    for row_eager, row_graphed in zip(eager, graphed, strict=True):
        for key in ("train_loss", "train_error", "test_loss", "test_error"):
            assert row_graphed[key] == pytest.approx(row_eager[key], rel=1e-5, abs=1e-6), key
    states = [torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("eager", "g")]
    for key, value in states[0]["model"].items():
        torch.testing.assert_close(states[1]["model"][key], value, rtol=1e-5, atol=1e-6)
