"""ImageFolder datasets (imagenet, imagefolder) on tiny trees of real JPEG files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from spikealign.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_dataset,
)
from spikealign.errors import UserError
from tests.tiny_images import write_image_folder


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("imagefolder"), per_class=3)


def test_imagefolder_classes_labels_and_eval_transform(tree):
    bundle = load_dataset("imagefolder", tree, image_size=16)
    assert bundle.class_names == ("n01440764", "n01443537") and bundle.num_classes == 2
    assert (bundle.in_channels, bundle.image_size, bundle.multilabel) == (3, 16, False)
    assert [label for _, label in bundle.test] == [0, 0, 0, 1, 1, 1]
    # eval: resize the short side (40 px) to round(16 * 256/224) = 18, centre-crop 16, normalise
    path, label = bundle.test.samples[4]
    with Image.open(path) as jpeg:
        decoded = jpeg.convert("RGB")
    short = 18
    resized = decoded.resize((short, round(48 * short / 40)), Image.BILINEAR)
    left, top = (short - 16) // 2, (resized.height - 16) // 2
    crop = np.asarray(resized.crop((left, top, left + 16, top + 16)), dtype=np.float32) / 255
    expected = torch.from_numpy(crop).permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN)[:, None, None]
    expected = expected / torch.tensor(IMAGENET_STD)[:, None, None]
    image, target = bundle.test[4]
    assert target == 1 and image.shape == (3, 16, 16) and image.dtype == torch.float32
    # antialiased resizes of torchvision and PIL differ by a few grey levels
    assert (image - expected).abs().mean() < 0.05


def test_imagenet_default_size_and_random_training_crops(tree):
    bundle = load_dataset("imagenet", tree)
    assert bundle.image_size == 224 and bundle.test[0][0].shape == (3, 224, 224)
    torch.manual_seed(0)
    first = bundle.train[0][0]
    assert first.shape == (3, 224, 224)
    assert any(not torch.equal(first, bundle.train[0][0]) for _ in range(5))  # random crop/flip
    fixed = load_dataset("imagenet", tree, image_size=32, augment=False)
    assert torch.equal(fixed.train[0][0], fixed.train[0][0])


def one_line_error(match: str, *args, **kwargs) -> None:
    with pytest.raises(UserError, match=match) as raised:
        load_dataset(*args, **kwargs)
    assert "\n" not in str(raised.value)


def test_bad_trees_are_one_line_errors(tmp_path):
    root = write_image_folder(tmp_path / "a", per_class=1, splits=("train",))
    one_line_error(r"has no val/ folder; --data-dir must hold train/<class>", "imagefolder", root)
    one_line_error("cannot be downloaded", "imagenet", root, download=True)

    root = write_image_folder(tmp_path / "b", per_class=1)
    (root / "val" / "n01443537").rename(root / "val" / "n09999999")
    one_line_error(
        r"different classes \(only in train/: n01443537; only in val/: n09999999\)",
        "imagefolder",
        root,
    )

    root = write_image_folder(tmp_path / "c", per_class=1)
    for split in ("train", "val"):
        (root / split / "n02000000").mkdir()
    one_line_error(r"train: Found no valid file for the classes n02000000", "imagefolder", root)

    shutil.rmtree(root / "val")
    (root / "val").mkdir()
    one_line_error("val has no class folders", "imagefolder", root)
