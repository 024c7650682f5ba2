"""PASCAL VOC 2012 and its SBD augmentation ("train_aug", 10,582 images).

``voc12`` layout (ROOT is ``VOC2012``; ``VOCdevkit`` containing ``VOC2012`` is accepted too)::

    ROOT/JPEGImages/ID.jpg
    ROOT/SegmentationClass/ID.png            palette PNGs; the *indices* 0..20, 255 are read
    ROOT/ImageSets/Segmentation/SPLIT.txt    train, val, trainval: one ID per line

``voc12_aug`` reads the same ``JPEGImages`` and masks from, in order:

1. ``ROOT/SegmentationClassAug/ID.png`` (the usual converted SBD + VOC label PNGs), or
2. with ``sbd_root`` (SBD's ``benchmark_RELEASE/dataset`` folder): ``ROOT/SegmentationClass/ID.png``
   where VOC has it, else ``SBD_ROOT/cls/ID.mat`` (``GTcls.Segmentation``, read with scipy).

Its split lists are looked up as ``ROOT/ImageSets/SegmentationAug/SPLIT.txt``, then
``ROOT/ImageSets/Segmentation/SPLIT.txt``, or ``split`` may be a path to a list file. Lines hold
an ID, or ``/JPEGImages/ID.jpg /SegmentationClassAug/ID.png`` pairs as in DeepLab's
``train_aug.txt`` (paths relative to ROOT).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from deeplab.data.datasets.base import Sample, SegmentationDataset, read_list_file
from deeplab.data.io import DEFAULT_MAX_PIXELS, read_mask, read_mat_mask
from deeplab.data.palettes import voc_palette

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


def _voc_root(root: Path) -> Path:
    if not (root / "JPEGImages").is_dir() and (root / "VOC2012" / "JPEGImages").is_dir():
        return root / "VOC2012"
    return root


def _list_path(root: Path, split: str, subdirs: tuple[str, ...]) -> Path:
    if split.endswith(".txt"):
        p = Path(split)
        return p if p.is_absolute() else root / p
    for sub in subdirs:
        p = root / "ImageSets" / sub / f"{split}.txt"
        if p.is_file():
            return p
    looked = ", ".join(str(root / "ImageSets" / s / f"{split}.txt") for s in subdirs)
    raise FileNotFoundError(f"VOC split {split!r}: no list file (looked for {looked}); is ROOT the VOC2012 folder?")


def _ids(list_file: Path) -> list[str]:
    ids = []
    for row in read_list_file(list_file, what="VOC"):
        # "ID" or "/JPEGImages/ID.jpg /SegmentationClassAug/ID.png"
        ids.append(Path(row[0]).stem)
    return ids


class VOC12(SegmentationDataset):
    """PASCAL VOC 2012 segmentation (21 classes, 255 = void boundary).

    Args:
        root: the ``VOC2012`` folder (or ``VOCdevkit``).
        split: ``train`` (1,464), ``val`` (1,449), ``trainval`` or a list file path.
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
        root = _voc_root(Path(root))
        list_file = _list_path(root, split, ("Segmentation",))
        samples = [
            Sample(i, root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png")
            for i in _ids(list_file)
        ]
        super().__init__(
            samples,
            class_names=VOC_CLASSES,
            palette=voc_palette(21),
            transforms=transforms,
            skip_bad=skip_bad,
            max_pixels=max_pixels,
            source=f"voc12 split {split!r} ({list_file})",
        )


class VOC12Aug(SegmentationDataset):
    """VOC 2012 with the SBD augmentation (``train_aug``: 10,582 images).

    Args:
        root: the ``VOC2012`` folder (or ``VOCdevkit``).
        split: ``train_aug``, ``val``, ... (see the module docstring) or a list file path.
        transforms: joint transform.
        skip_bad: skip and report bad samples instead of raising.
        max_pixels: image size cap.
        sbd_root: SBD's ``dataset`` folder (with ``cls/*.mat``), used when ``ROOT`` has no
            ``SegmentationClassAug``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train_aug",
        *,
        transforms: Callable[[Any, Any], Any] | None = None,
        skip_bad: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        sbd_root: str | Path | None = None,
    ):
        root = _voc_root(Path(root))
        list_file = _list_path(root, split, ("SegmentationAug", "Segmentation"))
        ids = _ids(list_file)
        aug = root / "SegmentationClassAug"
        samples = []
        if aug.is_dir():
            samples = [Sample(i, root / "JPEGImages" / f"{i}.jpg", aug / f"{i}.png") for i in ids]
        elif sbd_root is not None:
            sbd = Path(sbd_root)
            if not (sbd / "cls").is_dir():
                raise FileNotFoundError(f"voc12_aug: {sbd / 'cls'} not found; sbd_root must be SBD's benchmark_RELEASE/dataset folder")
            for i in ids:
                voc = root / "SegmentationClass" / f"{i}.png"
                samples.append(Sample(i, root / "JPEGImages" / f"{i}.jpg", voc if voc.is_file() else sbd / "cls" / f"{i}.mat"))
        else:
            raise FileNotFoundError(
                f"voc12_aug: {aug} not found; provide SegmentationClassAug PNGs or pass "
                "sbd_root=<benchmark_RELEASE/dataset> to read SBD's .mat files"
            )
        super().__init__(
            samples,
            class_names=VOC_CLASSES,
            palette=voc_palette(21),
            transforms=transforms,
            skip_bad=skip_bad,
            max_pixels=max_pixels,
            source=f"voc12_aug split {split!r} ({list_file})",
        )

    def _read_raw_mask(self, path: Path) -> np.ndarray:
        if path.suffix == ".mat":
            return read_mat_mask(path, "GTcls.Segmentation")
        return read_mask(path, max_pixels=self.max_pixels)
