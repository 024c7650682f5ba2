"""`deeplab segment` and `deeplab.segment`: outputs, agreement with eval, what users feed it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _evaluation_helpers import CAFFE, PALETTE, random_dataset, tiny_weights
from _evaluation_helpers import run_cli as main


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return tiny_weights(tmp_path_factory.mktemp("w") / "tiny.safetensors")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two small RGB PNGs and the arrays they hold."""
    d = tmp_path_factory.mktemp("img")
    ds = random_dataset(n=2)
    paths = []
    for sid, im in zip(ds.ids, ds.images):
        Image.fromarray(im).save(d / f"{sid}.png")
        paths.append(d / f"{sid}.png")
    return d, paths, ds


def _labels(png: Path) -> np.ndarray:
    with Image.open(png) as im:
        assert im.mode == "P"
        pal = np.asarray(im.getpalette()[: 3 * len(PALETTE)], dtype=np.uint8).reshape(-1, 3)
        assert np.array_equal(pal, PALETTE)  # the model's class colours
        return np.asarray(im)


def test_segment_writes_palette_pngs_that_match_eval(tmp_path, weights, images, capsys):
    from deeplab.engine.evaluate import evaluate
    from deeplab.weights import build_from_weights

    folder, paths, ds = images
    out = tmp_path / "out"
    rc = main(["segment", str(folder), "--out", str(out), "--weights", str(weights), "--save-probs"])
    assert rc == 0
    assert "images/s" in capsys.readouterr().out
    model, _ = build_from_weights(weights)
    r = evaluate(model, ds, normalization=CAFFE, keep_examples=len(ds))
    preds = {e["id"]: e["pred"] for e in r["examples"]["best"]}
    assert len(preds) == len(ds)
    for sid, image in zip(ds.ids, ds.images):
        labels = _labels(out / f"{sid}.png")
        assert labels.shape == image.shape[:2]
        assert np.array_equal(labels, preds[sid])
        assert len(np.unique(labels)) > 1  # not a constant map: the comparison means something
        with Image.open(out / f"{sid}_overlay.jpg") as ov:
            assert ov.format == "JPEG" and ov.size == (image.shape[1], image.shape[0])
        probs = np.load(out / f"{sid}.npy")
        assert probs.dtype == np.float16 and probs.shape == (4, *image.shape[:2])


def test_python_api_matches_the_cli(tmp_path, weights, images):
    import deeplab

    folder, paths, ds = images
    out = tmp_path / "o"
    assert main(["segment", str(paths[0]), "--out", str(out), "--weights", str(weights)]) == 0
    labels, probs = deeplab.segment(paths[0], weights=weights)
    assert labels.dtype == np.uint8 and probs.shape == (4, *labels.shape)
    assert np.allclose(probs.sum(0), 1, atol=1e-5)
    assert np.array_equal(labels, _labels(out / f"{ds.ids[0]}.png"))
    labels2, _ = deeplab.segment(ds.images[0], weights=weights)  # array input, cached model
    assert np.array_equal(labels, labels2)
    crf_labels, crf_probs = deeplab.segment(ds.images[0], weights=weights,
                                            crf={"bi_xy_std": 10, "iterations": 3})
    assert crf_labels.shape == labels.shape and np.allclose(crf_probs.sum(0), 1, atol=1e-3)


def test_cached_model_is_reloaded_when_the_file_is_replaced_with_the_same_mtime(tmp_path, images):
    # cp -p / rsync -t / unzip restore the old mtime: the cache must still see the new weights.
    import deeplab

    image = images[2].images[0]
    a, b = tiny_weights(tmp_path / "a.safetensors", seed=0), tiny_weights(tmp_path / "b.safetensors", seed=1)
    _, probs_a = deeplab.segment(image, weights=a, precision="fp32")
    _, probs_b = deeplab.segment(image, weights=b, precision="fp32")
    assert not np.allclose(probs_a, probs_b)
    path = tmp_path / "w.safetensors"
    for replace in ("in place", "atomic"):  # cp -p rewrites the inode; rsync -t renames a copy
        path.write_bytes(a.read_bytes())
        stamp = os.stat(path)
        assert np.array_equal(deeplab.segment(image, weights=path, precision="fp32")[1], probs_a)
        if replace == "in place":
            path.write_bytes(b.read_bytes())
        else:
            (tmp_path / "tmp").write_bytes(b.read_bytes())
            os.replace(tmp_path / "tmp", path)
        os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        assert os.stat(path).st_mtime_ns == stamp.st_mtime_ns
        assert np.array_equal(deeplab.segment(image, weights=path, precision="fp32")[1], probs_b), replace


