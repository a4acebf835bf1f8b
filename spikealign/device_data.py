"""Datasets held on the training device as uint8 tensors, augmented in whole batches there.

For data that fit in device memory the per-image pipeline of :mod:`spikealign.data` (PIL image ->
``RandomCrop(size, padding=4)`` -> ``RandomHorizontalFlip()`` -> scale -> ``Normalize``, one chain
of Python calls per image) is replaced by the same operations on a batch of B images at once:

    padded = pad(x, p zeros on every side)                     uint8, B x C x (H+2p) x (W+2p)
    crop_b = padded_b[:, t_b : t_b + H, l_b : l_b + W]         t_b, l_b ~ U{0, ..., 2p}
    out_b  = crop_b[:, :, ::-1] if f_b else crop_b             f_b ~ Bernoulli(flip_p)
    x      = (out / 255 - mean) / std                          float32, per channel

which is the distribution of torchvision's ``RandomCrop(padding=p)`` (an offset drawn uniformly
from every position in the zero-padded image) followed by ``RandomHorizontalFlip(flip_p)``, drawn
independently per image. The steps are read off the dataset's own transform
(:func:`read_pipeline`); any other step leaves the dataset on the DataLoader. The arithmetic is
torchvision's own (``to(float32).mul_(1/255)``, then ``sub(mean).div_(std)``), so for the same
offsets and flips a device batch equals the per-image images bit for bit.

Randomness of one pass over the data (:class:`DeviceLoader`): a permutation of the examples, then
per position in it (t, l, f), all drawn at the start of the pass on the CPU from the loader's
``torch.Generator``: the same seed gives the same batches on every device, and reseeding the
generator (the trainer does, per epoch) makes a resumed run exact.

Which datasets: images held in memory as arrays by torchvision's ``MNIST`` family (MNIST,
FashionMNIST, ...), ``CIFAR10`` / ``CIFAR100`` and ``SVHN`` (:data:`IN_MEMORY`;
:func:`register` adds another class), and ``TensorDataset`` s of ready images (digits); also inside
a ``Subset``. Files decoded per image (VOC, ImageNet folders) stay on the DataLoader. A resize
(``--image-size`` other than the native size) is done once, when the images are put on the device,
by torchvision's tensor resize with antialiasing, which differs from the per-image PIL resize by
rounding (at most a few grey levels).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision import datasets
from torchvision.transforms import v2

#: Share of the free CUDA memory the uint8 images (train + test) may take on the device.
CUDA_MEMORY_SHARE = 0.25
#: Images resized per call when resizing at load time (bounds the float copy made by resize).
RESIZE_CHUNK = 4096


# --------------------------------------------------------------------------------------------------
# The per-image pipeline, read off a torchvision transform


@dataclass(frozen=True)
class Pipeline:
    """What the per-image transform does, as numbers: see the module docstring."""

    size: int | None  # resize to size x size first (None: native size)
    crop_padding: int  # p of RandomCrop(size, padding=p); 0: no crop
    flip_p: float  # probability of the horizontal flip; 0: no flip
    mean: tuple[float, ...]
    std: tuple[float, ...]


def read_pipeline(transform: Callable | None) -> Pipeline | None:
    """The :class:`Pipeline` of a ``v2.Compose`` of the steps :mod:`spikealign.data` uses.

    None when the transform holds a step (or a setting of one) that the batched version does
    not reproduce; the dataset then stays on the DataLoader.
    """
    if not isinstance(transform, v2.Compose):
        return None
    size, padding, flip_p, mean, std = None, 0, 0.0, None, None
    scaled = False
    for step in transform.transforms:
        if isinstance(step, v2.Resize):
            if len(step.size) != 2 or step.size[0] != step.size[1] or step.max_size is not None:
                return None
            if v2.InterpolationMode(step.interpolation) != v2.InterpolationMode.BILINEAR:
                return None
            if not step.antialias:
                return None
            size = int(step.size[0])
        elif isinstance(step, v2.RandomCrop):
            pads = set(step.padding or [0])
            crop_is_image = step.size[0] == step.size[1] and (size is None or step.size[0] == size)
            if (
                len(pads) != 1
                or step.padding_mode != "constant"
                or step.fill != 0
                or step.pad_if_needed
                or not crop_is_image
            ):
                return None
            padding = pads.pop()
        elif isinstance(step, v2.RandomHorizontalFlip):
            flip_p = float(step.p)
        elif isinstance(step, v2.ToDtype):
            if step.dtype != torch.float32 or not step.scale:
                return None
            scaled = True
        elif isinstance(step, v2.Normalize):
            mean, std = tuple(step.mean), tuple(step.std)
        elif not isinstance(step, v2.ToImage | v2.ToPureTensor):
            return None
    if not scaled or mean is None:
        return None
    return Pipeline(size, padding, flip_p, mean, std)


# --------------------------------------------------------------------------------------------------
# Arrays of the in-memory datasets


def _mnist_arrays(dataset: datasets.MNIST) -> tuple[Tensor, Tensor]:
    return torch.as_tensor(dataset.data).unsqueeze(1), torch.as_tensor(dataset.targets)


def _cifar_arrays(dataset: datasets.CIFAR10) -> tuple[Tensor, Tensor]:
    images = torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2)  # NHWC
    return images, torch.as_tensor(dataset.targets)


def _svhn_arrays(dataset: datasets.SVHN) -> tuple[Tensor, Tensor]:
    return torch.from_numpy(np.ascontiguousarray(dataset.data)), torch.as_tensor(dataset.labels)


#: Dataset class -> function returning (uint8 images N x C x H x W, int64 targets N) as the class's
#: ``__getitem__`` would see them before its transform. Subclasses match (FashionMNIST is an MNIST,
#: CIFAR100 a CIFAR10).
IN_MEMORY: dict[type, Callable[[Dataset], tuple[Tensor, Tensor]]] = {
    datasets.MNIST: _mnist_arrays,
    datasets.CIFAR10: _cifar_arrays,
    datasets.SVHN: _svhn_arrays,
}


def register(dataset_class: type, arrays: Callable[[Dataset], tuple[Tensor, Tensor]]) -> None:
    """Let :func:`device_dataset` take datasets of ``dataset_class`` (see :data:`IN_MEMORY`)."""
    IN_MEMORY[dataset_class] = arrays


def _arrays_of(dataset: Dataset) -> tuple[Tensor, Tensor, Pipeline | None] | None:
    """(images, targets, pipeline) of an in-memory dataset; pipeline None for ready images."""
    if isinstance(dataset, Subset):
        inner = _arrays_of(dataset.dataset)
        if inner is None:
            return None
        images, targets, pipeline = inner
        index = torch.as_tensor(dataset.indices, dtype=torch.int64)
        return images[index], targets[index], pipeline
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        images, targets = dataset.tensors
        return (images, targets, None) if images.is_floating_point() else None
    arrays = next((fn for cls, fn in IN_MEMORY.items() if isinstance(dataset, cls)), None)
    if arrays is None or getattr(dataset, "target_transform", None) is not None:
        return None
    pipeline = read_pipeline(getattr(dataset, "transform", None))
    if pipeline is None:
        return None
    images, targets = arrays(dataset)
    if images.dtype != torch.uint8 or images.ndim != 4:
        return None
    return images, targets.to(torch.int64), pipeline


def _resize(images: Tensor, size: int) -> Tensor:
    chunks = [
        v2.functional.resize(images[start : start + RESIZE_CHUNK], [size, size], antialias=True)
        for start in range(0, len(images), RESIZE_CHUNK)
    ]
    return torch.cat(chunks) if chunks else images


# --------------------------------------------------------------------------------------------------
# The dataset and its loader


@dataclass(frozen=True)
class Augmentation:
    """Per-position random draws of one pass: crop offsets (top, left) and flips."""

    top: Tensor  # int64, N
    left: Tensor  # int64, N
    flip: Tensor  # bool, N

    def __getitem__(self, part: slice | Tensor) -> Augmentation:
        return Augmentation(self.top[part], self.left[part], self.flip[part])

    def to(self, device) -> Augmentation:
        return Augmentation(self.top.to(device), self.left.to(device), self.flip.to(device))


class DeviceDataset:
    """Images (uint8, or float when already normalised) and targets on one device."""

    def __init__(self, images: Tensor, targets: Tensor, pipeline: Pipeline | None, device):
        self.device = torch.device(device)
        self.pipeline = pipeline
        if pipeline is not None and pipeline.size is not None and pipeline.size != images.shape[-1]:
            images = _resize(images, pipeline.size)
        images = images.to(self.device)
        padding = 0 if pipeline is None else pipeline.crop_padding
        # Padded once here, not per batch: a crop is then one gather from the stored tensor.
        self._padded = F.pad(images, (padding,) * 4) if padding else images.contiguous()
        height, width = images.shape[-2:]
        #: the images as given (a view into the padded tensor)
        self.images = self._padded[..., padding : padding + height, padding : padding + width]
        self.targets = targets.to(self.device)
        if pipeline is not None:
            shape = (1, -1, 1, 1)
            self._mean = torch.tensor(pipeline.mean, device=self.device).view(shape)
            self._std = torch.tensor(pipeline.std, device=self.device).view(shape)
        self._rows = torch.arange(height, device=self.device)
        self._cols = torch.arange(width, device=self.device)
        self._channels = torch.arange(images.shape[1], device=self.device)[None, :, None, None]

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored images (padded for the crop)."""
        return self._padded.numel() * self._padded.element_size()

    @property
    def augments(self) -> bool:
        return self.pipeline is not None and (
            self.pipeline.crop_padding > 0 or self.pipeline.flip_p > 0
        )

    def draw(self, count: int, generator: torch.Generator | None) -> Augmentation | None:
        """``count`` independent (top, left, flip) draws on the CPU; None without augmentation."""
        if not self.augments:
            return None
        span = 2 * self.pipeline.crop_padding + 1
        top = torch.randint(span, (count,), generator=generator)
        left = torch.randint(span, (count,), generator=generator)
        flip = torch.rand(count, generator=generator) < self.pipeline.flip_p
        return Augmentation(top, left, flip)

    def batch(
        self, index: Tensor, augmentation: Augmentation | None = None
    ) -> tuple[Tensor, Tensor]:
        """(inputs float32 B x C x H x W, targets) of the examples ``index`` (on the device)."""
        if augmentation is not None and self.augments:
            images = self._crop_and_flip(index, augmentation)
        else:
            images = self.images.index_select(0, index)
        targets = self.targets.index_select(0, index)
        if self.pipeline is None:  # ready images (digits)
            return images, targets
        inputs = images.to(torch.float32).mul_(1.0 / 255).sub_(self._mean).div_(self._std)
        return inputs, targets

    def _crop_and_flip(self, index: Tensor, augmentation: Augmentation) -> Tensor:
        """One gather: pixel (r, c) of image b <- padded_b[t_b + r, l_b + (W-1-c if f_b else c)]."""
        augmentation = augmentation.to(self.device)  # no copy when the loader moved it already
        top, left, flip = augmentation.top, augmentation.left, augmentation.flip
        width = len(self._cols)
        cols = torch.where(flip[:, None], width - 1 - self._cols, self._cols)
        rows = top[:, None] + self._rows  # B x H
        cols = left[:, None] + cols  # B x W
        example = index[:, None, None, None]
        return self._padded[example, self._channels, rows[:, None, :, None], cols[:, None, None, :]]


