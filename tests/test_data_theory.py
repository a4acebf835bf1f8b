"""MNIST, CIFAR-100 and Tiny ImageNet in spikealign.data, on small files in their real formats.

As in test_data.py, torchvision's md5 check of the CIFAR pickles is replaced by an existence check
(``md5_free``): files made here cannot match the published archives.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from PIL import Image

from spikealign.data import load_dataset
from spikealign.errors import UserError
from tests.test_data import assert_one_line, fashion_images, normalised, write_idx


@pytest.fixture
def md5_free(monkeypatch):
    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath)
    )


def write_mnist(root: Path) -> dict:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    splits = {}
    for prefix, count, offset in (("train", 12, 0), ("t10k", 6, 50)):
        images = fashion_images(count, offset)
        labels = (np.arange(count) * 7 + offset) % 10
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, 2051)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, 2049)
        splits[prefix] = (images, labels)
    return splits


FINE_NAMES = [f"class_{i:02d}" for i in range(100)]


def write_cifar100(root: Path) -> dict:
    """cifar-100-python/{train, test, meta}: pickles with fine and coarse labels."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    splits = {}
    for name, count in (("train", 6), ("test", 3)):
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        fine = [(17 * i + 3) % 100 for i in range(count)]
        entry = {"filenames": ["x"] * count, "batch_label": name, "fine_labels": fine,
                 "coarse_labels": [f // 5 for f in fine], "data": data}  # fmt: skip
        with open(folder / name, "wb") as file:
            pickle.dump(entry, file, protocol=2)
        splits[name] = (data, fine)
    meta = {"fine_label_names": FINE_NAMES, "coarse_label_names": [f"c{i}" for i in range(20)]}
    with open(folder / "meta", "wb") as file:
        pickle.dump(meta, file, protocol=2)
    return splits


WNIDS = [f"n{index:08d}" for index in range(200)]


def colour(index: int) -> tuple[int, int, int]:
    return (index % 256, (7 * index) % 256, (13 * index + 40) % 256)


def write_tiny_imagenet(root: Path, wnids=WNIDS) -> Path:
    """tiny-imagenet-200 as its zip unpacks: 1 train image per class (2 for the first), 3 val."""
    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    # wnids.txt is not sorted in the archive; classes are numbered in sorted order
    (base / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")
    (base / "words.txt").write_text(
        "".join(f"{wnid}\tthing {i}, other name\n" for i, wnid in enumerate(WNIDS))
    )
    for index, wnid in enumerate(wnids):
        images = base / "train" / wnid / "images"
        images.mkdir(parents=True)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for number in range(2 if index == 0 else 1):
            path = images / f"{wnid}_{number}.JPEG"
            Image.new("RGB", (64, 64), colour(index)).save(path, quality=95)
    lines = []
    for number, class_index in enumerate((5, 0, 199)):
        name = f"val_{number}.JPEG"
        Image.new("RGB", (64, 64), colour(class_index)).save(base / "val" / "images" / name)
        lines.append(f"{name}\t{wnids[class_index]}\t0\t0\t63\t63\n")
    (base / "val" / "val_annotations.txt").write_text("".join(lines))
    return base


def test_mnist_loads_idx_files_without_augmentation(tmp_path):
    written = write_mnist(tmp_path)
    bundle = load_dataset("mnist", tmp_path, augment=True)
    assert (bundle.in_channels, bundle.image_size, bundle.num_classes) == (1, 28, 10)
    assert bundle.class_names == tuple("0123456789")
    assert (len(bundle.train), len(bundle.test)) == (12, 6)
    for dataset, (images, labels) in ((bundle.train, written["train"]),
                                      (bundle.test, written["t10k"])):  # fmt: skip
        image, label = dataset[5]
        assert label == labels[5]
        expected = (torch.from_numpy(images[5]).float() / 255 - 0.5) / 0.5
        torch.testing.assert_close(image[0], expected)  # digits: never cropped or flipped


def test_cifar100_loads_pickles_with_fine_labels(tmp_path, md5_free):
    written = write_cifar100(tmp_path)
    bundle = load_dataset("cifar100", tmp_path, augment=False)
    assert (bundle.in_channels, bundle.image_size, bundle.num_classes) == (3, 32, 100)
    assert bundle.class_names == tuple(FINE_NAMES)
    assert (len(bundle.train), len(bundle.test)) == (6, 3)
    data, fine = written["train"]
    image, label = bundle.train[4]
    assert label == fine[4]
    for channel, row, col in ((0, 0, 0), (1, 9, 30), (2, 31, 31)):
        pixel = data[4, channel * 1024 + row * 32 + col]
        assert image[channel, row, col].item() == pytest.approx(normalised(pixel))
    assert bundle.test[2][1] == written["test"][1][2]


def test_tiny_imagenet_loads_the_folder_layout(tmp_path):
    write_tiny_imagenet(tmp_path)
    bundle = load_dataset("tiny-imagenet", tmp_path, augment=False)
    assert (bundle.in_channels, bundle.image_size, bundle.num_classes) == (3, 64, 200)
    assert bundle.class_names[3] == "thing 3"  # first name from words.txt
    assert (len(bundle.train), len(bundle.test)) == (201, 3)
    image, label = bundle.train[2]  # class 0 has two images, so item 2 is class 1
    assert label == 1 and image.shape == (3, 64, 64)
    expected = torch.tensor([normalised(v) for v in colour(1)])
    torch.testing.assert_close(image.mean(dim=(1, 2)), expected, atol=0.02, rtol=0)
    assert [bundle.test[i][1] for i in range(3)] == [5, 0, 199]
    torch.testing.assert_close(
        bundle.test[2][0].mean(dim=(1, 2)),
        torch.tensor([normalised(v) for v in colour(199)]),
        atol=0.02, rtol=0,
    )  # fmt: skip
    assert load_dataset("tiny-imagenet", tmp_path, image_size=32).train[0][0].shape == (3, 32, 32)


def test_broken_files_are_one_line_errors(tmp_path, md5_free):
    write_cifar100(tmp_path / "c")
    (tmp_path / "c" / "cifar-100-python" / "test").write_bytes(b"\x80\x02broken")
    with pytest.raises(UserError) as err:
        load_dataset("cifar100", tmp_path / "c")
    assert "corrupt" in assert_one_line(err)

    base = write_tiny_imagenet(tmp_path / "t", wnids=WNIDS)
    (base / "wnids.txt").write_text("\n".join(WNIDS[:150]) + "\n")
    with pytest.raises(UserError) as err:
        load_dataset("tiny-imagenet", tmp_path / "t")
    assert "150 classes, expected 200" in assert_one_line(err)

    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(UserError) as err:
        load_dataset("tiny-imagenet", tmp_path / "t")
    assert "no known wnid" in assert_one_line(err) and "delete" in assert_one_line(err)

    (base / "val" / "val_annotations.txt").write_text(f"gone.JPEG\t{WNIDS[0]}\t0\t0\t1\t1\n")
    with pytest.raises(UserError, match="gone.JPEG"):
        load_dataset("tiny-imagenet", tmp_path / "t")

    (base / "val" / "val_annotations.txt").write_text(f"val_0.JPEG\t{WNIDS[0]}\t0\t0\t1\t1\n")
    (base / "val" / "images" / "val_0.JPEG").write_bytes(b"not a jpeg")
    bundle = load_dataset("tiny-imagenet", tmp_path / "t")
    with pytest.raises(UserError) as err:
        bundle.test[0]
    assert "cannot decode Tiny ImageNet image" in assert_one_line(err)


def test_tiny_imagenet_download_unpacks_the_archive(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, download_root, md5=None, **kwargs):
        calls.append(url)
        write_tiny_imagenet(Path(download_root))

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", fake_download)
    bundle = load_dataset("tiny-imagenet", tmp_path / "new", download=True)
    assert calls == ["http://cs231n.stanford.edu/tiny-imagenet-200.zip"]
    assert len(bundle.train) == 201
    load_dataset("tiny-imagenet", tmp_path / "new", download=True)
    assert len(calls) == 1
