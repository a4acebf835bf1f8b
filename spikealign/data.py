"""Datasets for the trainer: Fashion-MNIST, SVHN, CIFAR-10, Pascal VOC 2007 and sklearn's digits.

``load_dataset(name, data_dir)`` returns a :class:`DatasetBundle` whose ``train`` and ``test`` are
torch Datasets yielding ``(image, target)``: ``image`` a float32 tensor C x H x W normalised as
``x = (p - 0.5) / 0.5`` for pixel values p in [0, 1] (so x lies in [-1, 1]); ``target`` a class
index, or for ``voc`` a float multi-hot vector of length 20.

Files are read by torchvision's dataset classes (FashionMNIST, SVHN, CIFAR10, VOCDetection) from
``data_dir`` in their usual on-disk layout, and fetched there by them with ``download=True``.
``digits`` ships with scikit-learn and needs no files at all.

``imagenet`` and ``imagefolder`` read any tree ``data_dir/{train,val}/<class>/<image>`` with
torchvision's ImageFolder (ImageNet's usual layout: ``train/<wnid>/*.JPEG``), decoding each JPEG on
access (in DataLoader workers). Train: ``RandomResizedCrop(image_size)`` + flip; eval:
``Resize(image_size * 256/224)`` + ``CenterCrop(image_size)``; ImageNet's mean and std. Default
``image_size`` 224. See :func:`load_image_folder`.

Pre-processing (METHOD.md section 6 and the paper: "inputs were randomly cropped and flipped"):

* training images, with ``augment=True``: ``RandomCrop(image_size, padding=4)`` then
  ``RandomHorizontalFlip`` for fashion-mnist, cifar10 and voc; none for svhn and digits, where a
  flip turns a digit into another symbol;
* all images: resize to ``image_size`` x ``image_size`` when it differs from the native size
  (VOC always: its photos have various sizes), then ``Normalize(mean=0.5, std=0.5)``;
* test images are never augmented.

MNIST and CIFAR-100 (torchvision's MNIST / CIFAR100 classes) and Tiny ImageNet (its archive's
folder layout, read by :class:`TinyImageNet`; its labelled val split is the test set) serve the
feedback-alignment theory experiments; MNIST is not flipped or cropped (digits), CIFAR-100 and Tiny
ImageNet are.

See docs/data.md for the layout each dataset expects and the VOC label convention.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from xml.etree.ElementTree import ParseError
from xml.etree.ElementTree import parse as parse_xml

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, TensorDataset
from torchvision import datasets
from torchvision.transforms import v2

from spikealign.errors import UserError

DATASETS = ("fashion-mnist", "svhn", "cifar10", "voc", "digits")
# The datasets of the feedback-alignment theory experiments (METHOD 9, docs/fa_theory.md).
DATASETS += ("mnist", "cifar100", "tiny-imagenet")

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

DIGIT_CLASSES = tuple(str(digit) for digit in range(10))

# How a user fetches a missing dataset; the training entry point owns the flags.
FETCH_COMMAND = "python -m training.run --dataset {name} --data-dir {data_dir} --download"

AUGMENT_PADDING = 4
NORMALISE_MEAN = 0.5
NORMALISE_STD = 0.5
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


@dataclass(frozen=True)
class DatasetBundle:
    """A dataset's two splits and what a model needs to know about them."""

    train: Dataset
    test: Dataset
    in_channels: int
    image_size: int
    num_classes: int
    multilabel: bool
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class _Spec:
    """Fixed facts about one dataset."""

    title: str  # as users know it, for messages
    in_channels: int
    native_size: int  # default image_size
    num_classes: int
    crop_and_flip: bool  # random crop + horizontal flip when augmenting
    always_resize: bool = False  # images of various sizes (VOC photos)


_SPECS = {
    "fashion-mnist": _Spec("Fashion-MNIST", 1, 28, 10, crop_and_flip=True),
    "svhn": _Spec("SVHN", 3, 32, 10, crop_and_flip=False),
    "cifar10": _Spec("CIFAR-10", 3, 32, 10, crop_and_flip=True),
    "voc": _Spec(
        "Pascal VOC 2007", 3, 32, len(VOC_CLASSES), crop_and_flip=True, always_resize=True
    ),
    "digits": _Spec("digits", 1, 28, 10, crop_and_flip=False),
    "mnist": _Spec("MNIST", 1, 28, 10, crop_and_flip=False),
    "cifar100": _Spec("CIFAR-100", 3, 32, 100, crop_and_flip=True),
    "tiny-imagenet": _Spec("Tiny ImageNet", 3, 64, 200, crop_and_flip=True),
}

