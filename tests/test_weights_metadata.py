"""Weights metadata is validated where a file is read: a damaged or foreign header gives one
ValueError naming the file, the key and the fix, in every command that reads weights."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from pathlib import Path

import pytest
import torch

from deeplab.models import build_model
from deeplab.weights import build_from_weights, default_weights_path, read_metadata, save_weights

_GOOD_CRF = {"bi_w": 4.5, "bi_xy_std": 15.0, "bi_rgb_std": 4.0, "pos_w": 3.0, "pos_xy_std": 3.0, "iterations": 10}

# (key, bad value, words the message must hold): each value broke a consumer before (audit A #6).
BAD = [
    ("crf", {"foo": 1}, "foo"),
    ("crf", {"iterations": -3}, "iterations"),
    ("crf", {"iterations": 2.7}, "iterations"),
    ("crf", {"bi_xy_std": 0}, "bi_xy_std"),
    ("crf", {"bi_w": "4"}, "bi_w"),
    ("crf", "abc", "crf"),
    ("normalization", {"mode": "weird"}, "weird"),
    ("normalization", [1, 2], "normalization"),
    ("normalization", {"mode": "rgb", "mean": [0.5, 0.5, 0.5]}, "std"),
    ("normalization", {"mode": "rgb", "mean": [0.5, 0.5, 0.5], "std": [0.2, 0, 0.2]}, "std"),
    ("normalization", {"mode": "caffe_bgr", "mean": [1, 2]}, "mean"),
    ("input_scale", -1, "input_scale"),
    ("input_scale", "2", "input_scale"),
    ("num_classes", [11], "num_classes"),
    ("num_classes", "11", "num_classes"),
    ("palette", [[1, 2]] * 11, "palette"),
    ("palette", [7] * 11, "palette"),
    ("class_names", [1] * 11, "class_names"),
    ("model", ["deeplab_v2_resnet18"], "model"),
    ("model_kwargs", [8], "model_kwargs"),
    ("model_kwargs", {"output_stride": "8"}, "output_stride"),
    ("model_kwargs", {"atrous_rates": 6}, "atrous_rates"),
    ("model_kwargs", {"msc_scales": [0.5, -1]}, "msc_scales"),
    ("model_kwargs", {"dilation": 2}, "dilation"),
]
_IDS = [f"{k}={json.dumps(v)}" for k, v, _ in BAD]


def _packaged() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    src = default_weights_path()
    with safe_open(str(src), "pt") as f:
        raw = dict(f.metadata())
    return load_file(str(src)), raw


@pytest.fixture(scope="module")
def packaged():
    return _packaged()


def _with(raw: dict[str, str], key: str, value, tensors: dict[str, torch.Tensor], path: Path) -> Path:
    """A copy of ``tensors`` whose header has ``key`` replaced by ``value`` (written as another tool would)."""
    from safetensors.torch import save_file

    meta = dict(raw)
    meta[key] = json.dumps(value)
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("key,value,words", BAD, ids=_IDS)
def test_read_metadata_refuses_bad_values(tmp_path, packaged, key, value, words):
    _, raw = packaged
    path = _with(raw, key, value, {"x": torch.zeros(1)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError) as info:
        read_metadata(path)
    msg = str(info.value)
    assert str(path) in msg and f"metadata {key}" in msg and words in msg
    assert "re-export" in msg  # the fix


def _tiny_camvid(root: Path) -> Path:
    """Two 72x96 CamVid-layout samples (train/, trainannot/)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "trainannot"):
        (root / split).mkdir(parents=True, exist_ok=True)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)).save(root / "train" / f"s{i}.png")
        Image.fromarray(rng.integers(0, 11, (72, 96), dtype=np.uint8)).save(root / "trainannot" / f"s{i}.png")
    return root


