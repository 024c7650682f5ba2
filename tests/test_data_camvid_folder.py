"""CamVid and plain-folder loaders, bad-data handling, the DataLoader and class balancing."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deeplab.data import BadSampleError, build_dataset, dataset_options, list_datasets
from deeplab.data.balance import (class_frequencies, enet_weights, median_frequency_weights,
                                  sqrt_median_frequency_weights)
from deeplab.data.io import ImageReadError, write_label_png
from deeplab.data.loader import build_dataloader
from deeplab.data.transforms import build_train_transforms


def _save_rgb(path: Path, h: int, w: int, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def _save_l(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint8), mode="L").save(path)


def _camvid_tree(root: Path, n: int = 3) -> dict[str, np.ndarray]:
    masks = {}
    for split in ("train", "val"):
        lines = []
        for k in range(n):
            name = f"0001TP_{split}{k:03d}.png"
            _save_rgb(root / split / name, 12, 16, seed=k)
            m = np.random.default_rng(k).integers(0, 12, (12, 16)).astype(np.uint8)
            m[0, :12] = np.arange(12)  # every raw label, including void 11
            _save_l(root / f"{split}annot" / name, m)
            masks[f"{split}/{name}"] = m
            lines.append(f"/SegNet/CamVid/{split}/{name} /SegNet/CamVid/{split}annot/{name}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return masks


def test_list_datasets_and_unknown_names(tmp_path: Path) -> None:
    names = list_datasets()
    assert {"camvid", "folder"} <= set(names)
    with pytest.raises(ValueError, match="valid names: .*camvid"):
        build_dataset("camvidd", tmp_path, "train")
    with pytest.raises(ValueError, match="no option.*colour.*valid options"):
        build_dataset("camvid", tmp_path, "train", colour=True)
    assert "skip_bad" in dataset_options("camvid")


def test_camvid_layout_and_void_mapping(tmp_path: Path) -> None:
    masks = _camvid_tree(tmp_path)
    ds = build_dataset("camvid", tmp_path, "train")
    assert len(ds) == 3 and ds.num_classes == 11 and ds.ignore_index == 255
    assert ds.palette.shape == (11, 3) and ds.palette[0].tolist() == [128, 128, 128]
    assert ds.class_names[3] == "road"
    image, mask = ds[1]
    assert image.shape == (12, 16, 3) and image.dtype == np.uint8 and mask.dtype == np.uint8
    raw = masks[f"train/{ds.ids[1]}.png"]
    expected = np.where(raw == 11, 255, raw)
    np.testing.assert_array_equal(mask, expected)
    assert mask[0, 11] == 255 and mask[0, 10] == 10
    assert ds.image_path(1) == tmp_path / "train" / f"{ds.ids[1]}.png"
    assert ds.mask_path(1) == tmp_path / "trainannot" / f"{ds.ids[1]}.png"
    assert len(build_dataset("camvid", tmp_path, "trainval")) == 6


def test_camvid_without_list_files(tmp_path: Path) -> None:
    _camvid_tree(tmp_path)
    (tmp_path / "val.txt").unlink()
    ds = build_dataset("camvid", tmp_path, "val")
    assert len(ds) == 3


def test_camvid_real(camvid_root: Path) -> None:
    train = build_dataset("camvid", camvid_root, "train")
    val = build_dataset("camvid", camvid_root, "val")
    assert len(train) == 367 and len(val) == 101
    for ds in (train, val):
        for i in (0, len(ds) // 2, len(ds) - 1):
            image, mask = ds[i]
            assert image.shape == (360, 480, 3) and mask.shape == (360, 480)
            assert set(np.unique(mask).tolist()) <= set(range(11)) | {255}


def test_camvid_real_class_balance(camvid_root: Path) -> None:
    ds = build_dataset("camvid", camvid_root, "val")
    freqs = class_frequencies(ds)
    # Independent count on a couple of raw masks through Pillow directly.
    raw = np.concatenate([np.asarray(Image.open(ds.mask_path(i))).ravel() for i in range(len(ds))])
    np.testing.assert_array_equal(freqs.pixel_counts, np.bincount(raw, minlength=12)[:11])
    assert freqs.ignored_pixels == int((raw == 11).sum())
    w = median_frequency_weights(freqs)
    share = freqs.share
    # Rare classes weigh more than common ones.
    assert w[np.argmin(share)] > 1.0 > w[np.argmax(share)]
    e = enet_weights(freqs)
    assert e[np.argmin(share)] > e[np.argmax(share)]


def test_median_frequency_weights_formula() -> None:
    from deeplab.data.balance import ClassFrequencies

    f = ClassFrequencies(np.array([10, 30, 0]), np.array([100, 100, 0]), np.array([1, 1, 0]), 0)
    # f = [0.1, 0.3, -]; median 0.2 -> [2, 2/3, 0]
    np.testing.assert_allclose(median_frequency_weights(f), [2.0, 2 / 3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(enet_weights(f), 1 / np.log(1.02 + np.array([0.25, 0.75, 0.0])), rtol=1e-6)
    np.testing.assert_allclose(sqrt_median_frequency_weights(f), [2**0.5, (2 / 3) ** 0.5, 0.0], rtol=1e-6)


def _folder_tree(root: Path) -> None:
    for k, stem in enumerate(["a", "b", "sub/c"]):
        ext = ".jpg" if stem == "a" else ".png"
        _save_rgb(root / "images" / f"{stem}{ext}", 10, 14, seed=k)
        m = np.full((10, 14), k, np.uint8)
        m[0, 0] = 255
        _save_l(root / "masks" / f"{stem}.png", m)
    (root / "classes.txt").write_text("background 0 0 0\nroad 128 64 128\ncar 0 0 142\n")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("a\nsub/c\n")


def test_folder_all_split_classes(tmp_path: Path) -> None:
    _folder_tree(tmp_path)
    ds = build_dataset("folder", tmp_path, None)
    assert ds.ids == ["a", "b", "sub/c"]
    assert ds.class_names == ("background", "road", "car")
    assert ds.palette[1].tolist() == [128, 64, 128]
    _, mask = ds[2]
    assert mask[5, 5] == 2 and mask[0, 0] == 255
    train = build_dataset("folder", tmp_path, "train")
    assert train.ids == ["a", "sub/c"]
    assert train.image_path(0).suffix == ".jpg"
    sub = build_dataset("folder", tmp_path, "sub")  # a sub-folder split
    assert sub.ids == ["sub/c"]
    with pytest.raises(FileNotFoundError, match="split 'test' not found"):
        build_dataset("folder", tmp_path, "test")


def test_folder_label_map_and_class_errors(tmp_path: Path) -> None:
    _folder_tree(tmp_path)
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(ValueError, match="classes.txt"):
        build_dataset("folder", tmp_path, None)
    ds = build_dataset("folder", tmp_path, None, classes=["x", "y"], label_map={0: 1, 1: 0, 2: 255})
    _, mask = ds[0]
    assert (mask[1:] == 1).all()
    _, mask = ds[2]
    assert (mask == 255).all()
    # Raw value 2 is not a class of a 2-class set without a mapping: error names the file.
    ds2 = build_dataset("folder", tmp_path, None, num_classes=2)
    with pytest.raises(BadSampleError, match=r"c.png.*\[2\]"):
        ds2[2]


def test_folder_label_map_can_map_raw_255(tmp_path: Path) -> None:
    # 0/255 binary masks with label_map={0: 0, 255: 1}, as the DataConfig docstring suggests:
    # the explicit entry must win over 255's default meaning (ignore).
    raw = np.zeros((4, 6), np.uint8)
    raw[:, 3:] = 255
    _save_rgb(tmp_path / "images" / "a.png", 4, 6)
    _save_l(tmp_path / "masks" / "a.png", raw)
    (tmp_path / "classes.txt").write_text("background\nforeground\n")
    ds = build_dataset("folder", tmp_path, None, label_map={0: 0, 255: 1})
    assert np.array_equal(ds[0][1], (raw == 255).astype(np.uint8))
    # Without an entry for it, 255 stays ignore.
    ds = build_dataset("folder", tmp_path, None, label_map={0: 1})
    assert np.array_equal(ds[0][1], np.where(raw == 255, 255, 1))


def test_bad_data_errors_name_the_file(tmp_path: Path) -> None:
    _folder_tree(tmp_path)
    # Size mismatch.
    _save_l(tmp_path / "masks" / "b.png", np.zeros((9, 14), np.uint8))
    ds = build_dataset("folder", tmp_path, None)
    with pytest.raises(BadSampleError, match=r"b.png.*10x14.*9x14"):
        ds[1]
    # Truncated image.
    data = (tmp_path / "images" / "a.jpg").read_bytes()
    (tmp_path / "images" / "a.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageReadError, match="a.jpg"):
        ds[0]
    # skip_bad: warns naming the file and returns the next good sample.
    ds_skip = build_dataset("folder", tmp_path, None, skip_bad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image, mask = ds_skip[0]
    messages = " ".join(str(w.message) for w in caught)
    assert "a.jpg" in messages and "b.png" in messages
    assert mask[5, 5] == 2  # sub/c (a and b are both bad)
    bad = ds_skip.verify(remove=True)
    assert set(Path(p).name for p in bad) == {"a.jpg", "b.png"}
    assert ds_skip.ids == ["sub/c"]
    # Missing file listed in a split.
    (tmp_path / "splits" / "train.txt").write_text("a\nzzz\n")
    with pytest.raises(FileNotFoundError, match="zzz"):
        build_dataset("folder", tmp_path, "train")
    with pytest.warns(UserWarning, match="zzz"):
        assert build_dataset("folder", tmp_path, "train", skip_bad=True).ids == ["a"]
    # Empty split.
    (tmp_path / "splits" / "train.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        build_dataset("folder", tmp_path, "train")


def test_out_of_range_label_camvid(tmp_path: Path) -> None:
    _camvid_tree(tmp_path, n=1)
    name = "0001TP_train000.png"
    _save_l(tmp_path / "trainannot" / name, np.full((12, 16), 12, np.uint8))
    ds = build_dataset("camvid", tmp_path, "train")
    with pytest.raises(BadSampleError, match=rf"{name}.*\[12\]"):
        ds[0]


def test_dataloader_stacks_and_is_reproducible(tmp_path: Path) -> None:
    _camvid_tree(tmp_path, n=4)
    ds = build_dataset("camvid", tmp_path, "train", transforms=build_train_transforms(crop_size=8))

    def epoch(num_workers: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = build_dataloader(ds, 2, shuffle=True, num_workers=num_workers, seed=seed, drop_last=True)
        return list(loader)

    a = epoch(2, 7)
    b = epoch(2, 7)
    assert len(a) == 2
    images, masks = a[0]
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.float32
    assert masks.shape == (2, 8, 8) and masks.dtype == torch.int64
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = epoch(2, 8)
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))


def test_dataloader_distributed_shards(tmp_path: Path) -> None:
    _camvid_tree(tmp_path, n=4)
    ds = build_dataset("camvid", tmp_path, "train", transforms=build_train_transforms(crop_size=8, scale_range=None, flip=False))
    seen = []
    for rank in range(2):
        loader = build_dataloader(ds, 1, shuffle=True, num_workers=0, distributed=True, num_replicas=2, rank=rank, seed=3)
        seen.append([int(i) for i in loader.sampler])
    assert sorted(seen[0] + seen[1]) == [0, 1, 2, 3]


def test_collate_rejects_unequal_shapes(tmp_path: Path) -> None:
    from deeplab.data.loader import collate_pairs

    with pytest.raises(ValueError, match="crop/pad"):
        collate_pairs([(np.zeros((2, 3, 3)), np.zeros((2, 3))), (np.zeros((3, 3, 3)), np.zeros((3, 3)))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, y = collate_pairs([(np.zeros((2, 3, 3), np.uint8), np.zeros((2, 3), np.uint8))] * 2)
    assert x.dtype == torch.uint8 and x.shape == (2, 2, 3, 3)


def test_write_label_png_readable_by_folder(tmp_path: Path) -> None:
    # A palette-PNG mask (VOC style) in a folder data set is read as indices.
    _save_rgb(tmp_path / "images" / "x.png", 4, 5)
    idx = np.array([[0, 1, 2, 1, 0]] * 4, np.uint8)
    write_label_png(tmp_path / "masks" / "x.png", idx, np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]]))
    ds = build_dataset("folder", tmp_path, None, num_classes=3)
    np.testing.assert_array_equal(ds[0][1], idx)