# ImageFolder trees (load_image_folder); imagenet is the same reader under ImageNet's name
IMAGE_FOLDER_DATASETS = ("imagenet", "imagefolder")
DATASETS = DATASETS + IMAGE_FOLDER_DATASETS


def load_dataset(
    name: str,
    data_dir: str | os.PathLike = "./data",
    download: bool = False,
    image_size: int | None = None,
    augment: bool = True,
) -> DatasetBundle:
    """Load dataset ``name`` (one of :data:`DATASETS`) from ``data_dir``.

    ``download=True`` fetches missing files into ``data_dir`` (ignored for ``digits``).
    ``image_size`` defaults to 28 (fashion-mnist, digits) or 32 (svhn, cifar10, voc); any other
    value resizes the images. ``augment=False`` turns the random training transforms off.
    Raises :class:`UserError` with a one-line fix for unknown names, missing or corrupt files.
    """
    if name in IMAGE_FOLDER_DATASETS:
        return load_image_folder(data_dir, name, download, image_size, augment)
    if name not in _SPECS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    spec = _SPECS[name]
    if image_size is None:
        image_size = spec.native_size
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"image_size must be a positive integer, got {image_size!r}")

    if name == "digits":
        train, test = _load_digits(image_size)
        class_names = DIGIT_CLASSES
    else:
        train, test, class_names = _load_files(name, spec, data_dir, download, image_size, augment)
    return DatasetBundle(
        train=train,
        test=test,
        in_channels=spec.in_channels,
        image_size=image_size,
        num_classes=spec.num_classes,
        multilabel=name == "voc",
        class_names=class_names,
    )


def _load_files(name, spec, data_dir, download, image_size, augment):
    """(train, test, class_names) of a dataset kept in files, read through torchvision."""
    data_dir = os.path.expanduser(str(data_dir))
    _check_data_dir(data_dir, create=download)
    train_transform = _image_transform(spec, image_size, augment=augment)
    test_transform = _image_transform(spec, image_size, augment=False)
    loader = _FileLoader(name, spec, data_dir, download)

    if name == "fashion-mnist":
        train, test = loader.idx_images(datasets.FashionMNIST, train_transform, test_transform)
        class_names = tuple(datasets.FashionMNIST.classes)
    elif name == "svhn":
        train, test = loader.svhn(train_transform, test_transform)
        class_names = DIGIT_CLASSES
    elif name == "cifar10":
        train, test = loader.cifar(datasets.CIFAR10, train_transform, test_transform)
        class_names = tuple(train.classes)
    elif name == "mnist":
        train, test = loader.idx_images(datasets.MNIST, train_transform, test_transform)
        class_names = DIGIT_CLASSES
    elif name == "cifar100":
        train, test = loader.cifar(datasets.CIFAR100, train_transform, test_transform)
        class_names = tuple(train.classes)
    elif name == "tiny-imagenet":
        train, test = loader.tiny_imagenet(train_transform, test_transform)
        class_names = train.class_names
    else:
        train, test = loader.voc(train_transform, test_transform)
        class_names = VOC_CLASSES
    return train, test, class_names


def _image_transform(spec: _Spec, image_size: int, augment: bool) -> v2.Compose:
    """PIL image -> normalised float tensor C x image_size x image_size."""
    steps: list[Callable] = []
    if image_size != spec.native_size or spec.always_resize:
        # A square resize (no crop) keeps every labelled object of a VOC photo in view.
        steps.append(v2.Resize((image_size, image_size), antialias=True))
    steps.append(v2.ToImage())
    if augment and spec.crop_and_flip:
        steps += [v2.RandomCrop(image_size, padding=AUGMENT_PADDING), v2.RandomHorizontalFlip()]
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([NORMALISE_MEAN] * spec.in_channels, [NORMALISE_STD] * spec.in_channels),
        v2.ToPureTensor(),
    ]
    return v2.Compose(steps)


