"""PASCAL-Context, the 59 most frequent classes (+ background, the DeepLab paper's protocol).

Expected layout: the label PNGs that common tooling (mmsegmentation's
``tools/dataset_converters/pascal_context.py``, built on the Detail API) writes from
``trainval_merged.json``::

    ROOT/JPEGImages/ID.jpg                             ROOT = VOCdevkit/VOC2010
    ROOT/SegmentationClassContext/ID.png               0 = background, 1..59 = the 59 classes
    ROOT/ImageSets/SegmentationContext/SPLIT.txt       train (4,998), val (5,105)

``background=True`` (default) keeps 60 classes, 0 = background, as DeepLab evaluates
("59 classes + background"); ``background=False`` gives the 59-class variant with background
ignored (255) and the classes shifted to 0..58.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from deeplab.data.datasets.base import Sample, SegmentationDataset, lut_from_mapping, read_list_file
from deeplab.data.io import DEFAULT_MAX_PIXELS
from deeplab.data.palettes import voc_palette

PASCAL_CONTEXT_59 = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
    "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse",
    "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform",
    "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa",
    "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood",
)  # fmt: skip


class PascalContext(SegmentationDataset):
    """PASCAL-Context 59 (+ background).

    Args:
        root: ``VOCdevkit/VOC2010`` with ``SegmentationClassContext/`` (see the module docstring).
        split: ``train``, ``val`` or a list-file path.
        transforms: joint transform.
        skip_bad: skip and report bad samples instead of raising.
        max_pixels: image size cap.
        background: 60 classes with background 0 (default) or 59 with background ignored.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        transforms: Callable[[Any, Any], Any] | None = None,
        skip_bad: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        background: bool = True,
    ):
        root = Path(root)
        if not (root / "JPEGImages").is_dir() and (root / "VOC2010" / "JPEGImages").is_dir():
            root = root / "VOC2010"
        if split.endswith(".txt"):
            list_file = root / split  # an absolute path stays absolute
        else:
            list_file = root / "ImageSets" / "SegmentationContext" / f"{split}.txt"
        ids = [Path(row[0]).stem for row in read_list_file(list_file, what="pascal_context")]
        samples = [
            Sample(i, root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClassContext" / f"{i}.png") for i in ids
        ]
        if background:
            names = ("background",) + PASCAL_CONTEXT_59
            mapping = {i: i for i in range(60)}
        else:
            names = PASCAL_CONTEXT_59
            mapping = {0: 255} | {i: i - 1 for i in range(1, 60)}
        super().__init__(
            samples,
            class_names=names,
            palette=voc_palette(len(names)),
            label_lut=lut_from_mapping(mapping),
            transforms=transforms,
            skip_bad=skip_bad,
            max_pixels=max_pixels,
            source=f"pascal_context split {split!r} ({list_file})",
        )
