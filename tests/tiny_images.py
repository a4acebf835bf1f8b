"""Tiny ImageFolder trees of real JPEG files, in ImageNet's layout, for the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def class_colour(index: int) -> np.ndarray:
    """A distinct mean colour per class, so a network can tell the classes apart."""
    return np.array([(80 * index + 40) % 256, (150 * index + 90) % 256, (40 * index + 200) % 256])


def write_image_folder(
    root: Path,
    classes=("n01440764", "n01443537"),
    per_class: int = 4,
    size: tuple[int, int] = (40, 48),
    splits=("train", "val"),
    seed: int = 0,
) -> Path:
    """root/<split>/<class>/<class>_<i>.JPEG: noisy images of size (width, height) per class."""
    rng = np.random.default_rng(seed)
    width, height = size
    for split in splits:
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                noise = rng.integers(-30, 31, size=(height, width, 3))
                pixels = np.clip(class_colour(index) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}_{i}.JPEG", quality=90)
    return root