def _check_data_dir(data_dir: str, create: bool) -> None:
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise UserError(f"data_dir {data_dir} is a file, not a directory; pass a directory")
    if create:
        try:
            os.makedirs(data_dir, exist_ok=True)
        except OSError as err:
            raise UserError(
                f"cannot create data_dir {data_dir} ({err.strerror}); pass another"
            ) from err
    if os.path.isdir(data_dir) and not os.access(data_dir, os.R_OK | os.X_OK):
        raise UserError(f"data_dir {data_dir} is not readable; fix its permissions or pass another")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


class _FileLoader:
    """Builds the torchvision datasets of one file-based dataset with one-line errors."""

    def __init__(self, name: str, spec: _Spec, data_dir: str, download: bool):
        self.name = name
        self.spec = spec
        self.data_dir = data_dir
        self.download = download
        self.fetch = FETCH_COMMAND.format(name=name, data_dir=shlex.quote(data_dir))

    def path(self, *parts: str) -> str:
        return os.path.join(self.data_dir, *parts)

    def build(self, required: Sequence[str], delete: str, make: Callable[[bool], Any]) -> Any:
        """Check ``required`` paths, then call ``make(download)`` turning failures into UserError.

        torchvision is asked to download only when files are missing, so present data are never
        fetched or unpacked again.
        """
        missing = next((path for path in required if not os.path.exists(path)), None)
        if missing is not None and not self.download:
            # Name the outermost missing folder: "cifar-10-batches-py", not a file inside it.
            parent = os.path.dirname(missing)
            top = os.path.normpath(self.data_dir)
            while parent and os.path.normpath(parent) != top and not os.path.exists(parent):
                missing, parent = parent, os.path.dirname(parent)
            raise UserError(
                f"{self.spec.title} not found in {self.data_dir} (expected {missing}); "
                f"fetch it with: {self.fetch}"
            )
        try:
            return make(missing is not None)
        except UserError:
            raise
        except Exception as err:  # whatever torchvision raised, the files do not match
            if missing is not None:
                raise UserError(
                    f"downloading {self.spec.title} into {self.data_dir} failed "
                    f"({_first_line(err)}); check the network connection and retry: {self.fetch}"
                ) from err
            raise UserError(
                f"{self.spec.title} files in {self.data_dir} are corrupt or incomplete "
                f"({_first_line(err)}); delete {delete} and fetch it again with: {self.fetch}"
            ) from err

    def check_loaded(
        self, images: Any, labels: Any, image_shape: tuple, delete: str, classes: Sequence = ()
    ) -> None:
        """Reject data that loaded but have the wrong shape, labels or class list."""
        labels = np.asarray(labels)
        num_classes = self.spec.num_classes
        problem = None
        if tuple(images.shape[1:]) != image_shape:
            problem = f"images of shape {tuple(images.shape[1:])}, expected {image_shape}"
        elif len(images) != len(labels):
            problem = f"{len(images)} images but {len(labels)} labels"
        elif len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            problem = f"labels outside 0..{num_classes - 1}"
        elif classes and len(classes) != num_classes:
            problem = f"{len(classes)} class names, expected {num_classes}"
        if problem:
            raise UserError(
                f"{self.spec.title} files in {self.data_dir} do not match the dataset ({problem}); "
                f"delete {delete} and fetch it again with: {self.fetch}"
            )

    def idx_images(self, cls, train_transform, test_transform) -> tuple[Dataset, Dataset]:
        """MNIST or Fashion-MNIST (``cls``): idx files in ``<data_dir>/<cls.__name__>/raw``."""
        folder = self.path(cls.__name__)
        raw = os.path.join(folder, "raw")
        required = [
            os.path.join(raw, f"{split}-{kind}-idx{dims}-ubyte")
            for split in ("train", "t10k")
            for kind, dims in (("images", 3), ("labels", 1))
        ]

        def make(download: bool) -> tuple[Dataset, Dataset]:
            return tuple(
                cls(self.data_dir, train=is_train, transform=transform, download=download)
                for is_train, transform in ((True, train_transform), (False, test_transform))
            )

        splits = self.build(required, folder, make)
        for split in splits:
            self.check_loaded(split.data, split.targets, (28, 28), folder)
        return splits

    def svhn(self, train_transform, test_transform) -> tuple[Dataset, Dataset]:
        splits = []
        for split, transform in (("train", train_transform), ("test", test_transform)):
            path = self.path(f"{split}_32x32.mat")

            def make(download: bool, split=split, transform=transform) -> Dataset:
                return datasets.SVHN(
                    self.data_dir, split=split, transform=transform, download=download
                )

            dataset = self.build([path], path, make)
            self.check_loaded(dataset.data, dataset.labels, (3, 32, 32), path)
            splits.append(dataset)
        return tuple(splits)

    def cifar(self, cls, train_transform, test_transform) -> tuple[Dataset, Dataset]:
        """CIFAR-10 or CIFAR-100 (``cls``): torchvision's pickled batches."""
        folder = self.path(cls.base_folder)
        names = [entry[0] for entry in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        required = [os.path.join(folder, file_name) for file_name in names]

        def make(download: bool) -> tuple[Dataset, Dataset]:
            return tuple(
                cls(self.data_dir, train=is_train, transform=transform, download=download)
                for is_train, transform in ((True, train_transform), (False, test_transform))
            )

        splits = self.build(required, folder, make)
        for split in splits:
            self.check_loaded(split.data, split.targets, (32, 32, 3), folder, split.classes)
        return splits

    def tiny_imagenet(self, train_transform, test_transform) -> tuple[Dataset, Dataset]:
        root = self.path(TinyImageNet.base_folder)
        required = [
            os.path.join(root, "wnids.txt"),
            os.path.join(root, "train"),
            os.path.join(root, "val", "images"),
            os.path.join(root, "val", "val_annotations.txt"),
        ]

        def make(download: bool) -> tuple[Dataset, Dataset]:
            if download:
                TinyImageNet.download(self.data_dir)
            return tuple(
                TinyImageNet(root, split, transform)
                for split, transform in (("train", train_transform), ("val", test_transform))
            )

        return self.build(required, root, make)

    def voc(self, train_transform, test_transform) -> tuple[Dataset, Dataset]:
        voc_root = self.path("VOCdevkit", "VOC2007")
        splits = []
        for image_set, transform in (("trainval", train_transform), ("test", test_transform)):
            required = [
                os.path.join(voc_root, "ImageSets", "Main", f"{image_set}.txt"),
                os.path.join(voc_root, "Annotations"),
                os.path.join(voc_root, "JPEGImages"),
            ]

            def make(download: bool, image_set=image_set, transform=transform) -> Dataset:
                detection = datasets.VOCDetection(
                    self.data_dir, year="2007", image_set=image_set, download=download
                )
                return VOCClassification(detection, transform)

            splits.append(self.build(required, voc_root, make))
        return tuple(splits)


class VOCClassification(Dataset):
    """Pascal VOC as multi-label classification over torchvision's ``VOCDetection``.

    ``targets[i, c]`` is 1.0 when image i contains at least one object of class c, counting
    objects marked 'difficult' too (they are in the picture); ``difficult_only[i, c]`` marks the
    entries whose only objects are difficult, which the VOC protocol leaves out of scoring.
    The XML annotations are parsed once here; each access decodes only the JPEG.
    """

    def __init__(self, detection: datasets.VOCDetection, transform: Callable):
        self.images = list(detection.images)
        self.transform = transform
        self.targets, self.difficult_only = _voc_labels(detection.annotations)
        for path in self.images:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"image {path} listed in the {detection.image_set} set")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.images[index]
        try:
            with Image.open(path) as jpeg:
                image = jpeg.convert("RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise UserError(f"cannot decode VOC image {path} ({_first_line(err)})") from err
        return self.transform(image), self.targets[index].clone()


class TinyImageNet(Dataset):
    """Tiny ImageNet (Le & Yang 2015) in the layout its archive unpacks to.

    ``root`` = ``tiny-imagenet-200/`` with ``wnids.txt`` (200 class ids), ``words.txt`` (optional:
    id -> names), ``train/<wnid>/images/*.JPEG`` (500 per class) and ``val/images/*.JPEG`` labelled
    by ``val/val_annotations.txt`` (file, wnid, box; 10,000 images). The labelled val split serves
    as the test set (the test split has no labels). Classes are the wnids in sorted order, as
    torchvision's ImageFolder would number them. Images are 64 x 64 RGB JPEGs, decoded on access.
    Raises ValueError / FileNotFoundError on files that do not match the layout.
    """

    base_folder = "tiny-imagenet-200"
    url = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
    md5 = "90528d7ca1a48142e341f4ef8d21d0de"
    num_classes = 200

    def __init__(self, root: str, split: str, transform: Callable):
        self.root, self.split, self.transform = root, split, transform
        with open(os.path.join(root, "wnids.txt")) as file:
            self.wnids = tuple(sorted(line.strip() for line in file if line.strip()))
        if len(self.wnids) != self.num_classes or len(set(self.wnids)) != self.num_classes:
            raise ValueError(f"wnids.txt lists {len(set(self.wnids))} classes, expected 200")
        self.class_names = self._names()
        index = {wnid: i for i, wnid in enumerate(self.wnids)}
        if split == "train":
            self.samples = []
            for wnid in self.wnids:
                folder = os.path.join(root, "train", wnid, "images")
                files = sorted(f for f in os.listdir(folder) if f.lower().endswith(".jpeg"))
                if not files:
                    raise FileNotFoundError(f"no JPEG images in {folder}")
                self.samples += [(os.path.join(folder, f), index[wnid]) for f in files]
        else:
            folder = os.path.join(root, "val", "images")
            self.samples = []
            with open(os.path.join(root, "val", "val_annotations.txt")) as file:
                for number, line in enumerate(file, 1):
                    fields = line.split("\t")
                    if not line.strip():
                        continue
                    if len(fields) < 2 or fields[1].strip() not in index:
                        raise ValueError(f"val_annotations.txt line {number} has no known wnid")
                    path = os.path.join(folder, fields[0].strip())
                    if not os.path.isfile(path):
                        raise FileNotFoundError(f"image {path} listed in val_annotations.txt")
                    self.samples.append((path, index[fields[1].strip()]))
        self.targets = [label for _, label in self.samples]

    def _names(self) -> tuple[str, ...]:
        """First name of each class from words.txt, or the wnid where it is absent."""
        words: dict[str, str] = {}
        path = os.path.join(self.root, "words.txt")
        if os.path.isfile(path):
            with open(path) as file:
                for line in file:
                    wnid, _, names = line.rstrip("\n").partition("\t")
                    words[wnid] = names.split(",")[0].strip()
        return tuple(words.get(wnid) or wnid for wnid in self.wnids)

    @classmethod
    def download(cls, data_dir: str) -> None:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(cls.url, data_dir, md5=cls.md5)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as jpeg:
                image = jpeg.convert("RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise UserError(
                f"cannot decode Tiny ImageNet image {path} ({_first_line(err)})"
            ) from err
        return self.transform(image), label


def _voc_labels(annotation_paths: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-hot targets (N x 20 float) and the difficult-only mask (N x 20 bool)."""
    class_index = {name: i for i, name in enumerate(VOC_CLASSES)}
    present = torch.zeros(len(annotation_paths), len(VOC_CLASSES), dtype=torch.bool)
    present_easy = torch.zeros_like(present)
    for row, path in enumerate(annotation_paths):
        try:
            annotation = datasets.VOCDetection.parse_voc_xml(parse_xml(path).getroot())
            objects = annotation["annotation"].get("object", [])
            for obj in objects if isinstance(objects, list) else [objects]:
                column = class_index[obj["name"]]
                present[row, column] = True
                if obj.get("difficult", "0") != "1":
                    present_easy[row, column] = True
        except (OSError, ParseError, KeyError, TypeError) as err:
            # load_dataset turns this into a one-line UserError with the fetch command.
            raise ValueError(f"annotation {path}: {_first_line(err)}") from err
    return present.float(), present & ~present_easy


def _load_digits(image_size: int) -> tuple[TensorDataset, TensorDataset]:
    """sklearn's 8x8 digits (values 0..16) as 1 x image_size x image_size images, split 80/20."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != pixels.shape[-1]:
        pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear")
    images = (pixels.clamp(0.0, 1.0) - NORMALISE_MEAN) / NORMALISE_STD
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    train_index, test_index = train_test_split(
        np.arange(len(labels)),
        test_size=DIGITS_TEST_FRACTION,
        stratify=digits.target,
        random_state=DIGITS_SPLIT_SEED,
    )
    train_index, test_index = torch.as_tensor(train_index), torch.as_tensor(test_index)
    return (
        TensorDataset(images[train_index], labels[train_index]),
        TensorDataset(images[test_index], labels[test_index]),
    )


# --------------------------------------------------------------------------------------------
# ImageFolder trees: imagenet, imagefolder
# --------------------------------------------------------------------------------------------

IMAGE_FOLDER_SPLITS = ("train", "val")
IMAGE_FOLDER_SIZE = 224
#: eval resize side per crop side: ImageNet's 256 for a 224 crop
EVAL_RESIZE_RATIO = 256 / 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_folder_transforms(image_size: int) -> tuple[v2.Compose, v2.Compose]:
    """(train, eval) transforms of PIL images -> normalised float tensors 3 x size x size.

    Train: RandomResizedCrop(image_size) (scale 0.08-1, aspect 3/4-4/3) + RandomHorizontalFlip;
    eval: Resize(round(image_size * 256 / 224)) of the short side + CenterCrop(image_size).
    """
    finish = [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.ToPureTensor(),
    ]
    train = v2.Compose(
        [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip(), *finish]
    )
    resize = round(image_size * EVAL_RESIZE_RATIO)
    evaluate = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(image_size), *finish])
    return train, evaluate