def test_packaged_and_trained_files_pass(tmp_path):
    """The packaged model, a real `deeplab train` run's files (default rates: atrous_rates null;
    MSC scales) and a file from save_weights with every checked key all read back."""
    meta = read_metadata(default_weights_path())
    assert meta["crf"] and meta["normalization"]["mode"] == "caffe_bgr"
    build_from_weights(default_weights_path())

    from deeplab.cli import main

    root = _tiny_camvid(tmp_path / "data")
    sets = ["data.root=" + str(root), "data.val_split=null", "data.crop_size=65", "data.class_weights=null",
            "data.num_workers=0", "solver.max_iter=1", "solver.batch_size=2", "solver.warmup_iter=0",
            "model.output_stride=16", "model.atrous_rates=null", "model.msc_scales=[0.75]",
            "checkpoint_interval=1", "val_interval=0", "device=cpu"]
    config = Path(__file__).resolve().parents[1] / "configs" / "camvid_resnet18.yaml"
    argv = ["train", str(config), "--out", str(tmp_path / "run"), "--no-progress"]
    for item in sets:
        argv += ["--set", item]
    assert main(argv) == 0
    written = sorted((tmp_path / "run").rglob("*.safetensors"))
    assert written
    for path in written:
        meta = read_metadata(path)
        # The rates the model was built with (the default ASPP-L), as save_weights records them.
        assert meta["model_kwargs"]["atrous_rates"] == [6, 12, 18, 24]
        assert meta["model_kwargs"]["msc_scales"] == [0.75] and meta["model_kwargs"]["output_stride"] == 16
        build_from_weights(path)

    model = build_model("deeplab_v2_resnet18", num_classes=3)
    save_weights(model, tmp_path / "saved.safetensors", {"crf": _GOOD_CRF, "input_scale": 1.25,
                                                         "class_names": ["a", "b", "c"],
                                                         "palette": [[0, 0, 0], [1, 2, 3], [255, 255, 255]],
                                                         "normalization": {"mode": "rgb", "mean": [0.5] * 3,
                                                                           "std": [0.25] * 3}})
    assert read_metadata(tmp_path / "saved.safetensors")["input_scale"] == 1.25


def test_save_refuses_metadata_it_could_not_read(tmp_path):
    model = build_model("deeplab_v2_resnet18", num_classes=3)
    with pytest.raises(ValueError, match="crf"):
        save_weights(model, tmp_path / "m.safetensors", {"crf": {"iteration": 5}})
    assert not list(tmp_path.iterdir())


def test_crf_checks_agree_with_densecrf():
    """The reader's crf rules are DenseCRF's: the same keys, and a value passes iff DenseCRF takes it."""
    from deeplab.crf import DenseCRF
    from deeplab.weights.safetensors_io import _CRF_RULES, _validate_metadata

    assert set(_CRF_RULES) == {f.name for f in dataclasses.fields(DenseCRF) if f.init}
    assert set(_CRF_RULES) == set(inspect.signature(DenseCRF).parameters)
    values = [-1, 0, 0.5, 1, 3, 67.0, 1e-5, math.inf, math.nan, "3", None]
    for key in ("bi_w", "bi_xy_std", "bi_rgb_std", "pos_w", "pos_xy_std", "iterations", "clip"):
        for value in values:
            try:
                DenseCRF(**{key: value})
                want = True
            except (TypeError, ValueError):
                want = False
            try:
                _validate_metadata({"crf": {key: value}})
                got = True
            except ValueError:
                got = False
            assert got == want, (key, value)


@pytest.mark.parametrize("key,value", [("crf", {"foo": 1}), ("crf", {"iterations": -3}),
                                       ("normalization", [1, 2]), ("input_scale", -1),
                                       ("num_classes", [11]), ("palette", [[1, 2]] * 11)],
                         ids=["crf-key", "crf-iterations", "norm-list", "scale", "nc-list", "palette"])
def test_commands_give_one_line_errors(tmp_path, packaged, capsys, key, value):
    """segment --crf, convert and export on the packaged tensors with one bad value: exit 1-2,
    an error naming the file, no traceback (segment --crf used to raise TypeError/ValueError)."""
    from PIL import Image

    from deeplab.cli import main

    tensors, raw = packaged
    path = _with(raw, key, value, tensors, tmp_path / "w.safetensors")
    image = tmp_path / "a.png"
    Image.new("RGB", (5, 3), (90, 120, 30)).save(image)
    runs = {
        "segment": ["segment", str(image), "--out", str(tmp_path / "o"), "--crf", "--weights", str(path)],
        "convert": ["convert", str(path), str(tmp_path / "c.safetensors"), "--model", "deeplab_v2_resnet18"],
        "export": ["export", "--weights", str(path), "--out", str(tmp_path / "e.onnx"), "--height", "33",
                   "--width", "33"],
    }
    for name, argv in runs.items():
        assert main(argv) in (1, 2), name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(path) in err and f"metadata {key}" in err, (name, err)
    assert not (tmp_path / "c.safetensors").exists() and not (tmp_path / "e.onnx").exists()


def test_build_from_weights_names_the_file_for_an_unknown_model(tmp_path, packaged):
    _, raw = packaged
    path = _with(raw, "model", "deeplab_v9", {"x": torch.zeros(1)}, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=rf"{path}.*unknown model 'deeplab_v9'"):
        build_from_weights(path)
