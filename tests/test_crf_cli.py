"""End-to-end test of ``deeplab crf`` on a tiny folder."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deeplab.cli import main
from deeplab.crf import DenseCRF


def _write_case(tmp_path, shared_data):
    images, probs = tmp_path / "images", tmp_path / "probs"
    images.mkdir()
    probs.mkdir()
    rng = np.random.default_rng(0)
    expected = {}
    for i, name in enumerate(["2008_005376", "2009_002205"]):
        image = np.array(Image.open(shared_data / "voc12_toy" / "JPEGImages" / f"{name}.jpg").convert("RGB"))
        image = image[:60, :80].copy()
        Image.fromarray(image).save(images / f"{name}.png")
        logits = rng.normal(0, 1.5, (5, 60, 80)).astype(np.float32)
        p = np.exp(logits - logits.max(0))
        p /= p.sum(0)
        if i == 0:
            np.save(probs / f"{name}.npy", p.astype(np.float16))
            expected[name] = DenseCRF()(image, p.astype(np.float16)).argmax(0)
        else:
            np.savez(probs / f"{name}.npz", probs=p)
            expected[name] = DenseCRF()(image, p).argmax(0)
    return images, probs, expected


@pytest.mark.parametrize("workers", ["1", "2"])
def test_crf_cli_end_to_end(tmp_path, shared_data, workers, capsys):
    images, probs, expected = _write_case(tmp_path, shared_data)
    out = tmp_path / "out"
    status = main(["crf", "--images", str(images), "--probs", str(probs), "--out", str(out),
                   "--workers", workers, "--no-progress", "--palette", "none"])
    assert status == 0, capsys.readouterr().err
    for name, labels in expected.items():
        written = np.array(Image.open(out / f"{name}.png"))
        np.testing.assert_array_equal(written, labels)
    assert not list(out.glob(".*tmp"))


def test_crf_cli_logits_and_failures(tmp_path, shared_data, capsys):
    images, probs, _ = _write_case(tmp_path, shared_data)
    # Logits instead of probabilities: same labels as their softmax through the CRF.
    data = np.load(probs / "2009_002205.npz")["probs"]
    np.save(probs / "2009_002205.npy", np.log(data))
    (probs / "2009_002205.npz").unlink()
    np.save(probs / "2008_005376.npy", np.zeros((5, 10, 10), np.float32))  # wrong size
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(images / "orphan.png")  # no probabilities
    out = tmp_path / "out"
    status = main(["crf", "--images", str(images), "--probs", str(probs), "--out", str(out),
                   "--workers", "1", "--no-progress", "--logits"])
    err = capsys.readouterr().err
    assert status == 1
    assert "2008_005376" in err and "(5, 10, 10)" in err
    assert "orphan" in err
    image = np.array(Image.open(images / "2009_002205.png"))
    np.testing.assert_array_equal(np.array(Image.open(out / "2009_002205.png")), DenseCRF()(image, data).argmax(0))


def test_crf_cli_rejects_probabilities_that_are_logits(tmp_path, shared_data, capsys):
    images, probs, _ = _write_case(tmp_path, shared_data)
    np.save(probs / "2008_005376.npy", np.full((5, 60, 80), 3.0, np.float32))
    status = main(["crf", "--images", str(images), "--probs", str(probs), "--out", str(tmp_path / "o"),
                   "--workers", "1", "--no-progress"])
    assert status == 1
    assert "--logits" in capsys.readouterr().err


def test_crf_cli_bad_folder(tmp_path, capsys):
    assert main(["crf", "--images", str(tmp_path / "nope"), "--probs", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_crf_cli_unusable_device(tmp_path, shared_data, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the error path cannot be reached")
    images, probs, _ = _write_case(tmp_path, shared_data)
    status = main(["crf", "--images", str(images), "--probs", str(probs), "--out", str(tmp_path / "o"),
                   "--device", "cuda", "--no-progress"])
    assert status == 2
    assert "--device cuda" in capsys.readouterr().err


def test_crf_cli_batches_give_the_labels_of_single_images(tmp_path, shared_data, capsys):
    """--batch: same-size images share one CRF call; a bad file in a chunk fails alone."""
    images, probs = tmp_path / "images", tmp_path / "probs"
    images.mkdir()
    probs.mkdir()
    rng = np.random.default_rng(1)
    expected = {}
    photo = np.array(Image.open(shared_data / "voc12_toy" / "JPEGImages" / "2008_005376.jpg").convert("RGB"))
    for name, (y, x, h, w) in {"a": (0, 0, 60, 80), "b": (100, 120, 60, 80), "c": (50, 50, 40, 50)}.items():
        image = photo[y:y + h, x:x + w].copy()
        Image.fromarray(image).save(images / f"{name}.png")
        logits = rng.normal(0, 1.5, (5, h, w)).astype(np.float32)
        p = np.exp(logits - logits.max(0))
        p /= p.sum(0)
        np.save(probs / f"{name}.npy", p)
        expected[name] = DenseCRF()(image, p).argmax(0)
    Image.fromarray(photo[:30, :30].copy()).save(images / "bad.png")
    np.save(probs / "bad.npy", np.zeros((5, 10, 10), np.float32))  # wrong size, in the same chunk
    out = tmp_path / "out"
    status = main(["crf", "--images", str(images), "--probs", str(probs), "--out", str(out),
                   "--workers", "1", "--batch", "4", "--no-progress", "--palette", "none"])
    assert status == 1
    assert "bad" in capsys.readouterr().err
    for name, labels in expected.items():
        np.testing.assert_array_equal(np.array(Image.open(out / f"{name}.png")), labels)
    assert main(["crf", "--images", str(images), "--probs", str(probs), "--out", str(out),
                 "--batch", "0", "--no-progress"]) == 2


def test_crf_cli_two_images_of_one_id(tmp_path, shared_data, capsys):
    """x.jpg and x.png would share x.npy and x.png's output: the second is reported, not written over the first."""
    images, probs, expected = _write_case(tmp_path, shared_data)
    name = "2008_005376"
    first = np.array(Image.open(images / f"{name}.png"))
    Image.fromarray(255 - first).save(images / f"{name}.jpg")  # sorts first: .jpg < .png
    out = tmp_path / "out"
    status = main(["crf", "--images", str(images), "--probs", str(probs), "--out", str(out),
                   "--workers", "1", "--no-progress", "--palette", "none"])
    err = capsys.readouterr().err
    assert status == 1 and f"{name}.png: {name}.jpg has the same id" in err
    # the other id is untouched; this id's output comes from the one image that was paired
    np.testing.assert_array_equal(np.array(Image.open(out / "2009_002205.png")), expected["2009_002205"])
    assert (out / f"{name}.png").is_file()


def test_crf_cli_reads_greyscale_pgm_like_segment(tmp_path, shared_data, capsys):
    # crf and segment pick up the same image suffixes; a greyscale .pgm is refined as its RGB copy.
    images, probs, _ = _write_case(tmp_path, shared_data)
    name = "2008_005376"
    grey = np.array(Image.open(images / f"{name}.png").convert("L"))
    (images / f"{name}.png").unlink()
    (images / "2009_002205.png").unlink()
    Image.fromarray(grey).save(images / f"{name}.pgm")
    out = tmp_path / "out"
    status = main(["crf", "--images", str(images), "--probs", str(probs), "--out", str(out),
                   "--workers", "1", "--no-progress", "--palette", "none"])
    assert status == 0, capsys.readouterr().err
    expected = DenseCRF()(np.repeat(grey[..., None], 3, axis=2), np.load(probs / f"{name}.npy")).argmax(0)
    np.testing.assert_array_equal(np.array(Image.open(out / f"{name}.png")), expected)
