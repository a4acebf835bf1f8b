"""Tests of spikealign.device_data: batched augmentation on the device against the per-image
torchvision pipeline of spikealign.data, on small files in each dataset's real format.

Equality is bit for bit (float32 on CPU; on CUDA too when present: the crop is a gather and the
normalisation three correctly rounded float32 operations, identical on both devices). Distributions
are compared on images whose every pixel is distinct, so each output image tells which crop offset
and flip produced it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Subset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from spikealign import data, device_data
from spikealign.device_data import DeviceLoader, device_dataset, read_pipeline
from tests.test_data import md5_free, write_cifar10, write_fashion_mnist, write_svhn  # noqa: F401
from tests.test_data_theory import write_cifar100, write_mnist

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PADDING = data.AUGMENT_PADDING


def per_image(dataset, indices) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in indices])


def plain_bundle(name, root, **options):
    writer = {
        "fashion-mnist": write_fashion_mnist, "cifar10": write_cifar10, "svhn": write_svhn,
        "mnist": write_mnist, "cifar100": write_cifar100,
    }  # fmt: skip
    writer[name](root)
    return data.load_dataset(name, root, **options)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["fashion-mnist", "cifar10", "svhn", "mnist", "cifar100"])
def test_unaugmented_batches_equal_the_per_image_pipeline(name, device, tmp_path, md5_free):  # noqa: F811
    bundle = plain_bundle(name, tmp_path, augment=False)
    for split in (bundle.train, bundle.test):
        stored = device_dataset(split, device)
        assert stored.images.dtype == torch.uint8 and stored.images.device.type == device
        index = torch.arange(len(split)).flip(0)
        inputs, targets = stored.batch(index.to(device))
        assert inputs.device.type == device and inputs.dtype == torch.float32
        assert torch.equal(inputs.cpu(), per_image(split, index.tolist()))
        assert targets.cpu().tolist() == [split[i][1] for i in index.tolist()]


def test_subset_resize_and_digits(tmp_path):
    bundle = plain_bundle("fashion-mnist", tmp_path, augment=False, image_size=32)
    subset = Subset(bundle.train, [7, 2, 9])
    stored = device_dataset(subset, "cpu")
    assert stored.images.shape == (3, 1, 32, 32)
    inputs, targets = stored.batch(torch.arange(3))
    # resized once by torchvision's tensor resize: within a few grey levels of PIL's per image
    difference = (inputs - per_image(subset, range(3))).abs().max().item()
    assert difference <= 4 * 2 / 255
    assert targets.tolist() == [subset[i][1] for i in range(3)]

    digits = data.load_dataset("digits")
    stored = device_dataset(Subset(digits.train, [5, 0]), "cpu")
    inputs, targets = stored.batch(torch.tensor([1, 0]))
    assert torch.equal(inputs, per_image(digits.train, [0, 5]))
    assert targets.tolist() == [digits.train[0][1], digits.train[5][1]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["fashion-mnist", "cifar10"])
def test_crop_and_flip_equal_torchvision_for_the_same_draws(name, device, tmp_path, md5_free):  # noqa: F811
    bundle = plain_bundle(name, tmp_path, augment=True)
    plain = data.load_dataset(name, tmp_path, augment=False)
    stored = device_dataset(bundle.train, device)
    count, size, channels = len(bundle.train), bundle.image_size, bundle.in_channels
    draws = stored.draw(count, torch.Generator().manual_seed(3))
    inputs, _ = stored.batch(torch.arange(count, device=device), draws)
    normalise = v2.Normalize([0.5] * channels, [0.5] * channels)
    for i in range(count):
        image = TF.pad(TF.to_image(np.asarray(plain.train.data[i])), [PADDING])
        image = TF.crop(image, int(draws.top[i]), int(draws.left[i]), size, size)
        if draws.flip[i]:
            image = TF.horizontal_flip(image)
        expected = normalise(TF.to_dtype(image, torch.float32, scale=True))
        assert torch.equal(inputs[i].cpu(), expected), i


def identify_draws(outputs: torch.Tensor, source: torch.Tensor) -> list[tuple[int, int, bool]]:
    """(top, left, flip) of each output image, by matching all candidates of the source image."""
    padded = TF.pad(source, [PADDING])
    candidates, keys = [], []
    span = 2 * PADDING + 1
    for top in range(span):
        for left in range(span):
            crop = padded[..., top : top + 28, left : left + 28]
            for flip in (False, True):
                candidates.append(crop.flip(-1) if flip else crop)
                keys.append((top, left, flip))
    stack = torch.stack(candidates).flatten(1).double()  # K x pixels
    flat = outputs.flatten(1).double()
    # squared distances by one matrix product (exact: integer values far below 2**53)
    distances = (flat**2).sum(1)[:, None] + (stack**2).sum(1)[None] - 2 * flat @ stack.T
    assert ((distances == 0).sum(1) == 1).all()  # every output is exactly one candidate
    return [keys[k] for k in distances.argmin(1).tolist()]


def test_augmentation_distribution_matches_the_per_image_pipeline(tmp_path):
    """Offsets uniform on 0..2p and flips with p = 0.5 in both pipelines; the same per-pixel mean
    and variance of the augmented images (distinct pixels, so every draw is identifiable)."""
    bundle = plain_bundle("fashion-mnist", tmp_path, augment=True)
    draws = 2916  # 36 per (top, left) cell
    torch.manual_seed(0)
    reference = torch.stack([bundle.train[4][0] for _ in range(draws)])
    stored = device_dataset(bundle.train, "cpu")
    loader_draws = stored.draw(draws, torch.Generator().manual_seed(1))
    batched, _ = stored.batch(torch.full((draws,), 4), loader_draws)

    source = TF.to_image(bundle.train.data[4].numpy())  # uint8 1 x 28 x 28
    span = 2 * PADDING + 1
    for outputs in (reference, batched):
        as_uint8 = ((outputs * 0.5 + 0.5) * 255).round().to(torch.uint8)
        keys = identify_draws(as_uint8, source)
        cells = np.zeros((span, span))
        for top, left, _ in keys:
            cells[top, left] += 1
        flips = sum(flip for _, _, flip in keys)
        expected = draws / span**2
        chi2 = ((cells - expected) ** 2 / expected).sum()
        assert chi2 < 130  # 80 degrees of freedom: P(chi2 > 130) < 0.001
        assert abs(flips - draws / 2) < 3.3 * (draws / 4) ** 0.5  # binomial, 3.3 sd
    mean_gap = (reference.mean(0) - batched.mean(0)).abs()
    standard_error = ((reference.var(0) + batched.var(0)) / draws).sqrt()
    assert (mean_gap <= 4.5 * standard_error + 1e-6).all()
    # the augmented pixel variance: a pixel that moves has a clearly positive variance in both
    assert torch.allclose(reference.var(0), batched.var(0), rtol=0.25, atol=0.02)


def test_loader_shuffles_reproducibly_and_drops_the_last_batch(tmp_path):
    bundle = plain_bundle("fashion-mnist", tmp_path, augment=True)
    stored = device_dataset(bundle.train, "cpu")

    def one_pass(seed):
        loader = DeviceLoader(
            stored, 5, shuffle=True, drop_last=True, augment=True,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        assert len(loader) == len(stored) // 5
        return list(loader)

    first, again, other = one_pass(11), one_pass(11), one_pass(12)
    assert len(first) == 2
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other, strict=True))
    # a pass visits distinct examples (10 of the 12; the last 2 are dropped)
    labels_seen = torch.cat([y for _, y in first])
    assert len(labels_seen) == 10

    in_order = DeviceLoader(stored, 5)
    assert len(in_order) == 3
    batches = list(in_order)
    assert [len(y) for _, y in batches] == [5, 5, 2]
    plain = data.load_dataset("fashion-mnist", tmp_path, augment=False)
    assert torch.equal(torch.cat([x for x, _ in batches]), per_image(plain.train, range(12)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_seed_gives_the_same_batches_on_cuda_and_cpu(tmp_path):
    bundle = plain_bundle("fashion-mnist", tmp_path, augment=True)
    passes = []
    for device in ("cpu", "cuda"):
        loader = DeviceLoader(
            device_dataset(bundle.train, device), 4, shuffle=True, augment=True,
            generator=torch.Generator().manual_seed(5),
        )  # fmt: skip
        passes.append([(x.cpu(), y.cpu()) for x, y in loader])
    for (x1, y1), (x2, y2) in zip(*passes, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_what_stays_on_the_dataloader(tmp_path):
    bundle = plain_bundle("fashion-mnist", tmp_path, augment=True)
    padded = 12 * 36 * 36  # 12 images of 28 x 28, stored with the crop's padding of 4
    assert device_dataset(bundle.train, "cpu", budget_bytes=padded - 1) is None
    assert device_dataset(bundle.train, "cpu", budget_bytes=padded).nbytes == padded
    bundle.train.transform = v2.Compose([v2.ToImage(), v2.ColorJitter(0.5), v2.ToDtype(
        torch.float32, scale=True), v2.Normalize([0.5], [0.5])])  # fmt: skip
    assert device_dataset(bundle.train, "cpu") is None
    assert read_pipeline(v2.Compose([v2.ToImage(), v2.RandomCrop(28, padding=4, fill=255),
                                     v2.ToDtype(torch.float32, scale=True),
                                     v2.Normalize([0.5], [0.5])])) is None  # fmt: skip
    assert read_pipeline(None) is None

    class Photos(torch.utils.data.Dataset):  # decoded per image: no arrays in memory
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return torch.zeros(3, 8, 8), 0

    assert device_dataset(Photos(), "cpu") is None
    device_data.register(Photos, lambda dataset: (torch.zeros(1, 3, 8, 8), torch.zeros(1)))
    try:
        assert device_dataset(Photos(), "cpu") is None  # registered, but it has no transform
    finally:
        del device_data.IN_MEMORY[Photos]


def test_shards_of_two_ranks_split_one_pass(tmp_path):
    """Under torchrun each rank takes every second position of the same order and draws."""
    bundle = plain_bundle("fashion-mnist", tmp_path, augment=True)
    stored = device_dataset(bundle.train, "cpu")

    def images(shard, drop_last=True, shuffle=True, batch=2):
        loader = DeviceLoader(
            stored, batch, shuffle=shuffle, drop_last=drop_last, augment=shuffle,
            generator=torch.Generator().manual_seed(4), shard=shard,
        )  # fmt: skip
        return torch.cat([x for x, _ in loader]), len(loader)

    whole, _ = images((0, 1), batch=12)
    rank_0, batches_0 = images((0, 2))
    rank_1, batches_1 = images((1, 2))
    assert batches_0 == batches_1 == 3
    assert torch.equal(rank_0, whole[0::2]) and torch.equal(rank_1, whole[1::2])
    # the test pass: every example once over the ranks, none repeated
    test_0, _ = images((0, 2), drop_last=False, shuffle=False, batch=5)
    test_1, _ = images((1, 2), drop_last=False, shuffle=False, batch=5)
    plain = data.load_dataset("fashion-mnist", tmp_path, augment=False)
    assert torch.equal(test_0, per_image(plain.train, range(0, 12, 2)))
    assert torch.equal(test_1, per_image(plain.train, range(1, 12, 2)))