def test_awkward_inputs_are_handled(tmp_path, weights, capsys):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(24, 40, 3), dtype=np.uint8)
    # EXIF orientation 6 (rotate 90 degrees clockwise on display): output is 40 high, 24 wide
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(src / "exif.jpg", exif=exif)
    Image.fromarray(rgb[..., 0]).save(src / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((24, 40), 128, np.uint8)])).save(src / "rgba.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(src / "deep.png")  # I;16
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    rc = main(["segment", str(src), str(tmp_path / "missing.jpg"), "--out", str(out),
               "--weights", str(weights)])
    err = capsys.readouterr().err
    assert rc == 1  # some inputs failed: non-zero at the end
    assert "broken.png" in err and "missing.jpg" in err
    assert "2 input(s) could not be read" in err
    for stem, size in (("exif", (24, 40)), ("gray", (40, 24)), ("rgba", (40, 24)), ("deep", (40, 24))):
        with Image.open(out / f"{stem}.png") as im:
            assert im.size == size, stem
        assert (out / f"{stem}_overlay.jpg").is_file()
    assert not (out / "broken.png").exists()


def test_large_image_is_downscaled_with_a_notice(tmp_path, weights, capsys):
    img = np.random.default_rng(1).integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "big.png")
    rc = main(["segment", str(tmp_path / "big.png"), "--out", str(tmp_path / "o"),
               "--weights", str(weights), "--max-pixels", "1000"])
    assert rc == 0
    assert "notice:" in capsys.readouterr().err
    with Image.open(tmp_path / "o" / "big.png") as im:
        assert im.size == (80, 60)  # full size output


def test_unwritable_output_fails_before_any_work(tmp_path, weights, images, capsys):
    _, paths, _ = images
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["segment", str(paths[0]), "--out", str(blocker / "sub"), "--weights", str(weights)])
    assert rc == 2
    assert "error:" in capsys.readouterr().err and "file" in str(blocker)
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            rc = main(["segment", str(paths[0]), "--out", str(ro), "--weights", str(weights)])
            assert rc == 2 and "not writable" in capsys.readouterr().err
        finally:
            ro.chmod(0o700)


def test_usage_errors(tmp_path, weights, images, capsys):
    _, paths, _ = images
    out = str(tmp_path / "o")
    assert main(["segment", str(tmp_path / "nothing*.png"), "--out", out, "--weights", str(weights)]) == 2
    assert "matches no file" in capsys.readouterr().err
    assert main(["segment", str(paths[0]), "--out", out, "--weights", str(tmp_path / "no.safetensors")]) == 2
    assert "no.safetensors" in capsys.readouterr().err
    assert main(["segment", str(paths[0]), "--out", out, "--weights", str(weights),
                 "--model", "deeplab_v2_vgg16"]) == 2
    assert "deeplab_v2_resnet18" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["segment", str(paths[0]), "--out", out, "--weights", str(weights),
                     "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["segment", str(paths[0]), "--out", out, "--msc", "0.5,x"])
    assert e.value.code == 2
    for bad in ("0", "-1", "x"):
        with pytest.raises(SystemExit) as e:
            main(["segment", str(paths[0]), "--out", out, "--input-scale", bad])
        assert e.value.code == 2
        assert "--input-scale" in capsys.readouterr().err


def test_input_scale_flag_matches_the_python_api_and_eval(tmp_path, weights, images):
    import json

    import deeplab

    folder, paths, ds = images
    out = tmp_path / "o"
    assert main(["segment", str(paths[0]), "--out", str(out), "--weights", str(weights),
                 "--input-scale", "1.5"]) == 0
    labels, _ = deeplab.segment(paths[0], weights=weights, input_scale=1.5)
    assert np.array_equal(labels, _labels(out / f"{ds.ids[0]}.png"))
    plain, _ = deeplab.segment(paths[0], weights=weights)
    assert not np.array_equal(labels, plain)
    from deeplab.engine.evaluate import evaluate
    from deeplab.weights import build_from_weights

    model, _ = build_from_weights(weights)
    r = evaluate(model, ds, normalization=CAFFE, keep_examples=len(ds), input_scale=1.5)
    pred = {e["id"]: e["pred"] for e in r["examples"]["best"]}[ds.ids[0]]
    assert np.array_equal(pred, labels)


def test_glob_and_batches_with_duplicate_stems(tmp_path, weights, images):
    folder, paths, ds = images
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(ds.images[0]).save(other / f"{ds.ids[0]}.jpg")
    out = tmp_path / "o"
    rc = main(["segment", str(folder / "*.png"), str(other), "--out", str(out),
               "--weights", str(weights), "--batch", "2"])
    assert rc == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == sorted([f"{ds.ids[0]}.png", f"{ds.ids[1]}.png", f"{ds.ids[0]}_1.png"])


def test_without_weights_the_default_model_is_used(tmp_path, weights, images, monkeypatch, capsys):
    import deeplab.weights.default

    _, paths, _ = images
    out = tmp_path / "o"
    monkeypatch.setattr(deeplab.weights.default, "default_weights_path", lambda: weights)
    assert main(["segment", str(paths[0]), "--out", str(out)]) == 0
    ref = tmp_path / "ref"
    assert main(["segment", str(paths[0]), "--out", str(ref), "--weights", str(weights)]) == 0
    assert np.array_equal(_labels(out / f"{paths[0].stem}.png"), _labels(ref / f"{paths[0].stem}.png"))

    def missing():
        raise FileNotFoundError("the packaged default weights are missing: pass --weights FILE")

    monkeypatch.setattr(deeplab.weights.default, "default_weights_path", missing)
    assert main(["segment", str(paths[0]), "--out", str(out)]) == 2
    assert "pass --weights" in capsys.readouterr().err
