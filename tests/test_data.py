"""Tests of spikealign.data on small files written in each dataset's real on-disk format.

Every dataset goes through torchvision's own loading code. The one exception: torchvision checks
the md5 of the SVHN .mat files and of the CIFAR-10 batches against the published archives, which
a file made here cannot match, so those tests replace torchvision's `check_integrity` (in the
svhn and cifar modules only) by its own existence check without the md5.
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import scipy.io
import torch
import torchvision.datasets.cifar
import torchvision.datasets.svhn
from PIL import Image
from torch.utils.data import DataLoader

from spikealign.data import DATASETS, VOC_CLASSES, DatasetBundle, load_dataset
from spikealign.errors import UserError


def normalised(pixel) -> float:
    """What a uint8 pixel becomes: scale to [0, 1], then Normalize(0.5, 0.5)."""
    return (float(pixel) / 255.0 - 0.5) / 0.5


def draws_differ(dataset, index: int, draws: int = 8) -> bool:
    """Whether repeated reads of one item give different images."""
    torch.manual_seed(0)
    first = dataset[index][0]
    return any(not torch.equal(first, dataset[index][0]) for _ in range(draws))


@pytest.fixture
def md5_free(monkeypatch):
    """torchvision's check_integrity minus the md5 (test files cannot match the real archives)."""

    def exists_only(fpath, md5=None):
        return os.path.isfile(fpath)

    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", exists_only)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", exists_only)


# ---------------------------------------------------------------- writers of the real formats


def fashion_images(count: int, offset: int) -> np.ndarray:
    """Distinct, left-right asymmetric images: pixel (r, c) of image n = (offset + 7n + 3r + c)."""
    n, r, c = np.meshgrid(np.arange(count), np.arange(28), np.arange(28), indexing="ij")
    return ((offset + 7 * n + 3 * r + c) % 256).astype(np.uint8)


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">II", magic, array.shape[0]) + b"".join(
        struct.pack(">I", size) for size in array.shape[1:]
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(root: Path, image_size: int = 28) -> dict:
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    splits = {}
    for prefix, count, offset in (("train", 12, 0), ("t10k", 6, 100)):
        images = fashion_images(count, offset)[:, :image_size, :image_size]
        labels = (np.arange(count) * 3 + offset) % 10
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, 2051)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, 2049)
        splits[prefix] = (images, labels)
    return splits


def write_svhn(root: Path, labels=None) -> dict:
    rng = np.random.default_rng(1)
    splits = {}
    for split, count in (("train", 10), ("test", 5)):
        images = rng.integers(0, 256, size=(32, 32, 3, count), dtype=np.uint8)  # SVHN: H W C N
        split_labels = np.arange(1, count + 1) if labels is None else np.asarray(labels)
        scipy.io.savemat(
            root / f"{split}_32x32.mat",
            {"X": images, "y": split_labels.reshape(-1, 1).astype(np.uint8)},
        )
        splits[split] = (images, split_labels)
    return splits


CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer"] + [
    "dog", "frog", "horse", "ship", "truck"
]  # fmt: skip


