"""Tests of spikealign.detection: COCO data, RetinaNet, rule conversion and box AP.

The data is the tiny COCO of tests/coco_tiny.py (categories 3 and 7). RetinaNet-R50 is built once
per module and run on 40x56 images resized to at most 48 px, on the CPU.
"""

from __future__ import annotations

import copy
import functools
import json
import warnings

import pytest
import torch
from torch import nn
from torchvision.models.detection import retinanet_resnet50_fpn
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import FrozenBatchNorm2d

from spikealign import detection, feedback
from spikealign.errors import UserError
from tests.coco_tiny import BOXES, CATEGORIES, COLOURS, WIDTH, write_tiny_coco

MIN_SIZE, MAX_SIZE = 32, 48


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    return write_tiny_coco(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="module")
def val_set(coco_dir):
    return detection.CocoBoxes(detection.load_coco(coco_dir, "val"), train=False)


@pytest.fixture(scope="module")
def scratch_model():
    torch.manual_seed(0)
    return detection.build_retinanet(3, MIN_SIZE, MAX_SIZE)


def ground_truth_results(split: str, shift: float = 0.0) -> list[dict]:
    """COCO results equal to the ground truth (score 1), boxes moved right by ``shift`` px."""
    return [
        {"image_id": image_id, "category_id": category, "bbox": [x + shift, y, w, h], "score": 1.0}
        for image_id, boxes in BOXES[split].items()
        for category, (x, y, w, h), crowd in boxes
        if not crowd
    ]


# -- categories and data ----------------------------------------------------------------------


def test_categories_map_ids_to_contiguous_labels_and_back():
    categories = detection.Categories.from_coco(CATEGORIES)
    assert categories.ids == (3, 7) and categories.names == ("square", "bar")
    assert categories.num_classes == 3  # K = 2 plus background 0
    assert categories.labels([7, 3, 7]) == [2, 1, 2]
    assert categories.category_ids([1, 2]) == [3, 7]


def test_val_keeps_every_image_train_skips_images_without_boxes(coco_dir, val_set):
    train = detection.CocoBoxes(detection.load_coco(coco_dir, "train"), train=True)
    assert train.image_ids == [11, 12, 13, 15]  # 14 has only a crowd box
    assert val_set.image_ids == [21, 22, 23]  # 23 has no annotation
    image, target = val_set[2]
    assert image.shape == (3, 40, WIDTH) and target["boxes"].shape == (0, 4)
    image, target = val_set[0]
    assert target["image_id"] == 21
    torch.testing.assert_close(target["boxes"], torch.tensor([[6.0, 8, 20, 22], [34, 6, 42, 32]]))
    assert target["labels"].tolist() == [1, 2]  # category 3 -> 1, 7 -> 2
    assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1


def box_colour(image, box) -> list[int]:
    x1, y1, x2, y2 = (int(v) for v in box)
    return (image[:, (y1 + y2) // 2, (x1 + x2) // 2] * 255).round().int().tolist()


def test_training_flips_image_and_boxes_together_reproducibly(coco_dir):
    train = detection.CocoBoxes(detection.load_coco(coco_dir, "train"), train=True, seed=5)
    flips = {}
    for epoch in range(8):
        train.set_epoch(epoch)
        for index in range(len(train)):
            image, target = train[index]
            flipped = detection.flip_coin(5, epoch, index)
            flips[flipped] = flips.get(flipped, 0) + 1
            boxes = BOXES["train"][target["image_id"]]
            for box, label, (category, (x, y, w, h), _) in zip(
                target["boxes"], target["labels"], boxes, strict=True
            ):
                expected_x = WIDTH - x - w if flipped else x
                assert box.tolist() == [expected_x, y, expected_x + w, y + h]
                assert box_colour(image, box) == list(COLOURS[category])
                assert detection.Categories.from_coco(CATEGORIES).ids[label - 1] == category
    assert flips[True] > 4 and flips[False] > 4  # both happen
    train.set_epoch(3)
    first = train[1][0]
    train.set_epoch(3)
    assert torch.equal(train[1][0], first)


def test_collate_keeps_lists():
    images, targets = detection.collate([(1, "a"), (2, "b")])
    assert images == [1, 2] and targets == ["a", "b"]


# -- bad input --------------------------------------------------------------------------------


def broken_copy(coco_dir, tmp_path, edit):
    """A copy of the tiny COCO with ``edit(root)`` applied."""
    root = write_tiny_coco(tmp_path / "coco")
    edit(root)
    return root


def set_val_json(root, value):
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(value))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda root: (root / "val2017").rename(root / "elsewhere"), "no image folder"),
        (
            lambda root: (root / "annotations" / "instances_val2017.json").unlink(),
            "no annotation file",
        ),
        (
            lambda root: (root / "annotations" / "instances_val2017.json").write_text(
                '{"images": ['
            ),
            "not valid json",
        ),
        (lambda root: set_val_json(root, [1, 2]), "not a COCO detection annotation file"),
        (lambda root: set_val_json(root, {"images": []}), "not a COCO detection annotation file"),
        (
            lambda root: set_val_json(
                root, {**detection_json("val"), "categories": [{"id": 3, "name": "square"}]}
            ),
            "unknown category_id",
        ),
        (
            lambda root: set_val_json(
                root,
                {
                    **detection_json("val"),
                    "annotations": [{"id": 1, "image_id": 21, "category_id": 3, "bbox": [1, 2]}],
                },
            ),
            "4-number 'bbox'",
        ),
        (lambda root: (root / "val2017" / "000000000022.png").unlink(), "are not in"),
    ],
)
def test_bad_coco_is_one_user_error(coco_dir, tmp_path, edit, message):
    root = broken_copy(coco_dir, tmp_path, edit)
    with pytest.raises(UserError, match=message) as caught:
        detection.load_coco(root, "val")
    assert "\n" not in str(caught.value)


