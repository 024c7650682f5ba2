"""COCO-Stuff: 10k (``.mat`` labels) and 164k (PNG labels), 171 classes (80 things + 91 stuff).

Raw labels are COCO category ids: things 1..91 (11 of them unused by COCO: 12 street sign,
26 hat, 29 shoe, 30 eye glasses, 45 plate, 66 mirror, 68 window, 69 desk, 71 door, 83 blender,
91 hair brush), stuff 92..182. ``label_set=171`` (default) maps the 171 used ids to 0..170 in
order; ``label_set=182`` keeps id - 1 as the class (the 182-way output of kazuto1011's
cocostuff164k models, whose 11 unused classes never occur).

``cocostuff10k`` layout (``cocostuff-10k-v1.1``)::

    ROOT/images/ID.jpg
    ROOT/annotations/ID.mat           field ``S``: 0 = unlabeled, 1..182 = COCO ids
    ROOT/imageLists/SPLIT.txt         train (9,000), test (1,000), all

``cocostuff164k`` layout::

    ROOT/images/SPLIT/ID.jpg                         SPLIT = train2017, val2017
    ROOT/annotations/SPLIT/ID.png  or  ROOT/stuffthingmaps_trainval2017/SPLIT/ID.png
                                                     0..181 = COCO id - 1, 255 = unlabeled
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from deeplab.data.datasets.base import Sample, SegmentationDataset, lut_from_mapping, read_list_file
from deeplab.data.io import DEFAULT_MAX_PIXELS, read_mask, read_mat_mask
from deeplab.data.palettes import voc_palette

COCO_THING_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
COCO_STUFF_NAMES = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter",
    "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit",
    "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves", "light", "mat",
    "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement",
    "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river",
    "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other",
    "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel",
    "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind",
    "window-other", "wood",
)  # fmt: skip
#: COCO thing ids (1-based) that no COCO annotation uses.
UNUSED_THING_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)
_UNUSED_NAMES = dict(zip(UNUSED_THING_IDS, (
    "street sign", "hat", "shoe", "eye glasses", "plate", "mirror", "window", "desk", "door",
    "blender", "hair brush",
)))  # fmt: skip
COCO_STUFF_CLASSES = COCO_THING_NAMES + COCO_STUFF_NAMES
#: The 171 used COCO ids (1-based) in class order.
USED_IDS = tuple(i for i in range(1, 183) if i not in UNUSED_THING_IDS)


def _classes_and_map(label_set: int) -> tuple[tuple[str, ...], dict[int, int]]:
    """Class names and {0-based raw value (COCO id - 1): class} for the chosen label set."""
    if label_set == 171:
        mapping = {cid - 1: k for k, cid in enumerate(USED_IDS)}
        mapping.update({cid - 1: 255 for cid in UNUSED_THING_IDS})  # never annotated: ignore
        return COCO_STUFF_CLASSES, mapping
    if label_set == 182:
        names_by_id = dict(zip(USED_IDS, COCO_STUFF_CLASSES)) | _UNUSED_NAMES
        return tuple(names_by_id[i] for i in range(1, 183)), {i: i for i in range(182)}
    raise ValueError(f"label_set must be 171 or 182, got {label_set!r}")


class CocoStuff164k(SegmentationDataset):
    """COCO-Stuff 164k (PNG labels).

    Args:
        root: the folder holding ``images/`` and ``annotations/`` (or ``stuffthingmaps_trainval2017/``).
        split: ``train2017`` (118k) or ``val2017`` (5k); ``train`` / ``val`` are accepted too.
        transforms: joint transform.
        skip_bad: skip and report bad samples instead of raising.
        max_pixels: image size cap.
        label_set: 171 (used classes, default) or 182 (COCO id - 1).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train2017",
        *,
        transforms: Callable[[Any, Any], Any] | None = None,
        skip_bad: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        label_set: int = 171,
    ):
        root = Path(root)
        split = {"train": "train2017", "val": "val2017"}.get(split, split)
        img_dir = root / "images" / split
        if not img_dir.is_dir():
            raise FileNotFoundError(f"cocostuff164k: {img_dir} not found; ROOT must hold images/{split}/")
        ann_dir = next(
            (d for d in (root / "annotations" / split, root / "stuffthingmaps_trainval2017" / split) if d.is_dir()),
            root / "annotations" / split,
        )
        samples = [Sample(p.stem, p, ann_dir / f"{p.stem}.png") for p in sorted(img_dir.glob("*.jpg"))]
        names, mapping = _classes_and_map(label_set)
        super().__init__(
            samples,
            class_names=names,
            palette=voc_palette(len(names)),
            label_lut=lut_from_mapping(mapping),
            transforms=transforms,
            skip_bad=skip_bad,
            max_pixels=max_pixels,
            source=f"cocostuff164k split {split!r} at {root}",
        )


class CocoStuff10k(SegmentationDataset):
    """COCO-Stuff 10k (``.mat`` labels, field ``S``; needs scipy).

    Args:
        root: the ``cocostuff-10k-v1.1`` folder.
        split: ``train`` (9k), ``test`` (1k) or ``all``.
        transforms: joint transform.
        skip_bad: skip and report bad samples instead of raising.
        max_pixels: image size cap.
        label_set: 171 (default) or 182.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        transforms: Callable[[Any, Any], Any] | None = None,
        skip_bad: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        label_set: int = 171,
    ):
        root = Path(root)
        list_file = root / "imageLists" / f"{split}.txt"
        ids = [row[0] for row in read_list_file(list_file, what="cocostuff10k")]
        samples = [Sample(i, root / "images" / f"{i}.jpg", root / "annotations" / f"{i}.mat") for i in ids]
        names, mapping = _classes_and_map(label_set)
        # .mat values are COCO ids (0 = unlabeled): shift to the 0-based PNG convention first.
        shifted = {raw + 1: cls for raw, cls in mapping.items()}
        shifted[0] = 255
        super().__init__(
            samples,
            class_names=names,
            palette=voc_palette(len(names)),
            label_lut=lut_from_mapping(shifted),
            transforms=transforms,
            skip_bad=skip_bad,
            max_pixels=max_pixels,
            source=f"cocostuff10k split {split!r} ({list_file})",
        )

    def _read_raw_mask(self, path: Path) -> np.ndarray:
        if path.suffix == ".mat":
            return read_mat_mask(path, "S")
        return read_mask(path, max_pixels=self.max_pixels)