class DeviceLoader:
    """Batches of a :class:`DeviceDataset`, like a DataLoader over the per-image dataset.

    ``shuffle``: a new random order per pass; ``drop_last``: leave out the last incomplete batch;
    ``augment``: random crop / flip as the dataset's pipeline says. Random draws come from
    ``generator`` (CPU; None: torch's global generator). ``shard = (rank, world_size)``: this
    process's share under torchrun, every ``world_size``-th position of the pass from ``rank``
    (every rank draws the same order; with ``drop_last`` the order is first cut to a multiple of
    ``world_size``, as DistributedSampler does).
    """

    def __init__(
        self,
        dataset: DeviceDataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        augment: bool = False,
        generator: torch.Generator | None = None,
        shard: tuple[int, int] = (0, 1),
    ):
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.generator = generator
        self.rank, self.world_size = shard

    def _positions(self) -> range:
        """Positions of the pass's order that this rank takes."""
        count = len(self.dataset)
        if self.drop_last:
            count -= count % self.world_size
        return range(self.rank, count, self.world_size)

    def __len__(self) -> int:
        count = len(self._positions())
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def plan(self) -> PassPlan:
        """One pass's random draws (this rank's share) on the device: order and augmentation."""
        count = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(count, generator=self.generator)
        else:
            order = torch.arange(count)
        augmentation = self.dataset.draw(count, self.generator) if self.augment else None
        positions = self._positions()
        if self.world_size > 1:
            share = slice(positions.start, positions.stop, positions.step)
            order = order[share]
            augmentation = None if augmentation is None else augmentation[share]
        # one copy per pass to the device, none per batch (a copy from pageable memory waits for
        # the device, a host sync)
        order = order.to(self.dataset.device)
        if augmentation is not None:
            augmentation = augmentation.to(self.dataset.device)
        return PassPlan(order, augmentation)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        plan = self.plan()
        for batch in range(len(self)):
            part = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
            yield self.dataset.batch(
                plan.order[part], None if plan.augmentation is None else plan.augmentation[part]
            )

    def batch_at(self, plan: PassPlan, position: Tensor) -> tuple[Tensor, Tensor]:
        """The batch of ``plan`` that starts at ``position`` (a 0-d int64 tensor on the device).

        The same batch as :meth:`__iter__` gives there, read without the position ever reaching
        the host: a CUDA graph can replay it with the position advanced on the device
        (:mod:`spikealign.trainer.graphs`). Full batches only (``drop_last``).
        """
        part = position + torch.arange(self.batch_size, device=position.device)
        augmentation = None if plan.augmentation is None else plan.augmentation[part]
        return self.dataset.batch(plan.order[part], augmentation)


