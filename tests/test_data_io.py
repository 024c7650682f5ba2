"""deeplab.data.io: image modes, EXIF orientation, masks as indices, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deeplab.data.io import (
    ImageNotFoundError,
    ImageReadError,
    colour_mask_to_labels,
    read_image,
    read_mask,
    write_label_png,
)
from deeplab.data.palettes import voc_palette


def _rgb(h: int = 6, w: int = 9) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgb_png_round_trip(tmp_path: Path) -> None:
    arr = _rgb()
    Image.fromarray(arr).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (6, 9, 3)
    assert out.flags.writeable
    np.testing.assert_array_equal(out, arr)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    arr = np.zeros((4, 10, 3), np.uint8)
    arr[0, 0] = (255, 0, 0)  # red marker in the stored top-left corner
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "r.png", exif=exif)
    out = read_image(tmp_path / "r.png")
    assert out.shape == (10, 4, 3)
    # Stored top-left ends up top-right after a 90 degree clockwise rotation.
    np.testing.assert_array_equal(out[0, 3], (255, 0, 0))
    np.testing.assert_array_equal(np.rot90(arr, k=-1), out)


def test_grayscale_la_rgba_palette(tmp_path: Path) -> None:
    g = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
    Image.fromarray(g, mode="L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (4, 6, 3) and (out == g[:, :, None]).all()
    Image.fromarray(np.stack([g, np.full_like(g, 7)], -1), mode="LA").save(tmp_path / "la.png")
    assert (read_image(tmp_path / "la.png") == g[:, :, None]).all()
    rgba = np.concatenate([_rgb(4, 6), np.full((4, 6, 1), 128, np.uint8)], -1)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgba[:, :, :3])
    idx = (np.arange(24).reshape(4, 6) % 5).astype(np.uint8)
    write_label_png(tmp_path / "p.png", idx, voc_palette(5))
    # As an image, a palette PNG reads as its colours.
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), voc_palette(5)[idx])


def test_16bit_image_scaled(tmp_path: Path) -> None:
    g16 = np.array([[0, 257, 65535], [32896, 1000, 65280]], dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
    out = read_image(tmp_path / "g16.png")
    expected = np.round(g16 / 257).astype(np.uint8)
    np.testing.assert_array_equal(out[:, :, 0], expected)
    assert (out == out[:, :, :1]).all()


def test_truncated_and_garbage_files(tmp_path: Path) -> None:
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.jpg"):
        read_image(tmp_path / "cut.jpg")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="junk.png"):
        read_image(tmp_path / "junk.png")
    with pytest.raises(ImageNotFoundError, match="nope.png"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError):
        read_mask(tmp_path / "nope.png")


def test_too_many_pixels_checked_before_decoding(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((100, 120, 3), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(ImageReadError, match=r"big.png.*12000 pixels exceeds the cap of 11999"):
        read_image(tmp_path / "big.png", max_pixels=11_999)
    assert read_image(tmp_path / "big.png", max_pixels=12_000).shape == (100, 120, 3)
    with pytest.raises(ImageReadError, match="exceeds"):
        read_mask(tmp_path / "big.png", max_pixels=100)


def test_palette_mask_read_as_indices(tmp_path: Path) -> None:
    idx = np.array([[0, 1, 2, 255], [15, 20, 3, 0]], np.uint8)
    write_label_png(tmp_path / "m.png", idx, voc_palette(21))
    with Image.open(tmp_path / "m.png") as im:
        assert im.mode == "P"
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), idx)
    Image.fromarray(idx, mode="L").save(tmp_path / "l.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "l.png"), idx)


def test_16bit_mask(tmp_path: Path) -> None:
    ok = np.array([[0, 5], [255, 17]], np.uint16)
    Image.fromarray(ok).save(tmp_path / "ok.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "ok.png"), ok.astype(np.uint8))
    Image.fromarray(np.array([[0, 300]], np.uint16)).save(tmp_path / "bad.png")
    with pytest.raises(ImageReadError, match=r"bad.png.*\[0, 300\]"):
        read_mask(tmp_path / "bad.png")


def test_rgb_mask_rejected_with_fix(tmp_path: Path) -> None:
    Image.fromarray(_rgb()).save(tmp_path / "colour.png")
    with pytest.raises(ImageReadError, match="colour.png.*colour_mask_to_labels"):
        read_mask(tmp_path / "colour.png")


def test_colour_mask_to_labels() -> None:
    pal = voc_palette(21)
    idx = np.random.default_rng(1).integers(0, 21, (7, 8)).astype(np.uint8)
    np.testing.assert_array_equal(colour_mask_to_labels(pal[idx], pal), idx)
    rgb = pal[idx].copy()
    rgb[2, 3] = (1, 2, 3)
    with pytest.raises(ValueError, match=r"\(1, 2, 3\)"):
        colour_mask_to_labels(rgb, pal)
    assert colour_mask_to_labels(rgb, pal, unknown=255)[2, 3] == 255


def test_voc_palette_known_rows() -> None:
    pal = voc_palette(256)
    # Published VOC colours (VOCdevkit labelcolormap): background, aeroplane, person, tvmonitor.
    assert pal[0].tolist() == [0, 0, 0]
    assert pal[1].tolist() == [128, 0, 0]
    assert pal[15].tolist() == [192, 128, 128]
    assert pal[20].tolist() == [0, 64, 128]
    assert pal[255].tolist() == [224, 224, 192]


def test_write_label_png_atomic_and_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="0..255"):
        write_label_png(tmp_path / "x.png", np.array([[0, 256]]), None)
    write_label_png(tmp_path / "sub" / "x.png", np.zeros((2, 2), np.uint8), None)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.png"]  # no temp file left


def test_real_voc_val_masks(shared_data: Path) -> None:
    root = shared_data / "voc12_val_masks"
    ids = (root / "val.txt").read_text().split()[:20]
    for i in ids:
        m = read_mask(root / "SegmentationClassAug" / f"{i}.png")
        assert m.dtype == np.uint8 and m.ndim == 2
        vals = set(np.unique(m).tolist())
        assert vals <= set(range(21)) | {255}
        assert 255 in vals  # VOC's void boundary band survives (not converted through RGB)


def test_cmyk_jpeg_and_transparent_palette(tmp_path: Path) -> None:
    rgb = np.full((8, 8, 3), (200, 40, 10), np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    out = read_image(tmp_path / "c.jpg")
    assert out.shape == (8, 8, 3)
    # Independent reference: Pillow's own CMYK -> RGB conversion of the decoded file.
    with Image.open(tmp_path / "c.jpg") as im:
        assert im.mode == "CMYK"
        np.testing.assert_array_equal(out, np.asarray(im.convert("RGB")))
    p = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    p.info["transparency"] = 0
    p.save(tmp_path / "t.png", transparency=0)
    out = read_image(tmp_path / "t.png")
    assert out[0, 1].tolist() == [200, 100, 50] and out[0, 0].tolist() == [10, 20, 30]
