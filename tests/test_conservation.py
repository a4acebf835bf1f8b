"""Tests of spikealign.conservation: hand computations and the laws on trained package layers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spikealign.conservation import (
    Quantities,
    conserved_quantities,
    coupling,
    drift,
    incoming,
    layer_quantity,
)
from spikealign.feedback import FeedbackLinear, convert
from spikealign.models import paper_convnet

W1 = [[1.0, 2.0], [3.0, -1.0]]
B1 = [0.5, -1.0]
W2 = [[2.0, 0.0], [1.0, -1.0], [0.0, 3.0]]
FEEDBACK2 = [[1.0, 1.0], [-1.0, 2.0], [0.5, 0.0]]


def two_layer(rule: str, **options) -> nn.Sequential:
    lower = FeedbackLinear(2, 2, rule="fa")
    upper = FeedbackLinear(2, 3, bias=False, rule=rule, **options)
    with torch.no_grad():
        lower.weight.copy_(torch.tensor(W1))
        lower.bias.copy_(torch.tensor(B1))
        upper.weight.copy_(torch.tensor(W2))
    if rule == "fa":
        upper.set_feedback(torch.tensor(FEEDBACK2))
    return nn.Sequential(lower, nn.ReLU(), upper)


@pytest.mark.parametrize(
    "rule, options, expected",
    [
        # Q_0 = 0.5 (1 + 4 + 0.25) - (1*2 - 1*1 + 0.5*0); Q_1 = 0.5 (9 + 1 + 1) - (0 - 2 + 0)
        ("fa", {}, [2.625 - 1.0, 5.5 + 2.0]),
        # c |v_k|_1 with c = 0.5: |v_0|_1 = 3, |v_1|_1 = 4
        ("usf", {"feedback_scale": 0.5}, [2.625 - 1.5, 5.5 - 2.0]),
        # 0.5 |v_k|^2: |v_0|^2 = 5, |v_1|^2 = 10
        ("bp", {}, [2.625 - 2.5, 5.5 - 5.0]),
    ],
)
def test_two_layer_quantities_equal_a_hand_computation(rule, options, expected):
    quantities = conserved_quantities(two_layer(rule, **options))
    assert list(quantities) == ["0"]
    torch.testing.assert_close(quantities["0"], torch.tensor(expected, dtype=torch.float64))
    assert layer_quantity(quantities) == pytest.approx({"0": sum(expected)})
    assert quantities.skipped == {"2": "last weight layer: no layer above it"}


def test_conv_then_linear_through_flatten_by_hand():
    # conv 1x1, 1 -> 2 channels on 2x2 images, flatten (channel-major), linear 8 -> 1, bp.
    conv, linear = nn.Conv2d(1, 2, 1, bias=False), nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([2.0, -1.0]).view(2, 1, 1, 1))
        linear.weight.copy_(torch.arange(8.0).view(1, 8))
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), linear)
    # channel 0 reads columns 0..3 of the linear layer, channel 1 columns 4..7
    expected = [0.5 * 4 - 0.5 * (0 + 1 + 4 + 9), 0.5 * 1 - 0.5 * (16 + 25 + 36 + 49)]
    torch.testing.assert_close(
        conserved_quantities(model)["0"], torch.tensor(expected, dtype=torch.float64)
    )


def test_grouped_conv_outgoing_weights():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, groups=2)
    )
    model = convert(model, "fa")
    lower, upper = model[0], model[3]
    quantities = conserved_quantities(model)
    # channel 3 is input 1 of group 1: rows 3..5 of W2[:, 1] and B2[:, 1]
    v, b = upper.weight[3:, 1], upper.feedback[3:, 1]
    expected = 0.5 * (lower.weight[3].pow(2).sum() + lower.bias[3] ** 2) - (b * v).sum()
    assert quantities["0"][3].item() == pytest.approx(expected.item(), rel=1e-6)


def test_layers_without_a_law_are_named_not_zero():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
    for rule in ("dfa", "brsf"):
        quantities = conserved_quantities(convert(copy.deepcopy(base), rule))
        assert len(quantities) == 0
        assert rule in quantities.skipped["0"]
        assert "Tanh" in quantities.skipped["2"] and "homogeneous" in quantities.skipped["2"]
    paper = conserved_quantities(convert(paper_convnet(1, 28, 10), "fa"))
    assert len(paper) == 0
    assert all("batch norm" in paper.skipped[name] for name in ("features.0", "fc1", "fc2"))
    residual = Residual()
    assert "2 operations" in conserved_quantities(residual).skipped["inner"]


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.outer = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = self.inner(x)
        return self.outer(torch.relu(h) + h)


def train_full_batch(model: nn.Module, steps: int, lr: float):
    torch.manual_seed(1)
    inputs, targets = torch.randn(64, 10), torch.randint(0, 3, (64,))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def relative_change(start: list[torch.Tensor], model: nn.Module) -> float:
    return min(
        ((p.detach() - s).norm() / s.norm()).item()
        for p, s in zip(model.parameters(), start, strict=True)
        if p.dim() == 2
    )


@pytest.mark.parametrize("rule", ["fa", "usf", "bp", "frsf"])
def test_quantities_are_conserved_by_small_step_training(rule):
    torch.manual_seed(0)
    model = convert(
        nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)),
        rule,
    )
    start = conserved_quantities(model)
    weights = [p.detach().clone() for p in model.parameters()]
    train_full_batch(model, steps=300, lr=2e-3)
    changes = drift(start, conserved_quantities(model))
    moved = relative_change(weights, model)
    assert set(changes) == {"0", "2"}
    assert max(changes.values()) < 1e-3
    assert moved > 100 * max(changes.values())  # the weights move orders of magnitude more


def test_a_rule_without_a_law_drifts():
    # brsf: the frsf quantity with the current |M| is not conserved (|M| is redrawn every step)
    torch.manual_seed(0)
    model = convert(nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3)), "brsf")
    upper = model[2]

    def quantity() -> Quantities:
        result = Quantities()
        result.incoming["0"] = incoming(model[0].weight, model[0].bias).double()
        result.coupling["0"] = coupling("frsf", upper, 32).double()
        result["0"] = result.incoming["0"] - result.coupling["0"]
        return result

    start = quantity()
    train_full_batch(model, steps=300, lr=2e-3)
    assert drift(start, quantity())["0"] > 1e-2


def test_drift_normalisation():
    start = Quantities()
    start["a"] = torch.tensor([1.0, -1.0], dtype=torch.float64)
    start.incoming["a"] = torch.tensor([3.0, 1.0], dtype=torch.float64)
    start.coupling["a"] = torch.tensor([2.0, 2.0], dtype=torch.float64)
    now = {"a": torch.tensor([1.2, -1.0], dtype=torch.float64)}
    # max change 0.2 over mean(|3| + |2|, |1| + |2|) = 4
    assert drift(start, now)["a"] == pytest.approx(0.05)
    assert drift({"a": start["a"]}, now)["a"] == pytest.approx(0.2)  # plain dict: mean |Q_0|


class PlainNet(nn.Module):
    """fc1..fc3 without batch norm, so the trainer's fc bookkeeping works and laws hold."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 24), nn.Linear(24, 16), nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


