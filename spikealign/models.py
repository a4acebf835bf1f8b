"""The paper's convolutional network (METHOD section 6).

    conv 5x5 in->64 (no bias, no padding) -> ReLU -> BatchNorm2d -> maxpool 2
    conv 5x5 64->64 (no bias)             -> ReLU -> BatchNorm2d -> maxpool 2
    flatten: 64 * s2 * s2 with s2 = ((image_size - 4) // 2 - 4) // 2   (1600 for 32, 1024 for 28)
    fc1 flat->384 -> ReLU -> BatchNorm1d
    fc2 384->192  -> ReLU -> BatchNorm1d
    fc3 192->num_classes (logits, no softmax)

Weights and biases keep PyTorch's default Kaiming-uniform init. Only fc1..fc3 get feedback from
the spiking RDD phase (``fc_layers``); the convolutions keep fixed random feedback.
"""

from __future__ import annotations

from torch import Tensor, nn

from spikealign.errors import UserError

__all__ = ["FC_LAYER_NAMES", "PaperConvNet", "fc_layers", "paper_convnet"]

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