def write_cifar10(root: Path) -> dict:
    """cifar-10-batches-py as in the real archive: protocol-2 pickles of str-keyed dicts."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    batches = {}
    for index, file_name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)  # rows: R plane, G, B
        labels = [(2 * index) % 10, (2 * index + 1) % 10]
        entry = {"batch_label": file_name, "labels": labels, "data": data, "filenames": ["a", "b"]}
        with open(folder / file_name, "wb") as file:
            pickle.dump(entry, file, protocol=2)
        batches[file_name] = (data, labels)
    meta = {"label_names": CIFAR_NAMES, "num_cases_per_batch": 2, "num_vis": 3072}
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump(meta, file, protocol=2)
    return batches


VOC_TRAINVAL = {  # image id -> (colour, size, [(class, difficult), ...])
    "000005": ((200, 40, 120), (50, 40), [("dog", 0), ("person", 0), ("person", 1)]),
    "000007": ((20, 180, 60), (36, 60), [("car", 0)]),
    "000009": ((90, 90, 240), (48, 48), [("cat", 0), ("chair", 1), ("tvmonitor", 0)]),
}
VOC_TEST = {
    "000001": ((250, 250, 10), (40, 30), [("aeroplane", 0), ("bird", 0)]),
    "000002": ((10, 10, 10), (30, 40), [("sofa", 1)]),
}


def voc_xml(image_id: str, size, objects) -> str:
    width, height = size
    parts = [
        f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>",
        "<source><database>The VOC2007 Database</database></source>",
        f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>",
        "<segmented>0</segmented>",
    ]
    for name, difficult in objects:
        parts.append(
            f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{difficult}</difficult><bndbox><xmin>1</xmin><ymin>2</ymin>"
            f"<xmax>{width - 1}</xmax><ymax>{height - 2}</ymax></bndbox></object>"
        )
    return "\n".join(parts) + "\n</annotation>\n"


def write_voc(root: Path) -> Path:
    """VOCdevkit/VOC2007 as the trainval and test archives unpack (both into the same folder)."""
    voc = root / "VOCdevkit" / "VOC2007"
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / folder).mkdir(parents=True)
    for image_set, images in (("trainval", VOC_TRAINVAL), ("test", VOC_TEST)):
        (voc / "ImageSets" / "Main" / f"{image_set}.txt").write_text("\n".join(images) + "\n")
        for image_id, (colour, size, objects) in images.items():
            Image.new("RGB", size, colour).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
            (voc / "Annotations" / f"{image_id}.xml").write_text(voc_xml(image_id, size, objects))
    return voc


def multi_hot(objects) -> torch.Tensor:
    target = torch.zeros(len(VOC_CLASSES))
    for name, _ in objects:
        target[VOC_CLASSES.index(name)] = 1.0
    return target


# ---------------------------------------------------------------- loading each dataset


def test_fashion_mnist_loads_idx_files(tmp_path):
    written = write_fashion_mnist(tmp_path)
    bundle = load_dataset("fashion-mnist", tmp_path, augment=False)
    assert isinstance(bundle, DatasetBundle)
    assert (bundle.in_channels, bundle.image_size, bundle.num_classes) == (1, 28, 10)
    assert not bundle.multilabel
    assert bundle.class_names[0] == "T-shirt/top" and len(bundle.class_names) == 10
    assert (len(bundle.train), len(bundle.test)) == (12, 6)
    for dataset, (images, labels) in (
        (bundle.train, written["train"]),
        (bundle.test, written["t10k"]),
    ):
        for index in (0, len(dataset) - 1):
            image, label = dataset[index]
            assert image.shape == (1, 28, 28) and image.dtype == torch.float32
            assert label == labels[index]
            expected = (torch.from_numpy(images[index]).float() / 255 - 0.5) / 0.5
            torch.testing.assert_close(image[0], expected)
    assert bundle.train[3][0][0, 5, 9].item() == pytest.approx(normalised(7 * 3 + 3 * 5 + 9))


def test_fashion_mnist_augmentation_only_when_asked(tmp_path):
    write_fashion_mnist(tmp_path)
    augmented = load_dataset("fashion-mnist", tmp_path, augment=True)
    plain = load_dataset("fashion-mnist", tmp_path, augment=False)
    assert draws_differ(augmented.train, 2)
    assert not draws_differ(augmented.test, 2)
    assert not draws_differ(plain.train, 2)
    # A crop of the zero-padded image shows the same pixels, shifted, or the padding (-1).
    image = augmented.train[2][0]
    assert image.shape == (1, 28, 28) and image.min() >= -1.0 and image.max() <= 1.0


def test_fashion_mnist_resizes_to_image_size(tmp_path):
    write_fashion_mnist(tmp_path)
    bundle = load_dataset("fashion-mnist", tmp_path, image_size=32, augment=True)
    assert bundle.image_size == 32
    assert bundle.train[0][0].shape == (1, 32, 32)
    assert bundle.test[0][0].shape == (1, 32, 32)


def test_svhn_loads_mat_files_and_maps_label_10_to_0(tmp_path, md5_free):
    written = write_svhn(tmp_path)
    bundle = load_dataset("svhn", tmp_path, augment=True)
    assert (bundle.in_channels, bundle.image_size, bundle.num_classes) == (3, 32, 10)
    assert bundle.class_names == tuple("0123456789")
    assert (len(bundle.train), len(bundle.test)) == (10, 5)
    images, labels = written["train"]
    assert [bundle.train[i][1] for i in range(10)] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    image = bundle.train[4][0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    for channel, row, col in ((0, 0, 0), (1, 5, 17), (2, 31, 3)):
        assert image[channel, row, col].item() == pytest.approx(
            normalised(images[row, col, channel, 4])
        )
    # Digits are neither flipped nor cropped, even with augment=True.
    assert not draws_differ(bundle.train, 4)


def test_cifar10_loads_pickled_batches(tmp_path, md5_free):
    batches = write_cifar10(tmp_path)
    bundle = load_dataset("cifar10", tmp_path, augment=False)
    assert (bundle.in_channels, bundle.image_size, bundle.num_classes) == (3, 32, 10)
    assert bundle.class_names == tuple(CIFAR_NAMES)
    assert (len(bundle.train), len(bundle.test)) == (10, 2)
    data, labels = batches["data_batch_3"]  # items 4 and 5 of the training set
    image, label = bundle.train[5]
    assert label == labels[1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    for channel, row, col in ((0, 0, 0), (1, 7, 30), (2, 31, 31)):
        pixel = data[1, channel * 1024 + row * 32 + col]
        assert image[channel, row, col].item() == pytest.approx(normalised(pixel))
    test_data, test_labels = batches["test_batch"]
    assert bundle.test[0][1] == test_labels[0]
    assert bundle.test[0][0][1, 2, 3].item() == pytest.approx(normalised(test_data[0, 1024 + 67]))


def test_cifar10_augmentation_only_when_asked(tmp_path, md5_free):
    write_cifar10(tmp_path)
    augmented = load_dataset("cifar10", tmp_path, augment=True)
    plain = load_dataset("cifar10", tmp_path, augment=False)
    assert draws_differ(augmented.train, 0)
    assert not draws_differ(augmented.test, 0)
    assert not draws_differ(plain.train, 0)


def test_voc_multi_hot_targets_and_images(tmp_path):
    write_voc(tmp_path)
    bundle = load_dataset("voc", tmp_path, augment=False)
    assert (bundle.in_channels, bundle.image_size, bundle.num_classes) == (3, 32, 20)
    assert bundle.multilabel and bundle.class_names == VOC_CLASSES
    assert bundle.class_names[14] == "person" and bundle.class_names[19] == "tvmonitor"
    assert (len(bundle.train), len(bundle.test)) == (3, 2)
    for dataset, written in ((bundle.train, VOC_TRAINVAL), (bundle.test, VOC_TEST)):
        for index, (colour, _, objects) in enumerate(written.values()):
            image, target = dataset[index]
            assert image.shape == (3, 32, 32) and image.dtype == torch.float32
            assert target.dtype == torch.float32
            assert torch.equal(target, multi_hot(objects))  # difficult objects count as present
            expected = torch.tensor([normalised(value) for value in colour])
            torch.testing.assert_close(image.mean(dim=(1, 2)), expected, atol=0.04, rtol=0)
    # Entries whose only objects are 'difficult' are marked for VOC-protocol scoring.
    assert bundle.train.difficult_only.nonzero().tolist() == [[2, VOC_CLASSES.index("chair")]]
    assert bundle.test.difficult_only.nonzero().tolist() == [[1, VOC_CLASSES.index("sofa")]]
    batch_images, batch_targets = next(iter(DataLoader(bundle.train, batch_size=3)))
    assert batch_images.shape == (3, 3, 32, 32) and batch_targets.shape == (3, 20)


def test_voc_image_size_and_augmentation(tmp_path):
    write_voc(tmp_path)
    bundle = load_dataset("voc", tmp_path, image_size=64, augment=True)
    assert bundle.image_size == 64
    assert bundle.train[1][0].shape == (3, 64, 64) and bundle.test[1][0].shape == (3, 64, 64)
    assert draws_differ(bundle.train, 0)
    assert not draws_differ(bundle.test, 0)
    assert not draws_differ(load_dataset("voc", tmp_path, augment=False).train, 0)


def test_digits_split_shapes_and_values():
    bundle = load_dataset("digits", "/nonexistent/never/read")
    assert (bundle.in_channels, bundle.image_size, bundle.num_classes) == (1, 28, 10)
    assert not bundle.multilabel and bundle.class_names == tuple("0123456789")
    assert (len(bundle.train), len(bundle.test)) == (1437, 360)
    image, label = bundle.train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    images, labels = bundle.train.tensors
    assert images.min().item() == -1.0 and images.max().item() <= 1.0
    assert images.max().item() > 0.9  # ink reaches (nearly) full intensity
    for dataset in (bundle.train, bundle.test):
        counts = torch.bincount(dataset.tensors[1], minlength=10)
        assert (counts > 0).all() and counts.numel() == 10
    # Stratified: each class keeps ~80 % of its images in the training split.
    train_counts = torch.bincount(labels, minlength=10).float()
    test_counts = torch.bincount(bundle.test.tensors[1], minlength=10).float()
    assert ((train_counts / (train_counts + test_counts) - 0.8).abs() < 0.01).all()
    # Deterministic split: a second load gives the same tensors.
    again = load_dataset("digits")
    assert torch.equal(again.train.tensors[0], images)
    assert torch.equal(again.test.tensors[1], bundle.test.tensors[1])


def test_digits_at_native_size_are_the_sklearn_images_split_without_overlap():
    from sklearn.datasets import load_digits

    digits = load_digits()
    bundle = load_dataset("digits", image_size=8)
    assert bundle.train[0][0].shape == (1, 8, 8)
    expected = (torch.tensor(digits.images, dtype=torch.float32) / 16 - 0.5) / 0.5
    split = torch.cat([bundle.train.tensors[0], bundle.test.tensors[0]])[:, 0]
    split_labels = torch.cat([bundle.train.tensors[1], bundle.test.tensors[1]])

    def as_sorted_rows(images, labels):
        rows = torch.cat([images.reshape(len(images), -1), labels[:, None].float()], dim=1)
        return sorted(map(tuple, rows.tolist()))

    assert as_sorted_rows(split, split_labels) == as_sorted_rows(
        expected, torch.as_tensor(digits.target)
    )


def test_digits_upsampling_is_bilinear():
    bundle = load_dataset("digits", image_size=16)
    eight = load_dataset("digits", image_size=8)
    source = (eight.train.tensors[0] + 1) / 2  # back to [0, 1]
    expected = torch.nn.functional.interpolate(source, size=(16, 16), mode="bilinear")
    torch.testing.assert_close(bundle.train.tensors[0], expected * 2 - 1)


# ---------------------------------------------------------------- errors


def assert_one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_unknown_dataset_lists_the_names():
    with pytest.raises(UserError) as err:
        load_dataset("kmnist")
    message = assert_one_line(err)
    assert "'kmnist'" in message
    for name in DATASETS:
        assert name in message


def test_bad_image_size():
    with pytest.raises(UserError, match="image_size"):
        load_dataset("digits", image_size=0)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("fashion-mnist", "FashionMNIST"),
        ("svhn", "train_32x32.mat"),
        ("cifar10", "cifar-10-batches-py"),
        ("voc", "VOCdevkit"),
        ("mnist", "MNIST"),  # the theory experiments' datasets (test_data_theory.py)
        ("cifar100", "cifar-100-python"),
        ("tiny-imagenet", "tiny-imagenet-200"),
    ],
)
def test_missing_files_name_the_path_and_the_fetch_command(tmp_path, name, expected):
    with pytest.raises(UserError) as err:
        load_dataset(name, tmp_path)
    message = assert_one_line(err)
    assert f"(expected {tmp_path / expected})" in message
    assert f"--dataset {name} --data-dir {tmp_path} --download" in message


def test_missing_single_file_is_named(tmp_path, md5_free):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(UserError, match="test_batch"):
        load_dataset("cifar10", tmp_path)


def test_missing_voc_test_split_is_named(tmp_path):
    voc = write_voc(tmp_path)
    (voc / "ImageSets" / "Main" / "test.txt").unlink()
    with pytest.raises(UserError) as err:
        load_dataset("voc", tmp_path)
    assert str(voc / "ImageSets" / "Main" / "test.txt") in assert_one_line(err)


def test_data_dir_that_is_a_file(tmp_path):
    not_a_dir = tmp_path / "data"
    not_a_dir.write_text("oops")
    with pytest.raises(UserError, match="is a file"):
        load_dataset("cifar10", not_a_dir)


def test_unreadable_data_dir(tmp_path, monkeypatch):
    # Tests may run as root, which reads any folder: stand in for a denied permission.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match="not readable"):
        load_dataset("svhn", tmp_path)


def corrupt_fashion(root):
    write_fashion_mnist(root)
    (root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"not an idx file")


def corrupt_svhn(root):
    write_svhn(root)
    (root / "test_32x32.mat").write_bytes(b"MATLAB? no")


def corrupt_cifar(root):
    write_cifar10(root)
    (root / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"\x80\x02truncated")


def corrupt_voc(root):
    voc = write_voc(root)
    (voc / "Annotations" / "000007.xml").write_text("<annotation><object><name>car</name>")


@pytest.mark.parametrize(
    "name, corrupt",
    [
        ("fashion-mnist", corrupt_fashion),
        ("svhn", corrupt_svhn),
        ("cifar10", corrupt_cifar),
        ("voc", corrupt_voc),
    ],
)
def test_corrupt_files(tmp_path, md5_free, name, corrupt):
    corrupt(tmp_path)
    with pytest.raises(UserError) as err:
        load_dataset(name, tmp_path)
    message = assert_one_line(err)
    assert "corrupt" in message and "--download" in message and "delete" in message


def test_real_md5_check_reports_corrupt_not_missing(tmp_path):
    # Without the md5 stand-in torchvision rejects the test files as it would a damaged download.
    write_cifar10(tmp_path)
    with pytest.raises(UserError, match="corrupt.*Dataset not found or corrupted"):
        load_dataset("cifar10", tmp_path)


def test_data_that_does_not_match(tmp_path, md5_free):
    write_svhn(tmp_path, labels=[1, 2, 3, 11, 5, 6, 7, 8, 9, 10])
    with pytest.raises(UserError, match="labels outside 0..9"):
        load_dataset("svhn", tmp_path)
    write_fashion_mnist(tmp_path / "small", image_size=20)
    with pytest.raises(UserError, match=r"shape \(20, 20\)"):
        load_dataset("fashion-mnist", tmp_path / "small")


def test_voc_unknown_class_is_rejected(tmp_path):
    voc = write_voc(tmp_path)
    (voc / "Annotations" / "000002.xml").write_text(voc_xml("000002", (30, 40), [("unicorn", 0)]))
    with pytest.raises(UserError, match="000002.xml"):
        load_dataset("voc", tmp_path)


# ---------------------------------------------------------------- download path (no network here)


def test_download_fetches_only_missing_files(tmp_path, md5_free, monkeypatch):
    calls = []

    def fake_download_and_extract_archive(url, download_root, filename=None, md5=None):
        calls.append(url)
        write_cifar10(Path(download_root))  # what unpacking the real archive leaves behind

    monkeypatch.setattr(
        torchvision.datasets.cifar,
        "download_and_extract_archive",
        fake_download_and_extract_archive,
    )
    data_dir = tmp_path / "new" / "data"
    bundle = load_dataset("cifar10", data_dir, download=True)
    assert len(calls) == 1 and calls[0].endswith("cifar-10-python.tar.gz")
    assert len(bundle.train) == 10
    load_dataset("cifar10", data_dir, download=True)
    assert len(calls) == 1  # present files are not fetched again


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(UserError) as err:
        load_dataset("cifar10", tmp_path, download=True)
    message = assert_one_line(err)
    assert "downloading CIFAR-10" in message and "name resolution" in message
