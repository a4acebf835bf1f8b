"""Object detection on MS COCO: data, RetinaNet, learning-rule conversion and box AP (METHOD 8).

Data. COCO in torchvision's :class:`~torchvision.datasets.CocoDetection` layout::

    DATA_DIR/train2017/*.jpg   DATA_DIR/annotations/instances_train2017.json
    DATA_DIR/val2017/*.jpg     DATA_DIR/annotations/instances_val2017.json

An annotation's ``bbox`` is ``[x, y, w, h]`` in pixels; the model's targets are
``boxes = [x, y, x + w, y + h]`` (xyxy, clipped to the image) and ``labels`` in ``1..K``: the
COCO category ids (not contiguous: 1..90 with gaps for COCO) sorted and numbered from 1
(:class:`Categories` maps both ways; 0 is torchvision's background index, so the model has
``K + 1`` classes). As torchvision's detection reference does, training drops crowd annotations
and boxes of zero width or height, and skips images left without a box; evaluation keeps every
image (crowd regions are handled by COCOeval). Training flips an image horizontally
(``x -> W - x``) with probability 1/2, decided by :func:`flip_coin` from (seed, epoch, image index),
so the augmentation does not depend on workers, ranks or where a run was resumed.

Model. torchvision's ``retinanet_resnet50_fpn`` (``weights=None``): ResNet-50 trunk, FPN on C3-C5
plus P6, P7, and the RetinaNet heads; sigmoid focal loss
``FL(p_t) = -alpha_t (1 - p_t)^gamma log p_t`` (alpha 0.25, gamma 2) for classes and L1 loss for
boxes, both computed by torchvision. Images are resized inside the model so that the short side
is ``min_size`` and the long side at most ``max_size`` (800/1333). From scratch the trunk has
trainable batch norm (torchvision's choice for ``weights_backbone=None``); with a ResNet-50 trunk
trained by ``python -m training.run`` (:func:`load_trunk`) the trunk uses frozen batch norm and
its stem and ``layer1`` stay frozen, as torchvision does for a pretrained backbone.
:func:`convert_retinanet` converts the trunk (``backbone``) or every conv of trunk, FPN and heads
(``all``) to a learning rule with :func:`spikealign.feedback.convert`.

Score. COCO box AP from pycocotools' ``COCOeval`` (:func:`coco_box_ap`): AP averaged over IoU
thresholds 0.50:0.05:0.95, AP50, AP75, and AP for small (< 32^2 px), medium and large boxes
(``AP_KEYS``). A figure with no ground truth in the evaluated images (COCOeval's -1) is NaN.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection
from torchvision.models import resnet50
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.transforms.v2 import functional as TF

from spikealign import feedback
from spikealign.errors import UserError

#: COCOeval's summary figures, in its order.
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
SPLITS = ("train", "val")
#: Rules a detector can train with: dfa needs one output tensor (RetinaNet has two heads) and
#: rdd a spiking phase (fully connected layers); ``learned`` is set from outside.
DETECTION_RULES = tuple(rule for rule in feedback.RULES if rule not in ("dfa", "learned"))
#: What --convert converts: the ResNet trunk, or trunk, FPN and heads.
CONVERT_SCOPES = ("backbone", "all")
#: Trunk layers left trainable on a trained trunk (torchvision's default for a pretrained one).
TRAINABLE_TRUNK_LAYERS = 3
_RULE_HINTS = {
    "rdd": "rdd needs the spiking feedback phase, which exists for fully connected layers only",
    "dfa": "dfa needs one output tensor, RetinaNet has a classification and a box head",
    "learned": "learned feedback is set by the spiking phase",
}


def check_rule(rule: str) -> None:
    """UserError unless ``rule`` is one of DETECTION_RULES."""
    if rule in DETECTION_RULES:
        return
    hint = _RULE_HINTS.get(rule, "unknown rule")
    raise UserError(
        f"rule {rule!r} cannot train a detector ({hint}); "
        f"choose one of {', '.join(DETECTION_RULES)}"
    )


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def coco_paths(data_dir: str | Path, split: str) -> tuple[Path, Path]:
    """(image folder, annotation file) of ``split`` ('train' or 'val'); UserError if missing."""
    root = Path(data_dir)
    images = root / f"{split}2017"
    annotations = root / "annotations" / f"instances_{split}2017.json"
    layout = "train2017/, val2017/ and annotations/instances_{train,val}2017.json"
    if not images.is_dir():
        raise UserError(f"no image folder {images}; --data-dir must hold COCO's {layout}")
    if not annotations.is_file():
        raise UserError(f"no annotation file {annotations}; --data-dir must hold COCO's {layout}")
    return images, annotations


@dataclass(frozen=True)
class Categories:
    """COCO category ids <-> contiguous labels 1..K (sorted ids; 0 is the background index)."""

    ids: tuple[int, ...]  # COCO category id of label 1, 2, ..., K
    names: tuple[str, ...]

    @classmethod
    def from_coco(cls, categories: Sequence[Mapping]) -> Categories:
        ordered = sorted(categories, key=lambda category: category["id"])
        return cls(tuple(c["id"] for c in ordered), tuple(str(c.get("name", "")) for c in ordered))

    @property
    def num_classes(self) -> int:
        """Classes of the model: the K categories plus the background index 0."""
        return len(self.ids) + 1

    @functools.cached_property
    def _label_of(self) -> dict[int, int]:
        return {category_id: label for label, category_id in enumerate(self.ids, start=1)}

    def labels(self, category_ids: Iterable[int]) -> list[int]:
        return [self._label_of[category_id] for category_id in category_ids]

    def category_ids(self, labels: Iterable[int]) -> list[int]:
        return [self.ids[label - 1] for label in labels]


def _check_coco_json(dataset: object, annotations: Path, images: Path) -> None:
    """UserError naming the first thing in the loaded json that is not COCO detection format."""

    def bad(what: str) -> UserError:
        return UserError(
            f"{annotations} is not a COCO detection annotation file: {what}; "
            "use COCO's instances_*.json (or fix the file)"
        )

    if not isinstance(dataset, dict):
        raise bad("the top level is not an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise bad(f"no list '{key}'")
    if not dataset["categories"]:
        raise bad("'categories' is empty")
    category_ids = set()
    for category in dataset["categories"]:
        if not isinstance(category, dict) or not isinstance(category.get("id"), int):
            raise bad(f"category without an integer 'id': {str(category)[:80]}")
        category_ids.add(category["id"])
    image_ids = set()
    for image in dataset["images"]:
        if not isinstance(image, dict) or not isinstance(image.get("file_name"), str):
            raise bad(f"image without 'file_name': {str(image)[:80]}")
        if not isinstance(image.get("id"), int):
            raise bad(f"image {image['file_name']} has no integer 'id'")
        image_ids.add(image["id"])
    for annotation in dataset["annotations"]:
        box = annotation.get("bbox") if isinstance(annotation, dict) else None
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            raise bad(f"annotation without a 4-number 'bbox': {str(annotation)[:80]}")
        if annotation.get("image_id") not in image_ids:
            raise bad(f"annotation {annotation.get('id')} refers to unknown image_id")
        if annotation.get("category_id") not in category_ids:
            raise bad(f"annotation {annotation.get('id')} has unknown category_id")
    present = set(os.listdir(images))
    missing = [
        image["file_name"] for image in dataset["images"] if image["file_name"] not in present
    ]
    if missing:
        raise UserError(
            f"{len(missing)} image(s) listed in {annotations} are not in {images} "
            f"(first: {missing[0]}); copy the images or use the matching annotation file"
        )


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def load_coco(data_dir: str | Path, split: str) -> CocoDetection:
    """torchvision's CocoDetection of ``split``, its json checked (UserError on bad input)."""
    images, annotations = coco_paths(data_dir, split)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco = CocoDetection(str(images), str(annotations))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(
            f"{annotations} is not valid json ({err}); re-extract COCO's annotations"
        ) from None
    except (AssertionError, KeyError, TypeError, AttributeError) as err:
        # pycocotools checks and indexes the json before we can look at it
        raise UserError(
            f"{annotations} is not a COCO detection annotation file ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'malformed'}); use COCO's instances_*.json"
        ) from None
    _check_coco_json(coco.coco.dataset, annotations, images)
    return coco


