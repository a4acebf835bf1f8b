"""Tests of spikealign.feedback: every rule's gradients against a hand computation.

Hand computations use the feedback tensor the layer actually used (``layer.feedback`` after the
backward pass): Linear dx = delta @ B, dW = delta^T x; Conv2d dx = conv2d_input(x.shape, B, delta),
dW = conv2d_weight(x, W.shape, delta). float64 throughout; on CUDA too when it is present.

Precision on CUDA: float64 tests are exact up to summation order (TF32 applies to float32 only).
The float32 comparison with torchvision models runs with TF32 off (``ieee_float32`` fixture), so
both sides compute in IEEE float32: PyTorch's default lets cuDNN convolutions use TF32 (10-bit
mantissa), and the reference's and the converted layer's kernels then round differently (relative
differences near 1e-2 on an H100), which would say nothing about the rule, and with deterministic
cuDNN algorithms (``fixed_cudnn_algorithms``: no autotuning, whose weight-gradient algorithms may
sum with atomics in a different order per call).
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.nn.grad import conv2d_input, conv2d_weight

from spikealign.errors import UserError
from spikealign.feedback import (
    RULES,
    FeedbackConv2d,
    FeedbackLinear,
    convert,
    feedback_layers,
    step_feedback,
)
from spikealign.models import paper_convnet

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPE = torch.float64
# dfa projects the network's output error and is tested on whole networks below
LAYER_RULES = [rule for rule in RULES if rule != "dfa"]

CONV_SETTINGS = {
    "plain": dict(),
    "stride2": dict(stride=2),
    "padding1": dict(padding=1),
    "padding_tuple": dict(padding=(2, 0)),
    "same": dict(padding="same"),
    "same_even_kernel": dict(padding="same", kernel_size=4),  # asymmetric padding
    "valid": dict(padding="valid"),
    "dilation2": dict(dilation=2, padding=2),
    "groups2": dict(groups=2),
    "depthwise": dict(groups=4, out_channels=4),
    "no_bias": dict(bias=False, stride=(2, 1)),
    "reflect": dict(padding=1, padding_mode="reflect"),
    "replicate": dict(padding=(1, 2), padding_mode="replicate"),
    "circular": dict(padding="same", padding_mode="circular"),
}


def backward_with_random_delta(layer: nn.Module, x: Tensor):
    out = layer(x)
    delta = torch.randn_like(out)
    out.backward(delta)
    return out, delta


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", LAYER_RULES)
@pytest.mark.parametrize("input_shape", [(6, 5), (2, 3, 5)])
def test_linear_gradients_equal_hand_computation(rule, device, input_shape):
    torch.manual_seed(0)
    layer = FeedbackLinear(5, 4, device=device, dtype=DTYPE, rule=rule)
    plain = nn.Linear(5, 4, device=device, dtype=DTYPE)
    plain.load_state_dict({"weight": layer.weight, "bias": layer.bias})
    x = torch.randn(input_shape, device=device, dtype=DTYPE, requires_grad=True)
    out, delta = backward_with_random_delta(layer, x)

    feedback, weight = layer.feedback, layer.weight.detach()
    torch.testing.assert_close(out, plain(x))
    torch.testing.assert_close(x.grad, delta @ feedback)
    delta_2d, x_2d = delta.reshape(-1, 4), x.detach().reshape(-1, 5)
    torch.testing.assert_close(layer.weight.grad, delta_2d.T @ x_2d)
    torch.testing.assert_close(layer.bias.grad, delta_2d.sum(0))
    if rule == "bp":
        torch.testing.assert_close(feedback, weight, rtol=0, atol=0)
    else:
        assert not torch.allclose(feedback, weight)


def conv_padding_amounts(layer: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding of ``layer`` as nn.Conv2d applies it."""
    if layer.padding == "same":
        pads = []
        sizes = zip(reversed(layer.kernel_size), reversed(layer.dilation), strict=True)
        for kernel, dilation in sizes:
            total = dilation * (kernel - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    if layer.padding == "valid":
        return (0, 0, 0, 0)
    pad_h, pad_w = layer.padding
    return (pad_w, pad_w, pad_h, pad_h)


def hand_conv_gradients(layer: FeedbackConv2d, x, delta):
    """(dx, dW, db) from the feedback the layer used, with torch.nn.grad."""
    stride, dilation, groups = layer.stride, layer.dilation, layer.groups
    feedback, weight_shape = layer.feedback, layer.weight.shape
    pads = conv_padding_amounts(layer)
    if layer.padding_mode == "zeros" and isinstance(layer.padding, tuple):
        grad_x = conv2d_input(x.shape, feedback, delta, stride, layer.padding, dilation, groups)
        grad_w = conv2d_weight(x, weight_shape, delta, stride, layer.padding, dilation, groups)
    else:
        # pad explicitly (zeros, asymmetric 'same', or another padding mode), convolve unpadded;
        # only the padding's own backward (crop / fold back) is left to autograd
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x_leaf = x.detach().requires_grad_()
        x_padded = F.pad(x_leaf, pads, mode=mode)
        grad_padded = conv2d_input(x_padded.shape, feedback, delta, stride, 0, dilation, groups)
        (grad_x,) = torch.autograd.grad(x_padded, x_leaf, grad_padded)
        grad_w = conv2d_weight(x_padded.detach(), weight_shape, delta, stride, 0, dilation, groups)
    return grad_x, grad_w, delta.sum((0, 2, 3))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", LAYER_RULES)
@pytest.mark.parametrize("setting", list(CONV_SETTINGS))
def test_conv_gradients_equal_hand_computation(rule, setting, device):
    torch.manual_seed(1)
    kwargs = dict(in_channels=4, out_channels=6, kernel_size=3) | CONV_SETTINGS[setting]
    plain = nn.Conv2d(**kwargs, device=device, dtype=DTYPE)
    layer = convert(copy.deepcopy(plain), rule)
    assert isinstance(layer, FeedbackConv2d) and isinstance(layer, nn.Conv2d)
    x = torch.randn(2, 4, 9, 8, device=device, dtype=DTYPE, requires_grad=True)
    out, delta = backward_with_random_delta(layer, x)

    torch.testing.assert_close(out, plain(x))
    grad_x, grad_w, grad_b = hand_conv_gradients(layer, x.detach(), delta)
    torch.testing.assert_close(x.grad, grad_x)
    torch.testing.assert_close(layer.weight.grad, grad_w)
    if layer.bias is not None:
        torch.testing.assert_close(layer.bias.grad, grad_b)
    if rule == "bp":  # and backprop equals autograd through nn.Conv2d
        plain(x).backward(delta)
        torch.testing.assert_close(layer.weight.grad, plain.weight.grad)


@pytest.fixture
def fixed_cudnn_algorithms():
    """cuDNN picks one deterministic algorithm per convolution (no benchmark autotuning, which a
    CUDA training run earlier in the process may have switched on), restored afterwards."""
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


@pytest.fixture
def ieee_float32():
    """TF32 off for CUDA matrix products and cuDNN convolutions, restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("net", ["resnet18", "alexnet"])
def test_bp_equals_autograd_on_torchvision_models(
    net, device, ieee_float32, fixed_cudnn_algorithms
):
    """float32, IEEE on CUDA (no TF32) and deterministic cuDNN algorithms: equal to float32
    rounding (rtol 1e-5). Deterministic, because the weight-gradient algorithms that cuDNN's
    autotuning may pick sum with atomics, in an order that changes from call to call: on ResNet's
    first conv (2048 terms per entry) two identical calls then differ by more than 1e-5."""
    torch.manual_seed(2)
    reference = getattr(torchvision.models, net)(weights=None).to(device).eval()
    converted = convert(copy.deepcopy(reference), "bp")
    layers = feedback_layers(converted)
    assert len(layers) == sum(isinstance(m, nn.Linear | nn.Conv2d) for m in reference.modules())
    x = torch.randn(2, 3, 64, 64, device=device)
    x_reference, x_converted = x.clone().requires_grad_(), x.clone().requires_grad_()
    reference(x_reference).square().sum().backward()
    converted(x_converted).square().sum().backward()
    torch.testing.assert_close(x_converted.grad, x_reference.grad, rtol=1e-5, atol=1e-6)
    for (name, p_ref), (_, p_conv) in zip(
        reference.named_parameters(), converted.named_parameters(), strict=True
    ):
        torch.testing.assert_close(p_conv.grad, p_ref.grad, rtol=1e-5, atol=1e-6, msg=name)


def two_backward_passes(layer: nn.Module, device):
    """Feedback (copies) after each of two backward passes with an SGD step between them."""
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    feedbacks = []
    for _ in range(2):
        optimizer.zero_grad()
        layer(torch.randn(8, 6, device=device, dtype=DTYPE)).square().sum().backward()
        optimizer.step()
        feedbacks.append((layer.feedback.clone(), layer.weight.detach().clone()))
    return feedbacks


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", ["usf", "frsf", "brsf"])
def test_sign_symmetry_feedback(rule, device):
    torch.manual_seed(3)
    layer = FeedbackLinear(6, 5, device=device, dtype=DTYPE, rule=rule)
    initial_weight = layer.weight.detach().clone()
    (feedback_1, weight_1), (feedback_2, weight_2) = two_backward_passes(layer, device)
    # feedback was computed in backward from the weight before each step
    torch.testing.assert_close(torch.sign(feedback_1), torch.sign(initial_weight), rtol=0, atol=0)
    torch.testing.assert_close(torch.sign(feedback_2), torch.sign(weight_1), rtol=0, atol=0)
    magnitudes_1, magnitudes_2 = feedback_1.abs(), feedback_2.abs()
    if rule == "usf":
        rms = initial_weight.square().mean().sqrt()
        torch.testing.assert_close(magnitudes_1, torch.full_like(magnitudes_1, rms.item()))
        torch.testing.assert_close(magnitudes_2, magnitudes_1, rtol=0, atol=0)
    elif rule == "frsf":
        torch.testing.assert_close(magnitudes_2, magnitudes_1, rtol=0, atol=0)
        assert magnitudes_1.std() > 0
        assert magnitudes_1.max() <= 1 / math.sqrt(6)  # |M|, M Kaiming-uniform
    else:
        assert not torch.isclose(magnitudes_1, magnitudes_2).any()
        assert magnitudes_2.max() <= 1 / math.sqrt(6)


def test_feedback_scale_and_seeding():
    torch.manual_seed(4)
    layer = FeedbackLinear(100, 50, rule="fa", feedback_scale=0.01)
    assert layer.feedback.abs().max() <= 0.01 and layer.feedback.abs().max() > 0.009
    default = FeedbackLinear(100, 50, rule="fa").feedback
    assert default.abs().max() <= 0.1 and default.abs().max() > 0.09  # 1/sqrt(fan_in)
    usf = FeedbackLinear(100, 50, rule="usf", feedback_scale=0.3)
    torch.testing.assert_close(usf.feedback.abs(), torch.full((50, 100), 0.3))

    model = paper_convnet(1, 28, 10)
    torch.manual_seed(7)
    first = convert(copy.deepcopy(model), "fa")
    torch.manual_seed(7)
    second = convert(copy.deepcopy(model), "fa")
    third = convert(copy.deepcopy(model), "fa", generator=torch.Generator().manual_seed(7))
    for (_, a), (_, b) in zip(feedback_layers(first), feedback_layers(second), strict=True):
        assert torch.equal(a.feedback, b.feedback)
    torch.manual_seed(7)
    fourth = convert(copy.deepcopy(model), "fa", generator=torch.Generator().manual_seed(7))
    for (_, c), (_, d) in zip(feedback_layers(third), feedback_layers(fourth), strict=True):
        assert torch.equal(c.feedback, d.feedback)


class MLP(nn.Sequential):
    def __init__(self):
        super().__init__(
            nn.Conv2d(2, 3, 3),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(48, 5),
            nn.Tanh(),
            nn.Linear(5, 3),
        )


@pytest.mark.parametrize("device", DEVICES)
def test_dfa_projects_the_output_error(device):
    torch.manual_seed(5)
    model = convert(MLP().to(device, DTYPE), "dfa")
    x = torch.randn(4, 2, 6, 6, device=device, dtype=DTYPE, requires_grad=True)
    out = model(x)
    (0.5 * out.square().sum()).backward()  # dL/d(out) = out
    error = out.detach()

    conv, fc1, fc2 = model[0], model[3], model[5]
    assert conv.feedback.shape == (3, 2 * 6 * 6)  # (n_outputs, input features)
    assert fc1.feedback.shape == (3, 48) and fc2.feedback.shape == (3, 5)
    # forward by hand
    h0 = torch.tanh(F.conv2d(x.detach(), conv.weight, conv.bias))
    h1 = torch.tanh(F.linear(h0.flatten(1), fc1.weight, fc1.bias))
    # the last layer's weight gradient uses e; every layer's input gradient is e @ B_l
    torch.testing.assert_close(fc2.weight.grad, error.T @ h1)
    delta_1 = (error @ fc2.feedback) * (1 - h1.square())
    torch.testing.assert_close(fc1.weight.grad, delta_1.T @ h0.flatten(1))
    delta_0 = (error @ fc1.feedback).view(h0.shape) * (1 - h0.square())
    torch.testing.assert_close(
        conv.weight.grad, conv2d_weight(x.detach(), conv.weight.shape, delta_0)
    )
    torch.testing.assert_close(conv.bias.grad, delta_0.sum((0, 2, 3)))
    torch.testing.assert_close(x.grad, (error @ conv.feedback).view(x.shape))

    # B_l is fixed: a second pass uses the same matrices; a deep copy works on its own
    before = [layer.feedback.clone() for _, layer in feedback_layers(model)]
    twin = copy.deepcopy(model)
    for net in (model, twin):
        net.zero_grad()
        net(x.detach()).sum().backward()
    for (_, layer), (_, layer_twin), b in zip(
        feedback_layers(model), feedback_layers(twin), before, strict=True
    ):
        assert torch.equal(layer.feedback, b)
        torch.testing.assert_close(layer.weight.grad, layer_twin.weight.grad)


def test_dfa_layer_outside_its_model_is_a_clear_error():
    model = convert(MLP(), "dfa")
    with pytest.raises(UserError, match="ran outside the model"):
        model[3](torch.randn(2, 48))
    with torch.no_grad():
        model[3](torch.randn(2, 48))  # inference is fine


@pytest.mark.parametrize("device", DEVICES)
def test_weight_mirror_update_equals_formula(device):
    lr, weight_decay, noise_std, batch = 0.1, 0.5, 0.3, 16
    options = dict(lr=lr, weight_decay=weight_decay, noise_std=noise_std, batch_size=batch)
    torch.manual_seed(6)
    linear = FeedbackLinear(5, 4, device=device, dtype=DTYPE, rule="wm", **options)
    conv = FeedbackConv2d(
        4, 6, 3, dilation=2, groups=2, device=device, dtype=DTYPE, rule="wm", **options
    )
    model = nn.Sequential(linear, conv)
    initial = [linear.feedback.clone(), conv.feedback.clone()]
    torch.manual_seed(11)
    step_feedback(model)

    torch.manual_seed(11)
    noise = torch.randn(batch, 5, device=device, dtype=DTYPE) * noise_std
    response = noise @ linear.weight.detach().T
    expected = (1 - lr * weight_decay) * initial[0] + lr * (response.T @ noise) / batch
    torch.testing.assert_close(linear.feedback, expected)
    # conv: noise over one dilated receptive field (5x5 for a 3x3 kernel with dilation 2)
    noise = torch.randn(batch, 4, 5, 5, device=device, dtype=DTYPE) * noise_std
    weight = conv.weight.detach()
    response = F.conv2d(noise, weight, dilation=2, groups=2)
    correlation = conv2d_weight(noise, weight.shape, response, dilation=2, groups=2)
    expected = (1 - lr * weight_decay) * initial[1] + lr * correlation / batch
    torch.testing.assert_close(conv.feedback, expected)


def test_weight_mirror_expectation_is_proportional_to_weight():
    torch.manual_seed(8)
    noise_std = 0.5
    for layer in (FeedbackLinear(6, 3, rule="wm"), FeedbackConv2d(2, 3, 3, groups=1, rule="wm")):
        layer.weight_mirror_update(1.0, 1.0, noise_std, batch_size=40000)  # forgets the init
        expected = noise_std**2 * layer.weight.detach()
        error = (layer.feedback - expected).norm() / expected.norm()
        assert error < 0.05


@pytest.mark.parametrize("device", DEVICES)
def test_kolen_pollack_update_equals_formula(device):
    lr, weight_decay = 0.1, 0.01
    torch.manual_seed(9)
    model = convert(MLP().to(device, DTYPE), "kp", lr=lr, weight_decay=weight_decay)
    model(torch.randn(3, 2, 6, 6, device=device, dtype=DTYPE)).sum().backward()
    initial = [(layer.feedback.clone(), layer.weight.grad) for _, layer in feedback_layers(model)]
    step_feedback(model)
    for (_, layer), (feedback, grad) in zip(feedback_layers(model), initial, strict=True):
        torch.testing.assert_close(
            layer.feedback, feedback - lr * grad - lr * weight_decay * feedback
        )
    with pytest.raises(UserError, match="applies to rule 'kp' only"):
        FeedbackLinear(3, 2, rule="fa").kolen_pollack_update(lr, weight_decay)


def angle_deg(a, b) -> float:
    cosine = (a * b).sum() / (a.norm() * b.norm())
    return math.degrees(math.acos(max(-1.0, min(1.0, cosine.item()))))


def test_kolen_pollack_aligns_feedback_on_linear_regression():
    torch.manual_seed(10)
    lr, weight_decay = 0.05, 0.1
    inputs = torch.randn(256, 10)
    targets = inputs @ torch.randn(3, 10).T
    model = nn.Sequential(nn.Linear(10, 20, bias=False), nn.Linear(20, 3, bias=False))
    model = convert(model, "kp", lr=lr, weight_decay=weight_decay)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    top = model[1]
    start = angle_deg(top.weight.detach(), top.feedback)
    for _ in range(500):
        optimizer.zero_grad()
        F.mse_loss(model(inputs), targets).backward()
        optimizer.step()
        step_feedback(model)
    assert 60 < start < 120
    assert angle_deg(top.weight.detach(), top.feedback) < 10
    assert F.mse_loss(model(inputs), targets) < 0.1 * targets.var()


@pytest.mark.parametrize("rule", RULES)
def test_state_dict_round_trip(rule):
    torch.manual_seed(12)
    model = convert(paper_convnet(1, 16, 4), rule)
    x = torch.randn(5, 1, 16, 16)
    model(x).sum().backward()  # dfa draws its feedback here
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert "fc1.feedback" in saved and "fc1.weight" in saved

    torch.manual_seed(13)  # a different init, replaced by the load
    fresh = convert(paper_convnet(1, 16, 4), rule)
    fresh.load_state_dict(saved)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    if rule != "brsf":  # brsf redraws its magnitudes every backward pass
        model.zero_grad()
        for net in (model, fresh):
            net(x).sum().backward()
        pairs = zip(model.named_parameters(), fresh.parameters(), strict=True)
        for (name, p), q in pairs:
            torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_convert_with_rule_dict_keeps_parameters_and_dtype():
    model = paper_convnet(3, 32, 10).double()
    parameters = list(model.parameters())
    rules = {"fc1": "learned", "fc2": "learned", "fc3": "learned", "default": "fa"}
    converted = convert(model, rules)
    assert {name: layer.rule for name, layer in feedback_layers(converted)} == {
        "features.0": "fa",
        "features.4": "fa",
        "fc1": "learned",
        "fc2": "learned",
        "fc3": "learned",
    }
    assert all(p is q for p, q in zip(parameters, converted.parameters(), strict=True))
    assert converted.fc1.feedback.dtype == torch.float64
    assert isinstance(converted.fc1, nn.Linear) and converted.fc1.in_features == 1600
    # without "default" the other layers stay as they were
    partial = convert(paper_convnet(1, 28, 10), {"fc3": "kp"}, lr=0.1)
    assert [name for name, _ in feedback_layers(partial)] == ["fc3"]
    assert partial.fc3.feedback_rule.lr == 0.1


def test_set_feedback_checks_shape_and_values():
    model = convert(paper_convnet(3, 32, 10), {"fc1": "learned", "default": "fa"})
    new = torch.randn(384, 1600)
    model.fc1.set_feedback(new.numpy())
    assert torch.equal(model.fc1.feedback, new)
    with pytest.raises(UserError, match=r"'fc1': expected shape \(384, 1600\), got \(1600, 384\)"):
        model.fc1.set_feedback(new.T)
    bad = new.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(UserError, match="'fc1'.*NaN"):
        model.fc1.set_feedback(bad)
    usf = convert(paper_convnet(3, 32, 10), "usf")
    with pytest.raises(UserError, match="rule 'usf'"):
        usf.fc1.set_feedback(new)


def test_unknown_rule_and_option_are_clear_errors():
    with pytest.raises(UserError, match="unknown learning rule 'sgd'; valid rules: bp, fa, usf"):
        convert(nn.Linear(2, 2), "sgd")
    with pytest.raises(UserError, match="unknown option.*lr.*rule.*fa.*valid options: feedback"):
        convert(nn.Linear(2, 2), "fa", lr=0.1)
    with pytest.raises(UserError, match="unknown option.*noise.*valid options: lr, weight_decay"):
        convert(nn.Linear(2, 2), "kp", noise=0.1)
    with pytest.raises(UserError, match="'fc9'.*convertible modules: features.0"):
        convert(paper_convnet(), {"fc9": "fa"})
    with pytest.raises(UserError, match="unknown learning rule 'fb'"):
        convert(paper_convnet(), {"fc1": "fb"})
    with pytest.raises(UserError, match="draws on meta at every step but its generator is on cpu"):
        FeedbackLinear(2, 2, device="meta", rule="brsf", generator=torch.Generator())


class CustomLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_unconvertible_modules_are_named_in_one_warning():
    model = nn.Sequential(
        nn.Conv1d(2, 2, 1),
        nn.ConvTranspose2d(2, 2, 1),
        nn.Bilinear(2, 2, 2),
        CustomLinear(2, 2),
        nn.BatchNorm1d(2),
        nn.Linear(2, 2),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = convert(model, "fa")
    assert len(caught) == 1
    message = str(caught[0].message)
    for name in ("0 (Conv1d)", "1 (ConvTranspose2d)", "2 (Bilinear)", "3 (CustomLinear)"):
        assert name in message
    assert "BatchNorm" not in message
    assert [name for name, _ in feedback_layers(converted)] == ["5"]


def test_step_feedback_leaves_fixed_rules_alone():
    torch.manual_seed(14)
    model = convert(paper_convnet(1, 16, 4), "fa")
    before = [layer.feedback.clone() for _, layer in feedback_layers(model)]
    model(torch.randn(3, 1, 16, 16)).sum().backward()
    step_feedback(model)
    for (_, layer), feedback in zip(feedback_layers(model), before, strict=True):
        assert torch.equal(layer.feedback, feedback)


# --------------------------------------------------------------------------------------------
# Mixed precision (bf16 autocast) and channels_last
# --------------------------------------------------------------------------------------------

BF16_UNIT_ROUNDOFF = 2.0**-8  # bf16 keeps 8 significant bits: one rounding errs by <= 2^-8 relative


def bf16_tolerance(device: str, exact: Tensor) -> dict[str, float]:
    """How far a bf16-autocast gradient may be from the exact value on bf16-rounded operands.

    With bf16 operands the products are exact in float32 and summed in float32 (CPU/oneDNN), so
    the only error is the final rounding of the result to bf16: relative 2^-8, plus a float32
    accumulation error far below 1e-5 of the largest entry. cuBLAS/cuDNN may also round partial
    sums to bf16 (allow_bf16_reduced_precision_reduction), each adding up to 2^-8 of the partial
    sum, which is bounded by the largest entry times the few split-K chunks: 4 roundings allowed.
    """
    scale = exact.abs().max().item()
    if device == "cpu":
        return dict(rtol=BF16_UNIT_ROUNDOFF, atol=1e-5 * scale)
    return dict(rtol=4 * BF16_UNIT_ROUNDOFF, atol=4 * BF16_UNIT_ROUNDOFF * scale)


def bf16_exact(t: Tensor) -> Tensor:
    """``t`` rounded to bf16 as autocast rounds an operand, then held exactly in float64."""
    return t.detach().to(torch.bfloat16).to(DTYPE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", LAYER_RULES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_autocast_gradients_equal_hand_computation(rule, device, channels_last):
    """Under bf16 autocast every rule's gradients are the float32 hand computation on the
    bf16-rounded operands up to bf16's own rounding, and arrive in the parameters' float32."""
    torch.manual_seed(4)
    conv = convert(nn.Conv2d(8, 16, 3, padding=1, device=device), rule)
    x = torch.randn(4, 8, 12, 12, device=device)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.bfloat16
    delta = torch.randn_like(out)
    out.backward(delta)
    grad_x = conv2d_input(x.shape, bf16_exact(conv.feedback), bf16_exact(delta), 1, 1)
    grad_w = conv2d_weight(bf16_exact(x), conv.weight.shape, bf16_exact(delta), 1, 1)
    grad_b = bf16_exact(delta).sum((0, 2, 3))
    for got, exact in ((x.grad, grad_x), (conv.weight.grad, grad_w), (conv.bias.grad, grad_b)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.to(DTYPE), exact, **bf16_tolerance(device, exact))

    linear = FeedbackLinear(20, 7, device=device, rule=rule)
    x = torch.randn(5, 20, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = linear(x)
    delta = torch.randn_like(out)
    out.backward(delta)
    grad_x = bf16_exact(delta) @ bf16_exact(linear.feedback)
    grad_w = bf16_exact(delta).T @ bf16_exact(x)
    for got, exact in ((x.grad, grad_x), (linear.weight.grad, grad_w)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.to(DTYPE), exact, **bf16_tolerance(device, exact))


def tiny_resnet_batch(device, channels_last: bool):
    torch.manual_seed(5)
    model = torchvision.models.resnet18(num_classes=10).to(device).eval()
    x = torch.randn(2, 3, 32, 32, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return model, x


def input_and_parameter_grads(model: nn.Module, x: Tensor, amp: bool):
    x = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(x)
    out.float().square().sum().backward()
    return [x.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_bp_under_bf16_autocast_equals_autograd(device, channels_last, fixed_cudnn_algorithms):
    """Converted bp runs the same bf16 operations as autocast's own conv/linear backward."""
    reference, x = tiny_resnet_batch(device, channels_last)
    converted = convert(copy.deepcopy(reference), "bp")
    expected = input_and_parameter_grads(reference, x, amp=True)
    got = input_and_parameter_grads(converted, x, amp=True)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype == torch.float32
        scale = e.abs().max().item()
        torch.testing.assert_close(g, e, rtol=0, atol=BF16_UNIT_ROUNDOFF * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", ["fa", "usf"])
def test_channels_last_gives_the_same_gradients(rule, device, ieee_float32, fixed_cudnn_algorithms):
    """float32: a converted resnet18 in channels_last computes what it computes contiguous.

    Precision: IEEE float32 on both sides (TF32 off: with it, cuDNN's NHWC and NCHW kernels round
    at 10 mantissa bits in different orders, about 1e-3 apart); the two layouts still sum in
    different orders, hence rtol 1e-4.
    """
    model, x = tiny_resnet_batch(device, channels_last=False)
    contiguous = convert(model, rule)
    nhwc = copy.deepcopy(contiguous).to(memory_format=torch.channels_last)
    expected = input_and_parameter_grads(contiguous, x, amp=False)
    got = input_and_parameter_grads(nhwc, x.contiguous(memory_format=torch.channels_last), False)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * e.abs().max().item())


def test_feedback_drawn_at_conversion_keeps_the_weights_memory_format():
    model = nn.Sequential(nn.Conv2d(3, 8, 3)).to(memory_format=torch.channels_last)
    layer = convert(model, "fa")[0]
    assert layer.feedback.is_contiguous(memory_format=torch.channels_last)
