"""Data sets, joint transforms and data loaders.

``build_dataset(name, root, split, ...)`` builds any supported data set by name from an explicit
table (``list_datasets()`` lists them). Without transforms ``ds[i]`` is ``(image uint8 (H, W, 3)
RGB, mask uint8 (H, W))``, 255 = ignore. See :mod:`deeplab.data.transforms` for augmentation and
:mod:`deeplab.data.loader` for the DataLoader.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deeplab.data.datasets.base import BadSampleError, Sample, SegmentationDataset
from deeplab.data.datasets.camvid import CamVid
from deeplab.data.datasets.cityscapes import Cityscapes
from deeplab.data.datasets.cocostuff import CocoStuff10k, CocoStuff164k
from deeplab.data.datasets.folder import SegmentationFolder
from deeplab.data.datasets.pascal_context import PascalContext
from deeplab.data.datasets.voc import VOC12, VOC12Aug
from deeplab.data.io import ImageReadError
from deeplab.data.loader import build_dataloader

__all__ = [
    "DATASETS",
    "BadSampleError",
    "ImageReadError",
    "Sample",
    "SegmentationDataset",
    "build_dataloader",
    "build_dataset",
    "dataset_options",
    "list_datasets",
]

# name -> class: an explicit table, not a registry filled by import side effects.
DATASETS: dict[str, type[SegmentationDataset]] = {
    "voc12": VOC12,
    "voc12_aug": VOC12Aug,
    "cityscapes": Cityscapes,
    "cocostuff10k": CocoStuff10k,
    "cocostuff164k": CocoStuff164k,
    "pascal_context": PascalContext,
    "camvid": CamVid,
    "folder": SegmentationFolder,
}


def list_datasets() -> list[str]:
    """Names that :func:`build_dataset` accepts."""
    return sorted(DATASETS)


def dataset_options(name: str) -> list[str]:
    """Keyword options (beyond root, split, transforms) that data set ``name`` accepts."""
    cls = _lookup(name)
    params = inspect.signature(cls.__init__).parameters
    return [p for p in params if p not in ("self", "root", "split", "transforms")]


def _lookup(name: str) -> type[SegmentationDataset]:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(list_datasets())}") from None


def build_dataset(
    name: str,
    root: str | Path,
    split: str | None,
    *,
    transforms: Callable[[Any, Any], Any] | None = None,
    **options: Any,
) -> SegmentationDataset:
    """Build a data set by name.

    Args:
        name: one of :func:`list_datasets` (``voc12``, ``voc12_aug``, ``cityscapes``,
            ``cocostuff10k``, ``cocostuff164k``, ``pascal_context``, ``camvid``, ``folder``).
        root: the data set's root folder (layouts in each module's docstring and docs/datasets.md).
        split: split name (``train``, ``val``...; ``folder`` also accepts ``None`` for all).
        transforms: joint ``(image, mask)`` transform applied in ``__getitem__``.
        options: the data set's own keyword options (``skip_bad``, ``max_pixels`` and the
            family's extras, see :func:`dataset_options`); an unknown option is an error.

    Returns:
        The data set, with ``class_names``, ``num_classes``, ``palette``, ``ignore_index`` (255)
        and ``ids``.
    """
    cls = _lookup(name)
    valid = dataset_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"data set {name!r} has no option(s) {unknown}; valid options: {', '.join(valid)}")
    return cls(root, split, transforms=transforms, **options)
