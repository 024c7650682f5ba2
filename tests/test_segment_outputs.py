"""`deeplab segment` / `deeplab crf` outputs never replace inputs or each other; bad options and
inputs (size caps, >256 classes, 16-bit or float PIL images) give clear errors, not wrong results."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _evaluation_helpers import tiny_weights
from _evaluation_helpers import run_cli as main


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return tiny_weights(tmp_path_factory.mktemp("w") / "tiny.safetensors")


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _photo(seed: int, size=(40, 56)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(size[0] // 8 + 1, size[1] // 8 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[: size[0], : size[1]])


# --------------------------------------------------------------------------- segment


def test_segment_refuses_to_overwrite_its_inputs(tmp_path, weights, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(_photo(0)).save(folder / "a.png")
    Image.fromarray(_photo(1)).save(folder / "b_overlay.jpg")  # b.jpg's overlay name
    Image.fromarray(_photo(2)).save(folder / "b.jpg")
    before = {p.name: _md5(p) for p in folder.iterdir()}
    for inputs in ([folder / "a.png"], [folder / "b.jpg", folder / "b_overlay.jpg"], [folder]):
        rc = main(["segment", *map(str, inputs), "--out", str(folder), "--weights", str(weights)])
        err = capsys.readouterr().err
        assert rc == 2, inputs
        assert "would overwrite input" in err and "choose another --out" in err
        assert "Traceback" not in err
        assert {p.name: _md5(p) for p in folder.iterdir()} == before  # nothing written or changed
    # An input's own folder is fine as --out when no output name is an input's.
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(_photo(3)).save(other / "c.jpg")
    assert main(["segment", str(other), "--out", str(other), "--weights", str(weights)]) == 0
    assert (other / "c.png").is_file() and (other / "c_overlay.jpg").is_file()


def test_unique_stems_avoid_real_stems():
    from deeplab.cli.segment import _unique_stems

    stems = _unique_stems([Path("a/x_1.png"), Path("b/x.jpg"), Path("b/x.png")])
    assert stems == ["x_1", "x", "x_2"]
    stems = _unique_stems([Path("a/x.png"), Path("b/x.png"), Path("c/x_1.png"), Path("d/x.png")])
    assert len(set(stems)) == 4 and stems[2] == "x_1"


def test_segment_keeps_one_output_per_input_when_stems_collide(tmp_path, weights, capsys):
    import deeplab

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    inputs = [tmp_path / "a" / "x_1.png", tmp_path / "b" / "x.jpg", tmp_path / "b" / "x.png"]
    for seed, path in enumerate(inputs):
        Image.fromarray(_photo(seed)).save(path, quality=95)
    out = tmp_path / "out"
    rc = main(["segment", str(inputs[0]), str(tmp_path / "b"), "--out", str(out), "--weights", str(weights)])
    assert rc == 0, capsys.readouterr().err
    written = sorted(p.name for p in out.glob("*.png"))
    assert len(written) == 3
    # a/x_1.png keeps its own name and its own result (b/x.png's used to land on it).
    expected, _ = deeplab.segment(inputs[0], weights=weights)
    with Image.open(out / "x_1.png") as im:
        assert np.array_equal(np.asarray(im), expected)
    other, _ = deeplab.segment(inputs[2], weights=weights)
    assert not np.array_equal(other, expected)  # the check above can tell the two apart


@pytest.mark.parametrize("bad", ["-5", "0", "x"])
def test_segment_max_pixels_must_be_positive(tmp_path, weights, capsys, bad):
    Image.fromarray(_photo(0)).save(tmp_path / "a.png")
    with pytest.raises(SystemExit) as e:
        main(["segment", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), "--max-pixels", bad])
    assert e.value.code == 2
    assert "--max-pixels" in capsys.readouterr().err


def test_predict_logits_refuses_a_non_positive_cap(weights):
    from deeplab.engine.inference import predict_logits
    from deeplab.engine.segment import load_bundle

    bundle = load_bundle(weights, precision="fp32")
    with pytest.raises(ValueError, match="max_pixels"):
        predict_logits(bundle.model, _photo(0), normalization=bundle.normalization, max_pixels=-5)


def test_segment_read_cap_has_a_cli_option(tmp_path, weights, capsys):
    Image.fromarray(_photo(0)).save(tmp_path / "a.png")  # 56x40 = 2240 pixels
    out = tmp_path / "o"
    rc = main(["segment", str(tmp_path / "a.png"), "--out", str(out), "--weights", str(weights),
               "--max-image-pixels", "1000"])
    err = capsys.readouterr().err
    assert rc == 1 and "2240" in err and "--max-image-pixels" in err
    assert not (out / "a.png").exists()
    rc = main(["segment", str(tmp_path / "a.png"), "--out", str(out), "--weights", str(weights),
               "--max-image-pixels", "3000"])
    assert rc == 0 and (out / "a.png").is_file()
    with pytest.raises(SystemExit) as e:
        main(["segment", str(tmp_path / "a.png"), "--out", str(out), "--max-image-pixels", "0"])
    assert e.value.code == 2


def test_segment_refuses_more_classes_than_a_png_holds(tmp_path, capsys):
    weights = tiny_weights(tmp_path / "c300.safetensors", num_classes=300)
    Image.fromarray(_photo(0)).save(tmp_path / "a.png")
    out = tmp_path / "o"
    rc = main(["segment", str(tmp_path / "a.png"), "--out", str(out), "--weights", str(weights)])
    err = capsys.readouterr().err
    assert rc == 2 and "300 classes" in err and "256" in err
    assert not (out / "a.png").exists()


# --------------------------------------------------------------------------- deeplab.segment(PIL image)


def test_pil_images_get_the_path_route_conversion(tmp_path, weights):
    import deeplab
    from deeplab.data.io import ImageReadError, read_image

    gray16 = (_photo(0)[..., 0].astype(np.uint16) * 257 + 100)
    Image.fromarray(gray16).save(tmp_path / "i16.png")
    from_path, _ = deeplab.segment(tmp_path / "i16.png", weights=weights)
    with Image.open(tmp_path / "i16.png") as im:
        assert im.mode == "I;16"
        from_pil, _ = deeplab.segment(im, weights=weights)  # used to be clipped to near white
    assert np.array_equal(from_pil, from_path)
    as_float = Image.fromarray(_photo(0)[..., 0].astype(np.float32) / 255)
    with pytest.raises(ImageReadError, match="mode F"):  # used to become an all-black image
        deeplab.segment(as_float, weights=weights)
    from deeplab.data.io import pil_to_rgb

    with Image.open(tmp_path / "i16.png") as im:
        assert np.array_equal(pil_to_rgb(im), read_image(tmp_path / "i16.png"))


# --------------------------------------------------------------------------- crf


def _crf_case(tmp_path: Path, classes: int = 5) -> tuple[Path, Path]:
    images, probs = tmp_path / "images", tmp_path / "probs"
    images.mkdir()
    probs.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(_photo(ord(name), (24, 32))).save(images / f"{name}.png")
        p = rng.random((classes, 24, 32)).astype(np.float32)
        np.save(probs / f"{name}.npy", p / p.sum(0))
    return images, probs


@pytest.mark.parametrize("overwrite", [False, True])
def test_crf_refuses_to_overwrite_its_inputs(tmp_path, capsys, overwrite):
    images, probs = _crf_case(tmp_path)
    before = {p.name: _md5(p) for p in images.iterdir()}
    rc = main(["crf", "--images", str(images), "--probs", str(probs), "--out", str(images),
               "--workers", "1", "--no-progress", *(["--overwrite"] if overwrite else [])])
    err = capsys.readouterr().err
    assert rc == 2
    assert "would overwrite input" in err and "choose another --out" in err
    assert {p.name: _md5(p) for p in images.iterdir()} == before


def test_crf_out_that_is_a_file(tmp_path, capsys):
    images, probs = _crf_case(tmp_path)
    blocker = tmp_path / "file.png"
    blocker.write_bytes(b"mine")
    rc = main(["crf", "--images", str(images), "--probs", str(probs), "--out", str(blocker),
               "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "not a folder" in err and str(blocker) in err
    assert blocker.read_bytes() == b"mine"


def test_crf_refuses_more_classes_than_a_png_holds(tmp_path, capsys):
    images, probs = _crf_case(tmp_path, classes=300)
    out = tmp_path / "out"
    rc = main(["crf", "--images", str(images), "--probs", str(probs), "--out", str(out),
               "--workers", "1", "--no-progress", "--iterations", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "300 classes" in err and "256" in err
    assert not list(out.glob("*.png"))  # no label map with wrapped class indices
