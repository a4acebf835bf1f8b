"""ImageNet-scale networks (METHOD 8): BN-AlexNet's layers, ResNet-18's conversion, the last
layer kept on backprop, and the feedback scales of Xiao et al. (2019)'s code."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from spikealign.errors import UserError
from spikealign.feedback import FeedbackLinear, feedback_layers, xiao2019_scale
from spikealign.models import alexnet_bn, build_model, convert_model, resnet18

# METHOD 8's BN-AlexNet, in module order: (kind, settings)
ALEXNET_BN_LAYERS = [
    ("conv", (3, 64, (11, 11), (4, 4), (2, 2))),
    ("bn", 64), ("relu",), ("pool",),
    ("conv", (64, 192, (5, 5), (1, 1), (2, 2))),
    ("bn", 192), ("relu",), ("pool",),
    ("conv", (192, 384, (3, 3), (1, 1), (1, 1))),
    ("bn", 384), ("relu",),
    ("conv", (384, 256, (3, 3), (1, 1), (1, 1))),
    ("bn", 256), ("relu",),
    ("conv", (256, 256, (3, 3), (1, 1), (1, 1))),
    ("bn", 256), ("relu",), ("pool",),
    ("avgpool", 6),
    ("linear", (9216, 4096, False)), ("bn1d", 4096), ("relu",),
    ("linear", (4096, 4096, False)), ("bn1d", 4096), ("relu",),
    ("linear", (4096, 1000, True)),
]  # fmt: skip


def describe(module: nn.Module):
    if isinstance(module, nn.Conv2d):
        assert module.bias is None  # no bias before batch norm
        return ("conv", (module.in_channels, module.out_channels, module.kernel_size,
                         module.stride, module.padding))  # fmt: skip
    if isinstance(module, nn.BatchNorm2d):
        return ("bn", module.num_features)
    if isinstance(module, nn.BatchNorm1d):
        return ("bn1d", module.num_features)
    if isinstance(module, nn.ReLU):
        return ("relu",)
    if isinstance(module, nn.MaxPool2d):
        assert (module.kernel_size, module.stride) == (3, 2)
        return ("pool",)
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return ("avgpool", module.output_size)
    if isinstance(module, nn.Linear):
        return ("linear", (module.in_features, module.out_features, module.bias is not None))
    raise AssertionError(f"unexpected module {module}")


def test_alexnet_bn_is_method_8s_network():
    model = alexnet_bn()
    leaves = [m for m in model.modules() if not list(m.children())]
    assert [describe(m) for m in leaves] == ALEXNET_BN_LAYERS
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    features = model.features(torch.zeros(1, 3, 224, 224))
    assert features.shape == (1, 256, 6, 6)  # the adaptive pool is the identity at 224 px
    assert alexnet_bn(num_classes=7).classifier[-1].out_features == 7


def test_alexnet_bn_smallest_image_and_too_small_is_a_clear_error():
    model = build_model("alexnet_bn", 3, 63, 5).train()
    assert model(torch.randn(2, 3, 63, 63)).shape == (2, 5)
    with pytest.raises(UserError, match=r"at least 63x63 pixels.*got 62x62.*--image-size 63"):
        build_model("alexnet_bn", 3, 62, 5)
    with pytest.raises(UserError, match="unknown arch 'vgg'"):
        build_model("vgg", 3, 224, 5)


def test_every_conv_of_resnet18_is_converted_and_the_last_layer_stays_bp():
    rule = "usf"
    model = convert_model(resnet18(num_classes=10), rule)
    names = {name for name, _ in feedback_layers(model)}
    convs = [name for name, m in resnet18().named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20 and names == set(convs)  # stem, 16 block convs, 3 downsample convs
    assert {"conv1", "layer2.0.downsample.0", "layer4.0.downsample.0"} <= names
    assert type(model.fc) is nn.Linear
    assert all(layer.rule == rule for _, layer in feedback_layers(model))

    every = convert_model(model, "fa", last_layer="rule")  # reconverts the converted layers too
    assert isinstance(every.fc, FeedbackLinear) and every.fc.rule == "fa"
    assert {name for name, _ in feedback_layers(every)} == names | {"fc"}
    alex = convert_model(alexnet_bn(10), rule)
    assert [n for n, _ in feedback_layers(alex)][-2:] == ["classifier.0", "classifier.3"]
    assert type(alex.classifier[6]) is nn.Linear


def test_last_layer_kept_on_bp_gets_the_backprop_gradient():
    torch.manual_seed(0)
    model = convert_model(build_model("paper", 3, 32, 4), "fa")
    x = torch.randn(3, 3, 32, 32)
    hidden = model.norm2(model.relu(model.fc2(model.norm1(model.relu(model.fc1(
        model.flatten(model.features(x))))))))  # fmt: skip
    hidden = hidden.detach().requires_grad_()
    delta = torch.randn(3, 4)
    model.fc3(hidden).backward(delta)
    torch.testing.assert_close(hidden.grad, delta @ model.fc3.weight.detach())
    assert isinstance(model.fc2, FeedbackLinear) and model.fc2.rule == "fa"


def test_bad_last_layer_and_scales_are_clear_errors():
    with pytest.raises(UserError, match="unknown last_layer 'all'; choose one of bp, rule"):
        convert_model(resnet18(10), "fa", last_layer="all")
    with pytest.raises(UserError, match="unknown feedback_scales 'he'"):
        convert_model(resnet18(10), "fa", feedback_scales="he")


def small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),  # resnet18's stem
        nn.Conv2d(64, 256, 3),  # 147k entries: a sample std within 0.5% of c
        nn.Flatten(),
        nn.Linear(512, 10),
    )


def test_xiao2019_scales_are_the_authors_constants():
    torch.manual_seed(1)
    usf = convert_model(small_net(), "usf", last_layer="rule", feedback_scales="xiao2019")
    constants = {
        "0": math.sqrt(2 / (7 * 7 * 64)),
        "1": math.sqrt(2 / (3 * 3 * 256)),
        "3": 1 / 512**0.5,
    }
    for name, layer in feedback_layers(usf):
        assert xiao2019_scale(layer) == pytest.approx(constants[name])
        expected = torch.sign(layer.weight.detach()) * constants[name]
        torch.testing.assert_close(layer.feedback, expected, msg=name)

    torch.manual_seed(2)
    fa = convert_model(small_net(), "fa", last_layer="rule", feedback_scales="xiao2019")
    c = constants["1"]
    conv_feedback = fa[1].feedback
    assert conv_feedback.std().item() == pytest.approx(c, rel=0.01)
    assert conv_feedback.mean().item() == pytest.approx(0.0, abs=0.01 * c)
    assert conv_feedback.abs().max().item() > 3 * c  # normal, not uniform (bounded by sqrt(3) c)
    c_fc = constants["3"]
    assert fa[3].feedback.abs().max().item() <= c_fc
    assert fa[3].feedback.std().item() == pytest.approx(c_fc / math.sqrt(3), rel=0.1)

    torch.manual_seed(2)
    frsf = convert_model(small_net(), "frsf", last_layer="rule", feedback_scales="xiao2019")
    layer = frsf[1]
    torch.testing.assert_close(layer.feedback_magnitude, conv_feedback.abs())  # fa's draw
    torch.testing.assert_close(
        layer.feedback, torch.sign(layer.weight.detach()) * conv_feedback.abs()
    )

    torch.manual_seed(3)
    bp = convert_model(small_net(), "bp", last_layer="rule", feedback_scales="xiao2019")
    torch.testing.assert_close(bp[0].feedback, bp[0].weight.detach())  # other rules untouched
