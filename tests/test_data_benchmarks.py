"""Loaders for VOC, SBD, Cityscapes, COCO-stuff and PASCAL-Context on small trees in their real layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deeplab.data import BadSampleError, build_dataset
from deeplab.data.io import colour_mask_to_labels, read_mask, write_label_png
from deeplab.data.palettes import voc_palette

scipy_io = pytest.importorskip("scipy.io")


def _jpeg(path: Path, h: int, w: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=95)


def _png_l(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint8), mode="L").save(path)


def _labels_row(values: list[int], h: int = 6, w: int = 8) -> np.ndarray:
    m = np.zeros((h, w), np.int64)
    m[0, : len(values)] = values
    return m


# ---------------------------------------------------------------------------------- VOC / SBD


def _voc_tree(root: Path) -> dict[str, np.ndarray]:
    masks = {}
    for k, i in enumerate(["2007_000032", "2007_000033", "2008_000001"]):
        _jpeg(root / "JPEGImages" / f"{i}.jpg", 6, 8, seed=k)
        m = _labels_row([0, 1, 15, 20, 255, k])
        write_label_png(root / "SegmentationClass" / f"{i}.png", m, voc_palette(256))
        masks[i] = m
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n2007_000033\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2008_000001\n")
    return masks


def test_voc12_palette_pngs_read_as_indices(tmp_path: Path) -> None:
    root = tmp_path / "VOCdevkit" / "VOC2012"
    masks = _voc_tree(root)
    ds = build_dataset("voc12", tmp_path / "VOCdevkit", "train")  # VOCdevkit accepted too
    assert ds.ids == ["2007_000032", "2007_000033"] and ds.num_classes == 21
    assert ds.class_names[15] == "person" and ds.palette[15].tolist() == [192, 128, 128]
    with Image.open(ds.mask_path(1)) as im:
        assert im.mode == "P"
    image, mask = ds[1]
    assert image.shape == (6, 8, 3)
    np.testing.assert_array_equal(mask, masks["2007_000033"])
    assert len(build_dataset("voc12", root, "val")) == 1
    with pytest.raises(FileNotFoundError, match="trainval"):
        build_dataset("voc12", root, "trainval")


def test_voc12_aug_pngs_and_deeplab_list_format(tmp_path: Path) -> None:
    root = tmp_path / "VOC2012"
    _voc_tree(root)
    aug = root / "SegmentationClassAug"
    _png_l(aug / "2007_000032.png", _labels_row([3, 4]))
    _png_l(aug / "2008_000001.png", _labels_row([7, 255]))
    (root / "ImageSets" / "SegmentationAug").mkdir(parents=True)
    (root / "ImageSets" / "SegmentationAug" / "train_aug.txt").write_text(
        "/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n"
        "/JPEGImages/2008_000001.jpg /SegmentationClassAug/2008_000001.png\n"
    )
    ds = build_dataset("voc12_aug", root, "train_aug")
    assert ds.ids == ["2007_000032", "2008_000001"]
    assert ds[1][1][0, :2].tolist() == [7, 255]


def _savemat_sbd(path: Path, seg: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # SBD's struct layout: GTcls.{Segmentation, Boundaries, CategoriesPresent}.
    boundaries = np.empty((20, 1), dtype=object)
    for k in range(20):
        boundaries[k, 0] = np.zeros(seg.shape, dtype=bool)
    gt = {
        "Segmentation": seg.astype(np.uint8),
        "Boundaries": boundaries,
        "CategoriesPresent": np.unique(seg[seg > 0]).astype(np.uint8),
    }
    scipy_io.savemat(str(path), {"GTcls": gt})


def test_voc12_aug_from_sbd_mat(tmp_path: Path) -> None:
    root = tmp_path / "VOC2012"
    masks = _voc_tree(root)
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    _jpeg(root / "JPEGImages" / "2009_000009.jpg", 6, 8)
    sbd_mask = _labels_row([5, 6, 19])
    _savemat_sbd(sbd / "cls" / "2009_000009.mat", sbd_mask)
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("2007_000032\n2009_000009\n")
    with pytest.raises(FileNotFoundError, match="sbd_root"):
        build_dataset("voc12_aug", root, "train_aug")
    ds = build_dataset("voc12_aug", root, "train_aug", sbd_root=sbd)
    assert ds.mask_path(0).suffix == ".png" and ds.mask_path(1).suffix == ".mat"
    np.testing.assert_array_equal(ds[0][1], masks["2007_000032"])
    np.testing.assert_array_equal(ds[1][1], sbd_mask)
    # A .mat mask of the wrong size names the file.
    _savemat_sbd(sbd / "cls" / "2009_000009.mat", np.zeros((5, 8)))
    with pytest.raises(BadSampleError, match="2009_000009"):
        ds[1]


def test_voc_real_val_masks_are_indices(shared_data: Path) -> None:
    root = shared_data / "voc12_val_masks"
    ids = (root / "val.txt").read_text().split()
    assert len(ids) == 1449
    pal = voc_palette(256)
    for i in ids[::290]:
        path = root / "SegmentationClassAug" / f"{i}.png"
        idx = read_mask(path)
        # Independent route: decode the colours, map them back through the VOC colour map.
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
        np.testing.assert_array_equal(idx, colour_mask_to_labels(rgb, pal))
        assert set(np.unique(idx).tolist()) <= set(range(21)) | {255}


def test_voc_toy_real_images(shared_data: Path) -> None:
    root = shared_data / "voc12_toy"
    ds = build_dataset("voc12_aug", root, str(root / "ids.txt"))
    assert len(ds) == 11
    for i in range(len(ds)):
        image, mask = ds[i]
        assert image.shape[:2] == mask.shape and image.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= set(range(21)) | {255}


# ---------------------------------------------------------------------------------- Cityscapes


def test_cityscapes_label_ids_to_train_ids(tmp_path: Path) -> None:
    for split, city in (("train", "aachen"), ("val", "frankfurt")):
        stem = f"{city}_000000_000019"
        _png_rgb = tmp_path / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
        _png_rgb.parent.mkdir(parents=True)
        Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(_png_rgb)
        # labelIds: unlabeled 0, road 7, sidewalk 8, parking 9, building 11, car 26, bicycle 33, guard rail 14
        _png_l(tmp_path / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", _labels_row([0, 7, 8, 9, 11, 26, 33, 14]))
        _png_l(tmp_path / "gtFine" / split / city / f"{stem}_gtFine_color.png", np.zeros((6, 8)))  # decoy
    ds = build_dataset("cityscapes", tmp_path, "val")
    assert ds.ids == ["frankfurt_000000_000019"] and ds.num_classes == 19
    assert ds.palette[0].tolist() == [128, 64, 128] and ds.class_names[13] == "car"
    assert ds[0][1][0].tolist() == [255, 0, 1, 255, 2, 13, 18, 255]
    assert len(build_dataset("cityscapes", tmp_path, "trainval")) == 2
    _png_l(tmp_path / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000019_gtFine_labelIds.png", _labels_row([40]))
    with pytest.raises(BadSampleError, match=r"frankfurt_000000_000019_gtFine_labelIds.png.*\[40\]"):
        ds[0]


# ---------------------------------------------------------------------------------- COCO-stuff


def test_cocostuff164k_182_to_171(tmp_path: Path) -> None:
    for split in ("train2017", "val2017"):
        _jpeg(tmp_path / "images" / split / "000000000139.jpg", 6, 8)
        # 0 person, 11 (COCO id 12, unused street sign), 12 stop sign, 91 (id 92 banner), 181 wood, 255 unlabeled
        _png_l(tmp_path / "annotations" / split / "000000000139.png", _labels_row([0, 11, 12, 91, 181, 255]))
    ds = build_dataset("cocostuff164k", tmp_path, "val2017")
    assert ds.num_classes == 171 and len(ds.palette) == 171
    assert ds.class_names[0] == "person" and ds.class_names[11] == "stop sign"
    assert ds.class_names[80] == "banner" and ds.class_names[170] == "wood"
    assert ds[0][1][0, :6].tolist() == [0, 255, 11, 80, 170, 255]
    ds182 = build_dataset("cocostuff164k", tmp_path, "val", label_set=182)
    assert ds182.num_classes == 182 and ds182.class_names[11] == "street sign"
    assert ds182[0][1][0, :6].tolist() == [0, 11, 12, 91, 181, 255]
    _png_l(tmp_path / "annotations" / "val2017" / "000000000139.png", _labels_row([182]))
    with pytest.raises(BadSampleError, match=r"000000000139.png.*\[182\]"):
        ds[0]


def test_cocostuff164k_official_stuffthingmaps_dir(tmp_path: Path) -> None:
    _jpeg(tmp_path / "images" / "val2017" / "1.jpg", 4, 4)
    _png_l(tmp_path / "stuffthingmaps_trainval2017" / "val2017" / "1.png", np.full((4, 4), 181))
    assert (build_dataset("cocostuff164k", tmp_path, "val2017")[0][1] == 170).all()


def test_cocostuff10k_mat(tmp_path: Path) -> None:
    ids = ["COCO_train2014_000000000077", "COCO_train2014_000000000078"]
    for k, i in enumerate(ids):
        _jpeg(tmp_path / "images" / f"{i}.jpg", 6, 8, seed=k)
        # .mat S holds COCO ids: 0 unlabeled, 1 person, 12 unused, 13 stop sign, 92 banner, 182 wood
        s = _labels_row([0, 1, 12, 13, 92, 182]).astype(np.uint16)
        (tmp_path / "annotations").mkdir(exist_ok=True)
        scipy_io.savemat(str(tmp_path / "annotations" / f"{i}.mat"), {"S": s, "names": np.array(["person"], dtype=object)})
    (tmp_path / "imageLists").mkdir()
    (tmp_path / "imageLists" / "train.txt").write_text("\n".join(ids) + "\n")
    ds = build_dataset("cocostuff10k", tmp_path, "train")
    assert len(ds) == 2 and ds.num_classes == 171
    assert ds[1][1][0, :6].tolist() == [255, 0, 255, 11, 80, 170]
    ds182 = build_dataset("cocostuff10k", tmp_path, "train", label_set=182)
    assert ds182[0][1][0, :6].tolist() == [255, 0, 11, 12, 91, 181]
    scipy_io.savemat(str(tmp_path / "annotations" / f"{ids[0]}.mat"), {"T": np.zeros((6, 8))})
    with pytest.raises(ValueError, match=rf"{ids[0]}.mat.*'S'"):
        ds[0]


# ---------------------------------------------------------------------------------- PASCAL-Context


def test_pascal_context_59(tmp_path: Path) -> None:
    root = tmp_path / "VOCdevkit" / "VOC2010"
    _jpeg(root / "JPEGImages" / "2008_000002.jpg", 6, 8)
    _png_l(root / "SegmentationClassContext" / "2008_000002.png", _labels_row([0, 1, 37, 59]))
    (root / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (root / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000002\n")
    ds = build_dataset("pascal_context", tmp_path / "VOCdevkit", "val")
    assert ds.num_classes == 60 and ds.class_names[0] == "background" and ds.class_names[37] == "person"
    assert ds[0][1][0, :4].tolist() == [0, 1, 37, 59]
    ds59 = build_dataset("pascal_context", root, "val", background=False)
    assert ds59.num_classes == 59 and ds59.class_names[36] == "person"
    assert ds59[0][1][0, :4].tolist() == [255, 0, 36, 58]
    _png_l(root / "SegmentationClassContext" / "2008_000002.png", _labels_row([60]))
    with pytest.raises(BadSampleError, match=r"2008_000002.png.*\[60\]"):
        ds[0]
