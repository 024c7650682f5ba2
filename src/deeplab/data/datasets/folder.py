"""A plain folder of images and masks: the way to bring your own data.

Layout (directory names configurable)::

    ROOT/images/**/NAME.jpg|jpeg|png|bmp|tif|tiff|webp
    ROOT/masks/**/NAME.png        same relative path, one class index per pixel (255 = ignore)
    ROOT/classes.txt              optional: one class per line, "name" or "name R G B"
    ROOT/splits/SPLIT.txt         optional split lists (or ROOT/SPLIT.txt): one id per line,
                                  the image path relative to images/ without extension

A split is found as: ``split=None`` (or ``"all"``): every image; a list file
``ROOT/splits/SPLIT.txt`` or ``ROOT/SPLIT.txt`` (or ``split`` given as a path to a ``.txt``);
else the sub-folders ``images/SPLIT/`` and ``masks/SPLIT/``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deeplab.data.datasets.base import Sample, SegmentationDataset, lut_from_mapping, read_list_file
from deeplab.data.io import DEFAULT_MAX_PIXELS
from deeplab.data.palettes import voc_palette

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def read_class_file(path: Path) -> tuple[list[str], np.ndarray | None]:
    """Read ``name`` or ``name R G B`` lines; returns names and the palette if every line has one."""
    names: list[str] = []
    colours: list[list[int]] = []
    for n, row in enumerate(read_list_file(path, what="class-name file"), 1):
        if len(row) == 1:
            names.append(row[0])
        elif len(row) == 4:
            try:
                rgb = [int(v) for v in row[1:]]
            except ValueError:
                raise ValueError(f"{path}:{n}: expected 'name R G B' with integer colours, got {' '.join(row)!r}") from None
            if not all(0 <= v <= 255 for v in rgb):
                raise ValueError(f"{path}:{n}: colour {rgb} outside 0..255")
            names.append(row[0])
            colours.append(rgb)
        else:
            raise ValueError(f"{path}:{n}: expected 'name' or 'name R G B' (no spaces in names), got {' '.join(row)!r}")
    if colours and len(colours) != len(names):
        raise ValueError(f"{path}: give a colour on every line or on none")
    return names, (np.asarray(colours, dtype=np.uint8) if colours else None)


class SegmentationFolder(SegmentationDataset):
    """Images and masks in two folders, paired by relative path.

    Args:
        root: the data folder.
        split: ``None``/``"all"``, a split name (list file or sub-folder), or a path to a list file.
        transforms: joint transform.
        skip_bad: skip and report bad samples instead of raising.
        max_pixels: image size cap.
        image_dir: images folder under ``root``.
        mask_dir: masks folder under ``root``.
        mask_suffix: mask file suffix replacing the image extension (``".png"``; e.g. ``"_mask.png"``).
        classes: class names, or a class-name file (relative to ``root``); default ``root/classes.txt``.
        num_classes: when no class names are given: classes are named ``class_0``...
        palette: (C, 3) colours; default from the class file, else the VOC colour map.
        label_map: ``{raw mask value: train id or 255}`` for masks not stored as 0..C-1 (every raw
            value that occurs must be listed; 255 is ignore unless listed, e.g. ``{0: 0, 255: 1}``
            for 0/255 masks); default identity.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        *,
        transforms: Callable[[Any, Any], Any] | None = None,
        skip_bad: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        image_dir: str = "images",
        mask_dir: str = "masks",
        mask_suffix: str = ".png",
        classes: str | Sequence[str] | None = None,
        num_classes: int | None = None,
        palette: Sequence[Sequence[int]] | np.ndarray | None = None,
        label_map: Mapping[int, int] | None = None,
    ):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"folder data set: root {root} is not a directory")
        names, file_palette = self._class_names(root, classes, num_classes)
        if palette is None:
            palette = file_palette if file_palette is not None else voc_palette(len(names))
        palette = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
        if len(palette) != len(names):
            raise ValueError(f"folder data set: palette has {len(palette)} colours for {len(names)} classes")
        lut = None
        if label_map is not None:
            bad = {k: v for k, v in label_map.items() if not (0 <= int(k) <= 255 and (0 <= int(v) < len(names) or int(v) == 255))}
            if bad:
                raise ValueError(f"folder data set: label_map entries {bad} must map 0..255 to 0..{len(names) - 1} or 255")
            lut = lut_from_mapping(label_map)
        samples = self._samples(root, split, root / image_dir, root / mask_dir, mask_suffix)
        super().__init__(
            samples,
            class_names=names,
            palette=palette,
            label_lut=lut,
            transforms=transforms,
            skip_bad=skip_bad,
            max_pixels=max_pixels,
            source=f"folder data set {root} split {split!r}",
        )

    @staticmethod
    def _class_names(
        root: Path, classes: str | Sequence[str] | None, num_classes: int | None
    ) -> tuple[list[str], np.ndarray | None]:
        if classes is not None and not isinstance(classes, str):
            names, pal = [str(c) for c in classes], None
        else:
            path = root / (classes or "classes.txt")
            if path.is_file():
                names, pal = read_class_file(path)
            elif classes is not None:
                raise FileNotFoundError(f"folder data set: class-name file {path} not found")
            elif num_classes is not None:
                names, pal = [f"class_{i}" for i in range(int(num_classes))], None
            else:
                raise ValueError(
                    f"folder data set: no class names: write {root / 'classes.txt'} (one name per line) "
                    "or pass classes=[...] or num_classes=N"
                )
        if num_classes is not None and int(num_classes) != len(names):
            raise ValueError(f"folder data set: num_classes={num_classes} but {len(names)} class names given")
        if len(set(names)) != len(names):
            raise ValueError(f"folder data set: duplicate class names in {names}")
        return names, pal

    @staticmethod
    def _samples(root: Path, split: str | None, image_dir: Path, mask_dir: Path, mask_suffix: str) -> list[Sample]:
        if not image_dir.is_dir():
            raise FileNotFoundError(f"folder data set: image folder {image_dir} not found")

        def scan(sub: Path) -> dict[str, Path]:
            found = {}
            for p in sorted(sub.rglob("*")):
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
                    found[p.relative_to(image_dir).with_suffix("").as_posix()] = p
            return found

        def pair(ids: dict[str, Path]) -> list[Sample]:
            return [Sample(i, p, mask_dir / (i + mask_suffix)) for i, p in ids.items()]

        if split is None or split == "all":
            return pair(scan(image_dir))
        candidates = [root / "splits" / f"{split}.txt", root / f"{split}.txt"]
        if split.endswith(".txt"):
            candidates.insert(0, root / split)
        list_file = next((c for c in candidates if c.is_file()), None)
        if list_file is not None:
            images = scan(image_dir)
            samples = []
            for n, row in enumerate(read_list_file(list_file, what="folder data set"), 1):
                key = Path(row[0]).with_suffix("").as_posix() if Path(row[0]).suffix.lower() in IMAGE_EXTENSIONS else row[0]
                # A listed id without an image file becomes a "missing file" error naming it.
                image = images.get(key, image_dir / f"{key}.jpg")
                samples.append(Sample(key, image, mask_dir / (key + mask_suffix)))
            return samples
        if (image_dir / split).is_dir():
            return pair(scan(image_dir / split))
        looked = ", ".join(str(c) for c in candidates) + f", {image_dir / split}/"
        raise FileNotFoundError(f"folder data set: split {split!r} not found (looked for {looked})")