def detection_json(split):
    from tests.coco_tiny import annotation_json

    return annotation_json(split)


# -- evaluation -------------------------------------------------------------------------------


def test_box_ap_is_one_for_the_ground_truth_and_lower_for_shifted_boxes(val_set):
    coco_gt = val_set.coco.coco
    exact = detection.coco_box_ap(coco_gt, ground_truth_results("val"))
    assert set(exact) == set(detection.AP_KEYS)
    for key in ("AP", "AP50", "AP75", "APs"):
        assert exact[key] == pytest.approx(1.0)
    assert exact["APm"] != exact["APm"] and exact["APl"] != exact["APl"]  # no medium/large: NaN
    shifted = detection.coco_box_ap(coco_gt, ground_truth_results("val", shift=3.0))
    assert shifted["AP"] < 0.9 and shifted["AP75"] < 1.0
    assert detection.coco_box_ap(coco_gt, [])["AP"] == 0.0
    only_21 = [r for r in ground_truth_results("val") if r["image_id"] == 21]
    assert detection.coco_box_ap(coco_gt, only_21, image_ids=[21])["AP"] == pytest.approx(1.0)
    assert detection.coco_box_ap(coco_gt, only_21)["AP"] < 0.9  # image 22's boxes missed


def test_model_outputs_map_back_to_coco_category_ids(val_set):
    categories = val_set.categories
    image_ids, outputs = [], []
    for index in range(len(val_set)):
        _, target = val_set[index]
        image_ids.append(target["image_id"])
        n = len(target["labels"])
        # plus one background-index detection, which must be dropped
        outputs.append(
            {
                "boxes": torch.cat([target["boxes"], torch.tensor([[0.0, 0, 5, 5]])]),
                "labels": torch.cat([target["labels"], torch.tensor([0])]),
                "scores": torch.ones(n + 1),
            }
        )
    results = detection.detections_to_coco(image_ids, outputs, categories)
    assert sorted((r["image_id"], r["category_id"], r["bbox"][0]) for r in results) == sorted(
        (r["image_id"], r["category_id"], r["bbox"][0]) for r in ground_truth_results("val")
    )
    assert detection.coco_box_ap(val_set.coco.coco, results)["AP"] == pytest.approx(1.0)
    swapped = [{**r, "category_id": 10 - r["category_id"]} for r in results]  # 3 <-> 7
    assert detection.coco_box_ap(val_set.coco.coco, swapped)["AP"] == 0.0


# -- model ------------------------------------------------------------------------------------


def test_scratch_model_is_torchvisions_retinanet(scratch_model):
    reference = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    shapes = {k: v.shape for k, v in scratch_model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in reference.state_dict().items()}
    assert all(p.requires_grad for p in scratch_model.parameters())
    assert scratch_model.transform.min_size == (MIN_SIZE,)
    assert scratch_model.transform.max_size == MAX_SIZE


def count_layers(model):
    converted = {name for name, _ in feedback.feedback_layers(model)}
    plain = {
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear) and name not in converted
    }
    return converted, plain


