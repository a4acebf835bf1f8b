"""Networks of the trainer: the paper's convnet (METHOD 6), ResNet-18 and BN-AlexNet (METHOD 8).

The paper's convolutional network (METHOD section 6):

    conv 5x5 in->64 (no bias, no padding) -> ReLU -> BatchNorm2d -> maxpool 2
    conv 5x5 64->64 (no bias)             -> ReLU -> BatchNorm2d -> maxpool 2
    flatten: 64 * s2 * s2 with s2 = ((image_size - 4) // 2 - 4) // 2   (1600 for 32, 1024 for 28)
    fc1 flat->384 -> ReLU -> BatchNorm1d
    fc2 384->192  -> ReLU -> BatchNorm1d
    fc3 192->num_classes (logits, no softmax)

Weights and biases keep PyTorch's default Kaiming-uniform init. Only fc1..fc3 get feedback from
the spiking RDD phase (``fc_layers``); the convolutions keep fixed random feedback.

BN-AlexNet (``alexnet_bn``, Xiao et al. 2019: torchvision's AlexNet with batch norm before every
ReLU, no bias before batch norm, no dropout), for 224 x 224 images:

    conv 11x11/4 pad 2 in->64   BN ReLU maxpool 3/2      (55 -> 27)
    conv 5x5 pad 2    64->192   BN ReLU maxpool 3/2      (27 -> 13)
    conv 3x3 pad 1    192->384  BN ReLU
    conv 3x3 pad 1    384->256  BN ReLU
    conv 3x3 pad 1    256->256  BN ReLU maxpool 3/2      (13 -> 6)
    adaptive average pool to 6x6 (torchvision's; the identity at 224 px), flatten 256*6*6
    fc 9216->4096 (no bias) BN1d ReLU;  fc 4096->4096 (no bias) BN1d ReLU;  fc 4096->num_classes

Conv and linear layers keep PyTorch's default init, as in the authors' code. The feature map
survives the three max-pools for images of at least ``ALEXNET_MIN_IMAGE_SIZE`` = 63 pixels.
``resnet18`` is torchvision's (``weights=None``), its 7x7 stem taking ``in_channels``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torchvision
from torch import Tensor, nn

from spikealign import feedback
from spikealign.errors import UserError

__all__ = [
    "ARCHS",
    "FC_LAYER_NAMES",
    "AlexNetBN",
    "PaperConvNet",
    "alexnet_bn",
    "build_model",
    "convert_model",
    "fc_layers",
    "last_linear_name",
    "paper_convnet",
    "resnet18",
    "resnet50",
]

#: architectures the trainer builds (``build_model``)
ARCHS = ("paper", "resnet18", "resnet50", "alexnet_bn")
#: what becomes of the last linear layer: stays backprop ("bp") or gets the rule ("rule")
LAST_LAYER_CHOICES = ("bp", "rule")
#: feedback scales: each rule's own defaults, or those of Xiao et al.'s code (METHOD 8)
FEEDBACK_SCALES = ("default", "xiao2019")

#: attribute names of the fully connected layers, input to output
FC_LAYER_NAMES = ("fc1", "fc2", "fc3")

_KERNEL = 5
_CHANNELS = 64


def _feature_size(image_size: int) -> int:
    """Side of the feature map after the two (conv 5x5, maxpool 2) stages."""
    return ((image_size - (_KERNEL - 1)) // 2 - (_KERNEL - 1)) // 2


class PaperConvNet(nn.Module):
    """Attributes: ``features`` (conv part), ``fc1``, ``fc2``, ``fc3`` and their norms."""

    def __init__(self, in_channels: int = 3, image_size: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise UserError(
                f"paper_convnet: in_channels ({in_channels}) and num_classes ({num_classes}) "
                "must be at least 1"
            )
        side = _feature_size(image_size)
        if side < 1:
            raise UserError(
                f"paper_convnet: image_size {image_size} is too small; the two 5x5 convolutions "
                "and 2x2 max-pools need images of at least 16x16 pixels"
            )
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, _CHANNELS, _KERNEL, bias=False),
            nn.ReLU(),
            nn.BatchNorm2d(_CHANNELS),
            nn.MaxPool2d(2),
            nn.Conv2d(_CHANNELS, _CHANNELS, _KERNEL, bias=False),
            nn.ReLU(),
            nn.BatchNorm2d(_CHANNELS),
            nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(_CHANNELS * side * side, 384)
        self.norm1 = nn.BatchNorm1d(384)
        self.fc2 = nn.Linear(384, 192)
        self.norm2 = nn.BatchNorm1d(192)
        self.fc3 = nn.Linear(192, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(self.features(x))
        x = self.norm1(self.relu(self.fc1(x)))
        x = self.norm2(self.relu(self.fc2(x)))
        return self.fc3(x)


def paper_convnet(in_channels: int = 3, image_size: int = 32, num_classes: int = 10) -> nn.Module:
    """The paper's network for square images of ``image_size`` pixels (see module docstring)."""
    return PaperConvNet(in_channels, image_size, num_classes)


def fc_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """[("fc1", layer), ("fc2", layer), ("fc3", layer)]: the layers fed to the spiking phase.

    Works on converted models too (the layers are then FeedbackLinear).
    """
    missing = [name for name in FC_LAYER_NAMES if not hasattr(model, name)]
    if missing:
        raise UserError(
            f"fc_layers: model {type(model).__name__} has no {', '.join(missing)}; "
            "use a model built by paper_convnet"
        )
    return [(name, getattr(model, name)) for name in FC_LAYER_NAMES]


