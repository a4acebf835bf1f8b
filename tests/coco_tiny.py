"""A tiny COCO dataset for the detection tests: coloured rectangles of two categories, ids 3 and 7.

Layout as COCO's: ``train2017/``, ``val2017/``, ``annotations/instances_{train,val}2017.json``.
Train: 5 images, one of them with only a crowd box (skipped for training). Val: 3 images, one
without any annotation (kept for evaluation).
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

CATEGORIES = [{"id": 7, "name": "bar"}, {"id": 3, "name": "square"}]  # unsorted, not 1..n
COLOURS = {3: (220, 40, 40), 7: (40, 40, 220)}
WIDTH, HEIGHT = 56, 40
# per split: image id -> [(category id, [x, y, w, h], iscrowd)]
BOXES = {
    "train": {
        11: [(3, [4, 6, 16, 16], 0), (7, [30, 4, 8, 28], 0)],
        12: [(7, [10, 10, 6, 24], 0)],
        13: [(3, [20, 12, 18, 18], 0), (3, [2, 2, 10, 10], 0)],
        14: [(7, [5, 5, 20, 20], 1)],  # crowd only: no training box
        15: [(3, [30, 8, 20, 20], 0), (7, [4, 2, 10, 34], 0)],
    },
    "val": {
        21: [(3, [6, 8, 14, 14], 0), (7, [34, 6, 8, 26], 0)],
        22: [(7, [12, 4, 6, 30], 0), (3, [28, 20, 16, 16], 0)],
        23: [],  # no annotation: kept for evaluation, skipped for training
    },
}


def annotation_json(split: str) -> dict:
    images, annotations = [], []
    for image_id, boxes in BOXES[split].items():
        images.append(
            {"id": image_id, "file_name": f"{image_id:012d}.png", "width": WIDTH, "height": HEIGHT}
        )
        for category_id, box, crowd in boxes:
            annotations.append(
                {
                    "id": len(annotations) + 100 * image_id,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": crowd,
                }
            )
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def write_tiny_coco(root: Path) -> Path:
    """Write the dataset under ``root``; returns ``root``."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, per_image in BOXES.items():
        folder = root / f"{split}2017"
        folder.mkdir(exist_ok=True)
        for image_id, boxes in per_image.items():
            image = Image.new("RGB", (WIDTH, HEIGHT), (128, 128, 128))
            draw = ImageDraw.Draw(image)
            for category_id, (x, y, w, h), _ in boxes:
                draw.rectangle([x, y, x + w - 1, y + h - 1], fill=COLOURS[category_id])
            image.save(folder / f"{image_id:012d}.png")
        path = root / "annotations" / f"instances_{split}2017.json"
        path.write_text(json.dumps(annotation_json(split)))
    return root