def _rgb_loader(path: str) -> Image.Image:
    try:
        with open(path, "rb") as file, Image.open(file) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:  # found at first read: decoding is lazy
        raise UserError(f"cannot decode image {path} ({err}); replace or remove the file") from err


def load_image_folder(
    data_dir: str | os.PathLike,
    name: str = "imagefolder",
    download: bool = False,
    image_size: int | None = None,
    augment: bool = True,
) -> DatasetBundle:
    """``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*`` as a DatasetBundle.

    The classes are the sub-folder names, sorted (ImageNet: the wnids). Both splits must have the
    same classes and every class folder an image (.jpg, .jpeg, .png, ... as torchvision's
    ImageFolder accepts); otherwise a UserError names the folder to fix. ``augment=False`` gives
    the training images the eval transform.
    """
    title = "ImageNet" if name == "imagenet" else "the image folder"
    if download:
        raise UserError(
            f"{title} cannot be downloaded automatically; put train/<class>/ and val/<class>/ "
            f"folders of images in --data-dir and run without --download"
        )
    if image_size is None:
        image_size = IMAGE_FOLDER_SIZE
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"image_size must be a positive integer, got {image_size!r}")
    root = os.path.expanduser(str(data_dir))
    _check_data_dir(root, create=False)
    layout = "train/<class>/<image> and val/<class>/<image>"
    classes = {}
    for split in IMAGE_FOLDER_SPLITS:
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise UserError(
                f"{title} in {root} has no {split}/ folder; --data-dir must hold {layout}"
            )
        classes[split] = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
        if not classes[split]:
            raise UserError(f"{folder} has no class folders; it must hold {split}/<class>/<image>")
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))
        only_val = sorted(set(classes["val"]) - set(classes["train"]))
        listed = "; ".join(
            f"only in {split}/: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
            for split, names in (("train", only_train), ("val", only_val))
            if names
        )
        raise UserError(
            f"train/ and val/ of {root} have different classes ({listed}); "
            "give both splits the same class folders"
        )
    train_transform, eval_transform = image_folder_transforms(image_size)
    splits = []
    for split, transform in (
        ("train", train_transform if augment else eval_transform),
        ("val", eval_transform),
    ):
        folder = os.path.join(root, split)
        try:
            splits.append(datasets.ImageFolder(folder, transform=transform, loader=_rgb_loader))
        except FileNotFoundError as err:  # a class folder without a single image
            raise UserError(
                f"{folder}: {_first_line(err).removeprefix('FileNotFoundError: ')}; "
                "put images in every class folder or remove the empty ones (from both splits)"
            ) from None
    return DatasetBundle(
        train=splits[0],
        test=splits[1],
        in_channels=3,
        image_size=image_size,
        num_classes=len(classes["train"]),
        multilabel=False,
        class_names=tuple(classes["train"]),
    )