def coco_target(annotations: Sequence[Mapping], width: int, height: int, categories: Categories):
    """(boxes xyxy float32 [n, 4], labels int64 [n]) of the non-crowd boxes with positive area."""
    kept = [a for a in annotations if not a.get("iscrowd", 0)]
    boxes = torch.tensor([a["bbox"] for a in kept], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2].clamp_(0, width)
    boxes[:, 1::2].clamp_(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    labels = torch.tensor(categories.labels(a["category_id"] for a in kept), dtype=torch.int64)
    return boxes[keep], labels[keep]


def flip_coin(seed: int, epoch: int, index: int) -> bool:
    """The horizontal flip of training image ``index`` in ``epoch``: a fair coin from the triple."""
    return bool(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0] & 1)


class CocoBoxes(Dataset):
    """(image [3, H, W] float in [0, 1], target) pairs of one COCO split for torchvision detectors.

    ``target``: ``boxes`` (xyxy, float32), ``labels`` (1..K, int64), ``image_id`` (COCO's).
    ``train=True``: only images with at least one usable box, random horizontal flips
    (:func:`flip_coin`, set the epoch with :meth:`set_epoch`). ``train=False``: every image of the
    split, unflipped. ``image_ids`` (the COCO ids served, in order) may be narrowed to a subset.
    ``categories`` defaults to the split's own.
    """

    def __init__(
        self,
        coco: CocoDetection,
        train: bool,
        categories: Categories | None = None,
        seed: int = 0,
    ) -> None:
        self.coco = coco
        self.train = train
        self.categories = categories or Categories.from_coco(coco.coco.dataset["categories"])
        self.seed = seed
        self.epoch = 0
        api = coco.coco
        if train:
            self.image_ids = [
                image_id
                for image_id in coco.ids
                if len(self._target(api.imgs[image_id], api.imgToAnns[image_id])[0])
            ]
        else:
            self.image_ids = list(coco.ids)
        self._index = {image_id: index for index, image_id in enumerate(coco.ids)}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _target(self, image: Mapping, annotations):
        width, height = image.get("width"), image.get("height")
        if width is None or height is None:  # fall back to the file (only for odd json)
            width, height = self.coco._load_image(image["id"]).size
        return coco_target(annotations, width, height, self.categories)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int):
        image_id = self.image_ids[index]
        pil_image, annotations = self.coco[self._index[image_id]]
        width, height = pil_image.size
        boxes, labels = coco_target(annotations, width, height, self.categories)
        image = TF.to_dtype(TF.to_image(pil_image), torch.float32, scale=True)
        if self.train and flip_coin(self.seed, self.epoch, index):
            box_tensor = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width))
            image = TF.horizontal_flip(image)
            boxes = TF.horizontal_flip(box_tensor).as_subclass(Tensor)
        target = {"boxes": boxes, "labels": labels, "image_id": image_id}
        return image.as_subclass(Tensor), target