def test_trainer_tracks_conservation_and_resumes_it(tmp_path, monkeypatch):
    from spikealign import trainer
    from spikealign.trainer import classify

    def build_plain(config, bundle):
        torch.manual_seed(config.seed)
        return convert(PlainNet(), config.rule)

    monkeypatch.setattr(classify, "build_model", build_plain)
    settings = dict(dataset="digits", rule="fa", limit_train=128, limit_test=64, batch_size=32,
                    lr=0.005, momentum=0.0, device="cpu", track_conservation=True)  # fmt: skip
    whole = trainer.train(trainer.TrainConfig(epochs=2, **settings), tmp_path / "a", progress=False)
    assert {"drift_fc1", "drift_fc2"} <= set(whole[-1]) and "drift_fc3" not in whole[-1]
    # the recorded drift is that of the initial and the final model
    start = conserved_quantities(build_plain(trainer.TrainConfig(**settings), None))
    final = convert(PlainNet(), "fa")
    checkpoint = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    final.load_state_dict(checkpoint["model"])
    expected = drift(start, conserved_quantities(final))
    assert whole[-1]["drift_fc1"] == pytest.approx(expected["fc1"], rel=1e-6)
    assert 0 < whole[-1]["drift_fc2"] < 1e-2
    # a run resumed after epoch 1 keeps Q_k(0) and records the same drift
    trainer.train(trainer.TrainConfig(epochs=1, **settings), tmp_path / "b", progress=False)
    resumed = trainer.train(
        trainer.TrainConfig(epochs=2, **settings), tmp_path / "b", resume=True, progress=False
    )
    assert resumed[-1]["drift_fc1"] == pytest.approx(whole[-1]["drift_fc1"], rel=1e-9)
