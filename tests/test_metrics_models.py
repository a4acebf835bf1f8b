"""Tests of spikealign.metrics (alignment measures on known cases) and spikealign.models.

Precision: the test that also runs on CUDA computes in float64 (no TF32 there), to 1e-6.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spikealign.errors import UserError
from spikealign.feedback import convert, feedback_layers
from spikealign.metrics import alignment, model_alignment, update_angle
from spikealign.models import fc_layers, paper_convnet

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_alignment_of_identical_negated_and_orthogonal_matrices():
    weight = torch.randn(4, 6, dtype=torch.float64)
    same = alignment(weight, weight.clone())
    assert same["angle_deg"] == pytest.approx(0.0, abs=1e-6)
    assert same["sign_agreement"] == 100.0 and same["norm_ratio"] == pytest.approx(1.0)

    negated = alignment(weight, -2 * weight)
    assert negated["angle_deg"] == pytest.approx(180.0, abs=1e-6)
    assert negated["sign_agreement"] == 0.0 and negated["norm_ratio"] == pytest.approx(2.0)

    orthogonal = alignment(np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[0.0, 3.0], [0.0, 0.0]]))
    assert orthogonal["angle_deg"] == pytest.approx(90.0)
    assert orthogonal["norm_ratio"] == pytest.approx(3.0)

    # 45 degrees, one of two non-zero feedback entries agrees in sign, zeros are not counted
    mixed = alignment(
        torch.tensor([[1.0, 1.0, -1.0, 2.0]]), np.array([[1.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    )
    assert mixed["angle_deg"] == pytest.approx(math.degrees(math.acos(1 / math.sqrt(7))))
    assert mixed["sign_agreement"] == 100.0
    half = alignment(np.array([1.0, 1.0, -1.0, 2.0]), np.array([1.0, 0.0, 1.0, 0.0]))
    assert half["sign_agreement"] == 50.0
    assert all(isinstance(value, float) for value in half.values())


def test_alignment_shape_mismatch_and_zero_feedback():
    with pytest.raises(
        UserError, match=r"weight has shape \(2, 3\) but feedback has shape \(3, 2\)"
    ):
        alignment(np.zeros((2, 3)), torch.zeros(3, 2))
    zero = alignment(np.ones((2, 2)), np.zeros((2, 2)))
    assert math.isnan(zero["angle_deg"]) and math.isnan(zero["sign_agreement"])
    assert zero["norm_ratio"] == 0.0


def test_model_alignment_per_rule():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 16, 16)
    measured = {}
    for rule in ("bp", "usf", "fa", "dfa"):
        model = convert(paper_convnet(1, 16, 4), rule)
        model(x).sum().backward()
        measured[rule] = model_alignment(model)
    assert list(measured["bp"]) == ["features.0", "features.4", "fc1", "fc2", "fc3"]
    for values in measured["bp"].values():
        assert values["angle_deg"] == pytest.approx(0.0, abs=1e-4)
        assert values["norm_ratio"] == pytest.approx(1.0)
    for values in measured["usf"].values():
        assert values["sign_agreement"] == 100.0
        assert values["norm_ratio"] == pytest.approx(1.0, rel=0.05)  # RMS of W at conversion
        assert 0 < values["angle_deg"] < 60
    for values in measured["fa"].values():  # independent random matrices: nearly orthogonal
        assert 60 < values["angle_deg"] < 120
    # dfa: hidden feedback maps the output error (not weight-shaped); the output layer's is kept
    assert list(measured["dfa"]) == ["fc3"]


@pytest.mark.parametrize("device", DEVICES)
def test_update_angle_equals_hand_computation_for_fa(device):
    """Two linear layers: W1's update is (delta B2)^T x under fa and (delta W2)^T x under bp."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4, bias=False), nn.Linear(4, 3, bias=False))
    model = convert(model.to(device, torch.float64), "fa")
    inputs = torch.randn(8, 5, device=device, dtype=torch.float64)
    targets = torch.randn(8, 3, device=device, dtype=torch.float64)
    angles = update_angle(model, F.mse_loss, inputs, targets)

    delta = 2 * (model(inputs) - targets).detach() / targets.numel()  # d mse / d output
    fa_update = (delta @ model[1].feedback).T @ inputs
    bp_update = (delta @ model[1].weight.detach()).T @ inputs
    cosine = (fa_update * bp_update).sum() / (fa_update.norm() * bp_update.norm())
    assert angles["0"] == pytest.approx(math.degrees(math.acos(cosine.item())), abs=1e-6)
    assert angles["1"] == pytest.approx(0.0, abs=1e-6)  # the top layer's delta is exact


