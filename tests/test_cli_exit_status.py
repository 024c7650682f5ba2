"""The exit-status contract of the command line: every subcommand answers a user error (here: a
file or folder that does not exist) with one ``error: ...`` line naming it, no traceback and
status 2, the status argparse gives a bad option."""

from __future__ import annotations

import pytest

from deeplab.cli import main

# Each case: the subcommand's arguments, with MISSING replaced by a path that does not exist.
_CASES = {
    "segment": ["segment", "MISSING/street.png", "--out", "OUT"],
    "eval": ["eval", "--dataset", "camvid", "--data-root", "MISSING"],
    "train": ["train", "MISSING/config.yaml", "--out", "OUT"],
    "crf": ["crf", "--images", "MISSING", "--probs", "MISSING", "--out", "OUT"],
    "crf-search": ["crf-search", "--dataset", "camvid", "--data-root", "MISSING", "--probs", "MISSING"],
    "calibrate-bn": ["calibrate-bn", "--weights", "MISSING/w.safetensors", "--dataset", "camvid",
                     "--data-root", "MISSING", "--out", "OUT/c.safetensors"],
    "average-weights": ["average-weights", "MISSING/a.safetensors", "MISSING/b.safetensors",
                        "--out", "OUT/avg.safetensors"],
    "convert": ["convert", "MISSING/w.caffemodel", "OUT/w.safetensors", "--model", "deeplab_v2_resnet18"],
    "export": ["export", "--weights", "MISSING/w.safetensors", "--out", "OUT/m.onnx"],
}


@pytest.mark.parametrize("command", sorted(_CASES))
def test_user_error_is_one_line_and_status_2(command, tmp_path, capsys):
    missing, out = tmp_path / "no_such_thing", tmp_path / "out"
    argv = [a.replace("MISSING", str(missing)).replace("OUT", str(out)) for a in _CASES[command]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert lines and "Traceback" not in err, err
    assert str(missing) in err, err  # the message names what is missing


def test_bad_option_value_is_status_2(capsys):
    assert main(["models", "--num-classes", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --num-classes 0")