def test_convert_all_converts_every_conv_of_trunk_fpn_and_heads(scratch_model):
    model = copy.deepcopy(scratch_model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # convert warns about any weight it cannot convert
        detection.convert_retinanet(model, "usf", "all")
    converted, plain = count_layers(model)
    assert not plain
    assert {"backbone.body.conv1", "backbone.body.layer1.0.downsample.0"} <= converted
    assert {"backbone.fpn.extra_blocks.p7", "head.classification_head.cls_logits"} <= converted
    assert any(n.startswith("backbone.fpn.inner_blocks") for n in converted)
    assert any(n.startswith("head.regression_head.conv") for n in converted)


def test_convert_backbone_converts_the_trunk_only(scratch_model):
    model = detection.convert_retinanet(copy.deepcopy(scratch_model), "fa", "backbone")
    converted, plain = count_layers(model)
    assert len(converted) == 53  # ResNet-50: stem, 16 blocks x 3 convs, 4 downsample convs
    assert all(name.startswith("backbone.body.") for name in converted)
    assert all(not name.startswith("backbone.body.") for name in plain)


@pytest.mark.parametrize(("rule", "message"), [("rdd", "spiking"), ("dfa", "one output")])
def test_rules_without_detection_meaning_are_refused(scratch_model, rule, message):
    with pytest.raises(UserError, match=message):
        detection.convert_retinanet(scratch_model, rule)
    with pytest.raises(UserError, match="--convert"):
        detection.convert_retinanet(scratch_model, "fa", "heads")


def tiny_batch(dataset):
    images, targets = detection.collate([dataset[0], dataset[1]])
    return images, [{k: v for k, v in t.items() if k != "image_id"} for t in targets]


def test_only_the_error_sent_below_changes(scratch_model, val_set):
    """fa vs bp on one batch: the top layers' weight gradients agree, the ones below do not."""
    images, targets = tiny_batch(val_set)
    grads = {}
    for rule in ("bp", "fa"):
        model = copy.deepcopy(scratch_model)
        detection.convert_retinanet(model, rule)
        model.train()
        sum(model(images, targets).values()).backward()
        grads[rule] = {n: p.grad for n, p in model.named_parameters()}
    for top in ("head.classification_head.cls_logits", "head.regression_head.bbox_reg"):
        for kind in ("weight", "bias"):
            name = f"{top}.{kind}"
            torch.testing.assert_close(grads["fa"][name], grads["bp"][name])
    for below in (
        "head.classification_head.conv.3.0.weight",
        "backbone.body.layer4.2.conv3.weight",
    ):
        assert not torch.allclose(grads["fa"][below], grads["bp"][below])


def save_run_checkpoint(path, model, arch):
    torch.save({"format": 1, "config": {"arch": arch}, "model": model.state_dict()}, path)


def test_trunk_from_a_resnet50_training_checkpoint(tmp_path):
    from torchvision.models import resnet18, resnet50

    torch.manual_seed(1)
    trunk_model = feedback.convert(resnet50(), {"conv1": "usf"})  # a feedback buffer to drop
    save_run_checkpoint(tmp_path / "r50.pt", trunk_model, "resnet50")
    trunk = detection.load_trunk(tmp_path / "r50.pt")
    assert not any(k.startswith("fc.") or "feedback" in k for k in trunk)
    model = detection.build_retinanet(3, MIN_SIZE, MAX_SIZE, trunk=trunk)
    body = model.backbone.body
    torch.testing.assert_close(body.layer3[0].conv2.weight, trunk_model.layer3[0].conv2.weight)
    torch.testing.assert_close(body.bn1.running_var, trunk_model.bn1.running_var)
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # frozen batch norm has no weights to convert
        detection.convert_retinanet(model, "usf")
    assert not count_layers(model)[1]

    save_run_checkpoint(tmp_path / "r18.pt", resnet18(), "resnet18")
    with pytest.raises(UserError, match="holds a resnet18 model; RetinaNet needs a ResNet-50"):
        detection.load_trunk(tmp_path / "r18.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read backbone checkpoint"):
        detection.load_trunk(tmp_path / "junk.pt")
    with pytest.raises(UserError, match="no backbone checkpoint"):
        detection.load_trunk(tmp_path / "missing.pt")


def test_convert_leaves_group_norm_of_v2_heads_exact():
    head = RetinaNetHead(256, 9, 3, norm_layer=functools.partial(nn.GroupNorm, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        feedback.convert(head, "fa")
    converted, plain = count_layers(head)
    assert len(converted) == 10 and not plain  # 4 + 1 convs per head
    assert sum(isinstance(m, nn.GroupNorm) for m in head.modules()) == 8