def test_update_angle_leaves_the_model_unchanged():
    torch.manual_seed(2)
    model = convert(nn.Sequential(paper_convnet(1, 16, 4), nn.Dropout(0.5)), "brsf")
    model.train()
    inputs, targets = torch.randn(6, 1, 16, 16), torch.randint(0, 4, (6,))
    model(inputs).sum().backward()
    state = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()

    angles = update_angle(model, F.cross_entropy, inputs, targets)
    assert set(angles) == {name for name, _ in feedback_layers(model)}
    assert angles["0.fc3"] == pytest.approx(0.0, abs=1e-3)  # last layer: exact delta
    assert all(0 < angle < 90 for name, angle in angles.items() if name != "0.fc3")
    for key, value in model.state_dict().items():  # BN statistics, brsf magnitudes
        assert torch.equal(value, state[key]), key
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert torch.equal(torch.get_rng_state(), rng)
    # same dropout masks in both passes: with bp the angle is zero everywhere
    bp_angles = update_angle(convert(model, "bp"), F.cross_entropy, inputs, targets)
    assert all(angle == pytest.approx(0.0, abs=1e-3) for angle in bp_angles.values())


@pytest.mark.parametrize(
    ("in_channels", "image_size", "flat"), [(1, 28, 1024), (3, 32, 1600), (3, 16, 64)]
)
def test_paper_convnet_shapes(in_channels, image_size, flat):
    model = paper_convnet(in_channels, image_size, 10)
    assert model.fc1.in_features == flat
    assert [(m.in_features, m.out_features) for _, m in fc_layers(model)] == [
        (flat, 384),
        (384, 192),
        (192, 10),
    ]
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.bias) for c in convs] == [
        (in_channels, 64, (5, 5), None),
        (64, 64, (5, 5), None),
    ]
    out = model(torch.randn(2, in_channels, image_size, image_size))
    assert out.shape == (2, 10)
    assert [name for name, _ in fc_layers(convert(model, "fa"))] == ["fc1", "fc2", "fc3"]


def test_paper_convnet_rejects_small_images():
    with pytest.raises(UserError, match="image_size 15 is too small"):
        paper_convnet(3, 15, 10)
    with pytest.raises(UserError, match="has no fc1, fc2, fc3"):
        fc_layers(nn.Linear(2, 2))


def test_alignment_leaves_float64_inputs_alone_and_matches_a_hand_computation():
    torch.manual_seed(0)
    weight, feedback = torch.randn(30, 20, dtype=torch.float64), torch.randn(30, 20).double()
    feedback[0, :5] = 0
    before = feedback.clone()
    measured = alignment(weight, feedback)
    torch.testing.assert_close(feedback, before, rtol=0, atol=0)
    w, b = weight.flatten().numpy(), feedback.flatten().numpy()
    cosine = w @ b / np.linalg.norm(w) / np.linalg.norm(b)
    assert measured["angle_deg"] == pytest.approx(math.degrees(math.acos(cosine)))
    nonzero = b != 0
    agree = (np.sign(w[nonzero]) == np.sign(b[nonzero])).mean() * 100
    assert measured["sign_agreement"] == pytest.approx(agree)
    assert measured["norm_ratio"] == pytest.approx(np.linalg.norm(b) / np.linalg.norm(w))