def collate(batch):
    """A batch of detection samples as (list of images, list of targets), as torchvision wants."""
    return tuple(list(items) for items in zip(*batch, strict=True))


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

_FEEDBACK_BUFFERS = (".feedback", ".feedback_magnitude")


def _resnet50_trunk_shapes() -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        state = resnet50().state_dict()
    return {k: tuple(v.shape) for k, v in state.items() if not k.startswith("fc.")}


def load_trunk(path: str | Path) -> dict[str, Tensor]:
    """The ResNet-50 trunk (no ``fc``) of a ``training.run`` checkpoint, as a state dict.

    Feedback buffers of a converted model are dropped: the detector makes its own. UserError if
    the file is unreadable or its model is not a torchvision ResNet-50.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no backbone checkpoint {path}; give the checkpoint.pt of a training run")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user mistake
        raise UserError(
            f"cannot read backbone checkpoint {path} ({type(err).__name__}); "
            "give the checkpoint.pt of a training run"
        ) from None
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise UserError(
            f"{path} is not a spikealign training checkpoint (no 'model' state dict); give the "
            "checkpoint.pt of a python -m training.run run"
        )
    if state and all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    trunk = {
        key: value
        for key, value in state.items()
        if not key.startswith("fc.") and not key.endswith(_FEEDBACK_BUFFERS)
    }
    expected = _resnet50_trunk_shapes()
    shapes = {k: tuple(v.shape) for k, v in trunk.items() if not k.endswith("num_batches_tracked")}
    if shapes != {k: v for k, v in expected.items() if not k.endswith("num_batches_tracked")}:
        config = checkpoint.get("config") or {}
        arch = config.get("arch") if isinstance(config, dict) else None
        held = f"a {arch} model" if arch else "a model that is not a torchvision ResNet-50"
        raise UserError(
            f"backbone checkpoint {path} holds {held}; RetinaNet needs a ResNet-50 trunk "
            "(the checkpoint.pt of a training.run of a torchvision resnet50)"
        )
    return trunk


def build_retinanet(
    num_classes: int,
    min_size: int = 800,
    max_size: int = 1333,
    trunk: Mapping[str, Tensor] | None = None,
) -> RetinaNet:
    """torchvision's RetinaNet ResNet-50-FPN, from scratch or on a trained ``trunk`` (load_trunk).

    From scratch it equals ``retinanet_resnet50_fpn(weights=None, weights_backbone=None)``.
    Initialisation draws from torch's global RNG (seed it first).
    """
    trained = trunk is not None
    backbone = resnet_fpn_backbone(
        backbone_name="resnet50",
        weights=None,
        norm_layer=FrozenBatchNorm2d if trained else nn.BatchNorm2d,
        trainable_layers=TRAINABLE_TRUNK_LAYERS if trained else 5,
        returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(256, 256),
    )
    if trained:
        backbone.body.load_state_dict(trunk)
    return RetinaNet(backbone, num_classes, min_size=min_size, max_size=max_size)


def convert_retinanet(model: RetinaNet, rule: str, scope: str = "all", **options) -> RetinaNet:
    """Convert the trunk (``backbone``) or every conv (``all``) of ``model`` to ``rule``.

    ``bp`` leaves the model as it is: its gradients are exact already. Frozen trunk layers are
    converted too (their feedback is unused: no gradient flows below them).
    """
    check_rule(rule)
    if scope not in CONVERT_SCOPES:
        raise UserError(f"unknown --convert {scope!r}; choose one of {', '.join(CONVERT_SCOPES)}")
    if rule == "bp":
        return model
    feedback.convert(model.backbone.body if scope == "backbone" else model, rule, **options)
    return model


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def detections_to_coco(
    image_ids: Sequence[int], outputs: Sequence[Mapping[str, Tensor]], categories: Categories
) -> list[dict]:
    """Model outputs (boxes xyxy, scores, labels per image) as COCO results (bbox xywh, ids).

    Label 0 (the background index, never a training target) is dropped.
    """
    results = []
    for image_id, output in zip(image_ids, outputs, strict=True):
        labels = output["labels"].tolist()
        boxes = output["boxes"].detach().float().cpu()
        boxes[:, 2:] -= boxes[:, :2]
        for box, score, label in zip(
            boxes.tolist(), output["scores"].tolist(), labels, strict=True
        ):
            if label == 0:
                continue
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": categories.ids[label - 1],
                    "bbox": [round(v, 2) for v in box],
                    "score": float(score),
                }
            )
    return results


def coco_box_ap(coco_gt, results: list[dict], image_ids: Sequence[int] | None = None) -> dict:
    """{AP, AP50, AP75, APs, APm, APl} of COCO ``results`` against the ground truth ``coco_gt``.

    ``coco_gt`` is a pycocotools COCO object; only ``image_ids`` (default all) are scored, so an
    image without detections counts as missed. Figures without ground truth are NaN.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # loadRes cannot take an empty list
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": coco_gt.dataset["images"],
                "categories": coco_gt.dataset["categories"],
                "annotations": [],
            }
            coco_dt.createIndex()
        evaluation = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            evaluation.params.imgIds = sorted(int(i) for i in image_ids)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {
        key: (math.nan if value < 0 else float(value))
        for key, value in zip(AP_KEYS, evaluation.stats[: len(AP_KEYS)], strict=True)
    }