@dataclass(frozen=True)
class PassPlan:
    """One pass of a :class:`DeviceLoader`: the examples in order and their random draws."""

    order: Tensor  # int64 example indices, on the device
    augmentation: Augmentation | None


def device_dataset(
    dataset: Dataset, device, budget_bytes: int | None = None
) -> DeviceDataset | None:
    """``dataset`` as a :class:`DeviceDataset` on ``device``, or None when it cannot be one.

    None for datasets read from files per image, transforms the batched version does not
    reproduce, or images larger than ``budget_bytes`` (default: unlimited on the CPU, a share
    :data:`CUDA_MEMORY_SHARE` of the free memory on CUDA).
    """
    arrays = _arrays_of(dataset)
    if arrays is None:
        return None
    images, targets, pipeline = arrays
    device = torch.device(device)
    if budget_bytes is None and device.type == "cuda":
        budget_bytes = int(CUDA_MEMORY_SHARE * torch.cuda.mem_get_info(device)[0])
    if budget_bytes is not None:
        size = pipeline.size if pipeline is not None and pipeline.size else images.shape[-1]
        size += 2 * (pipeline.crop_padding if pipeline is not None else 0)  # stored padded
        stored = len(images) * images.shape[1] * size * size * images.element_size()
        if stored > budget_bytes:
            return None
    return DeviceDataset(images, targets, pipeline, device)
