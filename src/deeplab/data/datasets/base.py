"""The common segmentation data set: file pairs, label mapping, validation, skip-and-report."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from deeplab.data.io import DEFAULT_MAX_PIXELS, ImageReadError, read_image, read_mask

__all__ = ["Sample", "BadSampleError", "SegmentationDataset", "read_list_file"]

IGNORE_INDEX = 255


@dataclass(frozen=True)
class Sample:
    """One image / label pair of a split."""

    id: str
    image: Path
    mask: Path


class BadSampleError(ValueError):
    """A sample that would be wrong if used (size mismatch, label out of range); names the file."""


def read_list_file(path: Path, *, what: str) -> list[list[str]]:
    """Read a split list: one sample per line, whitespace-separated fields, blank lines and ``#`` skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: split list {path} not found")
    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if line and not line.startswith("#"):
                    rows.append(line.split())
    except UnicodeDecodeError:
        raise ValueError(f"{what}: {path} is not UTF-8 text; save it as UTF-8") from None
    return rows


def _identity_lut(num_classes: int) -> np.ndarray:
    lut = np.full(256, -1, dtype=np.int16)
    lut[:num_classes] = np.arange(num_classes)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut


class SegmentationDataset(Dataset):
    """A list of (image, mask) files with class names, palette and a raw -> train-id mapping.

    ``ds[i]`` returns ``(image uint8 (H, W, 3) RGB, mask uint8 (H, W))`` with 255 = ignore, or,
    with ``transforms``, whatever ``transforms(image, mask)`` returns. Each sample is checked
    when loaded (vectorised, a few ms): files readable, image and mask the same size, every raw
    label value known to the mapping. A failure raises an error naming the file, or, with
    ``skip_bad=True``, emits a warning naming it and returns the next good sample instead
    (``bad_samples`` keeps what this process has seen; :meth:`verify` scans the whole split).

    Subclasses build the sample list and pass it to ``__init__``; they may override
    :meth:`_read_raw_mask` (e.g. for ``.mat`` files).

    Args:
        samples: the split's files.
        class_names: one name per class (train ids 0..C-1).
        palette: (C, 3) uint8 RGB colours.
        label_lut: (256,) int array mapping a raw mask value to its train id (0..C-1 or 255);
            -1 marks a value that must not occur. ``None``: identity on 0..C-1 and 255.
        transforms: joint transform ``(image, mask) -> anything``.
        skip_bad: skip (and report) bad samples instead of raising.
        max_pixels: image size cap (see :func:`deeplab.data.io.read_image`).
        source: description of where the split came from (for error messages).
    """

    ignore_index: int = IGNORE_INDEX

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        class_names: Sequence[str],
        palette: np.ndarray,
        label_lut: np.ndarray | None = None,
        transforms: Callable[[Any, Any], Any] | None = None,
        skip_bad: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        source: str = "",
    ):
        self.class_names = tuple(str(c) for c in class_names)
        self.num_classes = len(self.class_names)
        if not 0 < self.num_classes <= 255:
            raise ValueError(f"{source}: need 1..255 classes (255 is the ignore label), got {self.num_classes}")
        palette = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
        if len(palette) < self.num_classes:
            raise ValueError(f"{source}: palette has {len(palette)} colours for {self.num_classes} classes")
        self.palette = palette[: self.num_classes].copy()
        lut = _identity_lut(self.num_classes) if label_lut is None else np.asarray(label_lut, dtype=np.int16)
        if lut.shape != (256,):
            raise ValueError(f"label_lut must have 256 entries, got {lut.shape}")
        ok = (lut == -1) | (lut == IGNORE_INDEX) | ((lut >= 0) & (lut < self.num_classes))
        if not ok.all():
            raise ValueError(f"label_lut maps to values outside 0..{self.num_classes - 1}, 255 and -1")
        self._lut = lut
        self._lut_u8 = np.where(lut < 0, IGNORE_INDEX, lut).astype(np.uint8)
        self._lut_is_identity = bool((lut[lut >= 0] == np.flatnonzero(lut >= 0)).all())
        self.transforms = transforms
        self.skip_bad = bool(skip_bad)
        self.max_pixels = int(max_pixels)
        self.source = source or type(self).__name__
        self.bad_samples: dict[str, str] = {}
        self.samples = self._check_files(list(samples))

    # -- construction ------------------------------------------------------------------------

    def _check_files(self, samples: list[Sample]) -> list[Sample]:
        if not samples:
            raise ValueError(f"{self.source}: the split is empty (no samples listed or found); check the root and split name")
        missing = [
            (s, p) for s in samples for p in (s.image, s.mask) if not os.path.isfile(p)
        ]
        if not missing:
            return samples
        first = ", ".join(str(p) for _, p in missing[:5])
        msg = f"{self.source}: {len(missing)} listed file(s) missing, e.g. {first}"
        if not self.skip_bad:
            # No CLI flag here: eval should score the whole split, training can skip (data.options).
            raise FileNotFoundError(
                msg + " (fix the paths or the split list; to skip such samples, set data.options: "
                "{skip_bad: true} in a training config, or pass skip_bad=True in Python)"
            )
        bad_ids = {s.id for s, _ in missing}
        for s, p in missing:
            self.bad_samples[str(p)] = "file not found"
        kept = [s for s in samples if s.id not in bad_ids]
        warnings.warn(f"{msg}; skipping {len(bad_ids)} sample(s), {len(kept)} left", stacklevel=3)
        if not kept:
            raise ValueError(f"{self.source}: every sample of the split is missing a file")
        return kept

    # -- public attributes -------------------------------------------------------------------

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def image_path(self, index: int) -> Path:
        return self.samples[index].image

    def mask_path(self, index: int) -> Path:
        return self.samples[index].mask

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, {len(self)} samples, {self.num_classes} classes)"

    # -- loading -----------------------------------------------------------------------------

    def _read_raw_mask(self, path: Path) -> np.ndarray:
        return read_mask(path, max_pixels=self.max_pixels)

    def map_labels(self, raw: np.ndarray, *, path: Path | str = "<array>") -> np.ndarray:
        """Check raw mask values against the mapping and return train ids (uint8, 255 = ignore).

        Raises:
            BadSampleError: a raw value the data set does not define (the message names ``path``).
        """
        # bincount is O(pixels) and one C loop: cheaper than np.unique's sort.
        counts = np.bincount(raw.ravel(), minlength=256)
        bad = np.flatnonzero((counts > 0) & (self._lut < 0))
        if bad.size:
            raise BadSampleError(
                f"{path}: label values {bad.tolist()[:10]} are not classes of {type(self).__name__} "
                f"(valid raw values: {_ranges(np.flatnonzero(self._lut >= 0))}); fix the mask or the class list"
            )
        if self._lut_is_identity:
            return raw
        return self._lut_u8[raw]

    def load_mask(self, index: int) -> np.ndarray:
        """The mapped, checked mask of sample ``index`` (uint8 (H, W), 255 = ignore), no transforms."""
        path = self.samples[index].mask
        return self.map_labels(self._read_raw_mask(path), path=path)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image and mapped mask of sample ``index``, checked, before transforms."""
        s = self.samples[index]
        image = read_image(s.image, max_pixels=self.max_pixels)
        mask = self.load_mask(index)
        if image.shape[:2] != mask.shape:
            raise BadSampleError(
                f"{s.image}: image is {image.shape[0]}x{image.shape[1]} but its mask {s.mask} is "
                f"{mask.shape[0]}x{mask.shape[1]}; they must have the same size"
            )
        return image, mask

    def __getitem__(self, index: int) -> Any:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                image, mask = self.load(i)
                break
            except (ImageReadError, BadSampleError) as exc:
                if not self.skip_bad:
                    raise
                key = str(self.samples[i].image)
                if key not in self.bad_samples:
                    self.bad_samples[key] = str(exc)
                    warnings.warn(f"skipping bad sample: {exc}", stacklevel=2)
        else:
            raise ValueError(f"{self.source}: every sample is bad: {list(self.bad_samples.values())[:3]}")
        if self.transforms is not None:
            return self.transforms(image, mask)
        return image, mask

    def verify(self, *, remove: bool = False) -> dict[str, str]:
        """Load every sample once and report the bad ones.

        Args:
            remove: drop the bad samples from this data set (``ids`` shrinks).

        Returns:
            ``{image path: reason}`` for every bad sample (empty when all are fine).
        """
        bad: dict[str, str] = {}
        keep: list[Sample] = []
        for i, s in enumerate(self.samples):
            try:
                self.load(i)
                keep.append(s)
            except (ImageReadError, BadSampleError) as exc:
                bad[str(s.image)] = str(exc)
        self.bad_samples.update(bad)
        if remove and bad:
            if not keep:
                raise ValueError(f"{self.source}: every sample is bad, e.g. {next(iter(bad.values()))}")
            self.samples = keep
        return bad


def _ranges(values: Iterable[int]) -> str:
    vals = sorted(int(v) for v in values)
    parts, start, prev = [], None, None
    for v in vals:
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            parts.append(f"{start}..{prev}" if prev != start else f"{start}")
            start = prev = v
    if start is not None:
        parts.append(f"{start}..{prev}" if prev != start else f"{start}")
    return ", ".join(parts)


def lut_from_mapping(mapping: Mapping[int, int], *, default: int = -1) -> np.ndarray:
    """A (256,) int16 lookup table from ``{raw value: train id}``; an unmapped 255 maps to 255."""
    lut = np.full(256, default, dtype=np.int16)
    # Before the mapping, so that an explicit entry for 255 (0/255 binary masks) wins.
    lut[IGNORE_INDEX] = IGNORE_INDEX
    for raw, train in mapping.items():
        lut[int(raw)] = int(train)
    return lut
