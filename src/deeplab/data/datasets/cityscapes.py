"""Cityscapes (fine annotations), label ids mapped to the 19 train ids.

Layout (ROOT as downloaded and unpacked)::

    ROOT/leftImg8bit/SPLIT/CITY/CITY_XXXXXX_YYYYYY_leftImg8bit.png
    ROOT/gtFine/SPLIT/CITY/CITY_XXXXXX_YYYYYY_gtFine_labelIds.png

SPLIT is ``train`` (2,975), ``val`` (500) or ``test`` (1,525; its labels are all "unlabeled").
``*_labelIds.png`` values 0..33 map to train ids 0..18 as in cityscapesScripts' ``labels.py``;
every other id (void classes, license plate) becomes 255.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from deeplab.data.datasets.base import Sample, SegmentationDataset, lut_from_mapping
from deeplab.data.io import DEFAULT_MAX_PIXELS
from deeplab.data.palettes import CITYSCAPES_PALETTE

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip

#: labelId -> trainId for the 19 evaluated classes (cityscapesScripts labels.py).
LABEL_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
_NUM_LABEL_IDS = 34  # 0..33 are defined; the rest (and license plate, -1) never appear in labelIds


class Cityscapes(SegmentationDataset):
    """Cityscapes fine, 19 classes.

    Args:
        root: the folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``train``, ``val``, ``test`` or ``trainval``.
        transforms: joint transform.
        skip_bad: skip and report bad samples instead of raising.
        max_pixels: image size cap.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        transforms: Callable[[Any, Any], Any] | None = None,
        skip_bad: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        root = Path(root)
        parts = ["train", "val"] if split == "trainval" else [split]
        samples = []
        for part in parts:
            img_dir = root / "leftImg8bit" / part
            if not img_dir.is_dir():
                raise FileNotFoundError(f"cityscapes: {img_dir} not found; ROOT must hold leftImg8bit/ and gtFine/")
            for p in sorted(img_dir.glob("*/*_leftImg8bit.png")):
                stem = p.name[: -len("_leftImg8bit.png")]
                mask = root / "gtFine" / part / p.parent.name / f"{stem}_gtFine_labelIds.png"
                samples.append(Sample(stem, p, mask))
        mapping = {i: LABEL_TO_TRAIN_ID.get(i, 255) for i in range(_NUM_LABEL_IDS)}
        super().__init__(
            samples,
            class_names=CITYSCAPES_CLASSES,
            palette=CITYSCAPES_PALETTE,
            label_lut=lut_from_mapping(mapping),
            transforms=transforms,
            skip_bad=skip_bad,
            max_pixels=max_pixels,
            source=f"cityscapes split {split!r} at {root}",
        )
