"""`deeplab convert` / `deeplab export` on awkward destinations and options: the output folder is
created, a folder or an impossible path is one error line, --partial to another class count keeps
going, the opset and size are checked, a .pth without metadata names the CLI flags."""

from __future__ import annotations

import pytest
import torch

from deeplab.cli import main
from deeplab.models import build_model
from deeplab.weights import build_from_weights, default_weights_path, read_metadata, save_weights

_R18 = "deeplab_v2_resnet18"


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    """A small ResNet-18 model saved with a palette and class names (3 classes)."""
    path = tmp_path_factory.mktemp("w") / "r18.safetensors"
    model = build_model(_R18, num_classes=3).eval()
    save_weights(model, path, {"class_names": ["a", "b", "c"], "palette": [[0, 0, 0], [9, 9, 9], [99, 99, 99]]})
    return path


def _one_error_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_convert_partial_to_another_class_count_drops_per_class_metadata(tmp_path, capsys):
    """Audit A #5: the packaged model (palette, logit adjustment for 11 classes) to 5 classes."""
    dst = tmp_path / "c5.safetensors"
    assert main(["convert", str(default_weights_path()), str(dst), "--model", _R18, "--num-classes", "5",
                 "--partial"]) == 0
    out = capsys.readouterr().out
    assert "5 classes" in out and "palette" in out  # says what it dropped
    meta = read_metadata(dst)
    assert meta["num_classes"] == 5
    for key in ("class_names", "palette", "logit_adjustment"):
        assert key not in meta, key
    assert meta["crf"] == read_metadata(default_weights_path())["crf"]  # not per class: kept
    build_from_weights(dst)
    # --class-names still applies to the new classes.
    names = tmp_path / "names.txt"
    names.write_text("\n".join("abcde"))
    assert main(["convert", str(default_weights_path()), str(dst), "--model", _R18, "--num-classes", "5",
                 "--partial", "--class-names", str(names)]) == 0
    assert read_metadata(dst)["class_names"] == list("abcde")


def test_convert_and_export_create_the_destination_folder(tmp_path, r18, capsys):
    """Audit B #2: like `segment --out`, the destination's folder is created."""
    dst = tmp_path / "weights" / "sub" / "init.safetensors"
    assert main(["convert", str(r18), str(dst), "--model", _R18]) == 0
    assert dst.is_file()
    onnx_out = tmp_path / "onnx" / "m.onnx"
    assert main(["export", "--weights", str(r18), "--out", str(onnx_out), "--height", "33", "--width", "33"]) == 0
    assert onnx_out.is_file()
    capsys.readouterr()


@pytest.mark.parametrize("command", ["convert", "export"])
def test_unwritable_destination_is_one_error_line(tmp_path, r18, capsys, command):
    """A destination that is a folder, or under a file: exit 1, one line naming it (was IsADirectoryError)."""
    folder = tmp_path / ("d.safetensors" if command == "convert" else "d.onnx")
    folder.mkdir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    under_file = blocker / ("x.safetensors" if command == "convert" else "x.onnx")
    for dst, words in [(folder, "is a folder"), (under_file, "cannot create the folder")]:
        if command == "convert":
            argv = ["convert", str(r18), str(dst), "--model", _R18]
        else:
            argv = ["export", "--weights", str(r18), "--out", str(dst), "--height", "33", "--width", "33"]
        assert main(argv) == 2
        err = _one_error_line(capsys.readouterr().err)
        assert str(dst) in err and words in err, err
    assert folder.is_dir() and not any(folder.iterdir()) and blocker.read_text() == "x"


def test_convert_write_error_is_one_error_line(tmp_path, r18, capsys, monkeypatch):
    """An OSError while writing (disk full, permission) is an error line, not a traceback."""
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    dst = tmp_path / "x.safetensors"
    assert main(["convert", str(r18), str(dst), "--model", _R18]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert str(dst) in err and "No space left" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("opset", ["99", "6"])
def test_export_opset_out_of_range(tmp_path, r18, capsys, opset):
    """Audit A #11: an opset the exporter lacks is named with the range that works (was RuntimeError)."""
    out = tmp_path / "m.onnx"
    assert main(["export", "--weights", str(r18), "--out", str(out), "--opset", opset]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert f"--opset {opset}" in err and "17" in err
    assert not out.exists()


def test_export_too_large_size_says_reduce(tmp_path, r18, capsys):
    """Audit A #11: a trace size no memory holds (1.2 PB of input) says to reduce --height/--width."""
    out = tmp_path / "m.onnx"
    assert main(["export", "--weights", str(r18), "--out", str(out), "--height", "10000000",
                 "--width", "10000000"]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert "--height" in err and "--width" in err and "--dynamic" in err
    assert not list(tmp_path.iterdir())


def test_pth_without_metadata_names_the_cli_flags(tmp_path, r18, capsys):
    """Audit A #14: the hint is in CLI terms (`--model`, `deeplab convert ...`), not `model=...`."""
    pth = tmp_path / "m.pth"
    torch.save(build_model(_R18, num_classes=3).state_dict(), pth)
    assert main(["export", "--weights", str(pth), "--out", str(tmp_path / "m.onnx")]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert str(pth) in err and "--model NAME" in err and "model=" not in err
    from PIL import Image

    image = tmp_path / "a.png"
    Image.new("RGB", (5, 3)).save(image)
    assert main(["segment", str(image), "--out", str(tmp_path / "o"), "--weights", str(pth)]) in (1, 2)
    err = capsys.readouterr().err
    assert f"deeplab convert {pth}" in err and "--model NAME" in err, err
    assert err.index("--model NAME") < err.index("model=..."), err  # the CLI's fix comes first
    # The Python route still names the keyword arguments.
    with pytest.raises(ValueError, match=r"build_from_weights\(.*model="):
        build_from_weights(pth)


def test_convert_class_names_not_utf8(tmp_path, r18, capsys):
    """Audit A #13 (convert's part): a non-UTF-8 --class-names file is named (was a bare codec error)."""
    names = tmp_path / "names.txt"
    names.write_bytes(b"\xff\xfe\n")
    assert main(["convert", str(r18), str(tmp_path / "x.safetensors"), "--model", _R18,
                 "--class-names", str(names)]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert str(names) in err and "UTF-8" in err