# --------------------------------------------------------------------------------------------
# ImageNet-scale networks (METHOD 8)
# --------------------------------------------------------------------------------------------

#: smallest square image whose feature map survives BN-AlexNet's stride-4 stem and three pools
ALEXNET_MIN_IMAGE_SIZE = 63
_ALEXNET_POOLED_SIDE = 6


def _alexnet_feature_side(image_size: int) -> int:
    """Side of BN-AlexNet's last feature map (before the adaptive pool)."""
    side = (image_size + 2 * 2 - 11) // 4 + 1  # stem conv 11x11, stride 4, padding 2
    for _ in range(3):  # max-pool 3x3 stride 2 (the 5x5 and 3x3 convs keep the size)
        side = (side - 3) // 2 + 1
    return side


def _conv_bn_relu(in_channels: int, out_channels: int, **conv) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, bias=False, **conv),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class AlexNetBN(nn.Module):
    """BN-AlexNet of Xiao et al. (2019) (see module docstring): ``features``, ``avgpool``,
    ``classifier`` as torchvision's AlexNet."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise UserError(
                f"alexnet_bn: in_channels ({in_channels}) and num_classes ({num_classes}) "
                "must be at least 1"
            )
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, 64, kernel_size=11, stride=4, padding=2),
            nn.MaxPool2d(kernel_size=3, stride=2),
            *_conv_bn_relu(64, 192, kernel_size=5, padding=2),
            nn.MaxPool2d(kernel_size=3, stride=2),
            *_conv_bn_relu(192, 384, kernel_size=3, padding=1),
            *_conv_bn_relu(384, 256, kernel_size=3, padding=1),
            *_conv_bn_relu(256, 256, kernel_size=3, padding=1),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(_ALEXNET_POOLED_SIDE)
        hidden = 4096
        self.classifier = nn.Sequential(
            nn.Linear(256 * _ALEXNET_POOLED_SIDE**2, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def alexnet_bn(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """BN-AlexNet of Xiao et al. (2019), METHOD 8 (see module docstring)."""
    return AlexNetBN(num_classes, in_channels)


def resnet18(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18, untrained; a stem for ``in_channels`` initialised as torchvision's
    (kaiming normal, fan-out) when it is not 3."""
    return _torchvision_resnet("resnet18", num_classes, in_channels)


def resnet50(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-50, untrained (as :func:`resnet18`): the trunk that
    ``training.detect --backbone-checkpoint`` puts under RetinaNet."""
    return _torchvision_resnet("resnet50", num_classes, in_channels)


def _torchvision_resnet(name: str, num_classes: int, in_channels: int) -> nn.Module:
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if in_channels != 3:
        stem = model.conv1
        model.conv1 = nn.Conv2d(
            in_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding, bias=False
        )
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def build_model(arch: str, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """The network ``arch`` (one of :data:`ARCHS`) for square images of ``image_size`` pixels.

    Raises UserError when the images are too small for the architecture.
    """
    if arch == "paper":
        return paper_convnet(in_channels, image_size, num_classes)
    if arch == "alexnet_bn":
        if _alexnet_feature_side(image_size) < 1:
            raise UserError(
                f"arch alexnet_bn needs images of at least {ALEXNET_MIN_IMAGE_SIZE}x"
                f"{ALEXNET_MIN_IMAGE_SIZE} pixels (its stride-4 stem and three max-pools), got "
                f"{image_size}x{image_size}; pass --image-size {ALEXNET_MIN_IMAGE_SIZE} or more, "
                "or use --arch resnet18 or paper"
            )
        return alexnet_bn(num_classes, in_channels)
    if arch == "resnet18":
        return resnet18(num_classes, in_channels)
    if arch == "resnet50":
        return resnet50(num_classes, in_channels)
    raise UserError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")


def last_linear_name(model: nn.Module) -> str:
    """Qualified name of the model's last nn.Linear in module order (its classifier output)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise UserError(f"model {type(model).__name__} has no Linear layer to keep on backprop")
    return names[-1]


def convert_model(
    model: nn.Module,
    rule: str | Mapping[str, str],
    last_layer: str = "bp",
    feedback_scales: str = "default",
    **options,
) -> nn.Module:
    """``feedback.convert`` every conv and linear layer of ``model`` (stem and downsample convs
    included) to ``rule`` (a name or a {module name: rule} dict as convert takes).

    ``last_layer="bp"`` keeps the last linear layer an ordinary nn.Linear (the authors' default);
    ``"rule"`` converts it too. ``feedback_scales="xiao2019"`` then sets the usf/fa/frsf feedback
    with ``feedback.xiao2019_feedback``. ``options`` go to convert.
    """
    if last_layer not in LAST_LAYER_CHOICES:
        raise UserError(
            f"unknown last_layer {last_layer!r}; choose one of {', '.join(LAST_LAYER_CHOICES)}"
        )
    if feedback_scales not in FEEDBACK_SCALES:
        raise UserError(
            f"unknown feedback_scales {feedback_scales!r}; choose one of "
            f"{', '.join(FEEDBACK_SCALES)}"
        )
    rules = dict(rule) if isinstance(rule, Mapping) else {"default": rule}
    if last_layer == "bp":
        rules[last_linear_name(model)] = None
    model = feedback.convert(model, rules, **options)
    if feedback_scales == "xiao2019":
        feedback.xiao2019_feedback(model)
    return model
