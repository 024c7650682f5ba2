"""deeplab export --int8: the NNCF-quantized graph against the fp32 graph it came from.

Reference: the fp32 graph of the same weights on the same runtime. int8 is not exact, so the
labels are compared by the share of pixels that agree, on CamVid val frames (the calibration
images come from train).
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import onnx
import pytest
from PIL import Image

from _evaluation_helpers import run_cli, tiny_weights
from _runtime_helpers import predict
from deeplab.runtime import Predictor

pytestmark = pytest.mark.skipif(importlib.util.find_spec("nncf") is None and not os.environ.get("CI"),
                                reason="nncf not installed (pip install 'deeplab[int8]')")
# Looked up, not imported: OpenVINO only ever runs in child processes (see tests/test_backends.py).
_HAS_OPENVINO = importlib.util.find_spec("openvino") is not None

# The packaged model's int8 graph gives 99.6 % of the fp32 graph's labels on CamVid val frames,
# calibrated on 4 or on 64 train images alike (measured on 1 val frame in 10, every frame
# >= 99.4 %); what changes is the odd pixel on a class boundary, where the two largest logits
# are close. 99 % leaves room for another CPU's kernels and still fails a broken quantization
# (a wrong scale or a mis-normalised calibration set flips whole regions).
_MIN_AGREEMENT = 0.99


@pytest.fixture(scope="module")
def graphs(tmp_path_factory, camvid_root):
    """The packaged default model exported --dynamic in fp32 and in int8 (4 calibration images of train)."""
    root = tmp_path_factory.mktemp("int8")
    assert run_cli(["export", "--out", str(root / "fp32.onnx"), "--dynamic", "--height", "97", "--width", "129"]) == 0
    assert run_cli(["export", "--out", str(root / "int8.onnx"), "--dynamic", "--height", "97", "--width", "129",
                    "--int8", "--calibration", str(camvid_root / "train"), "--calibration-images", "4"]) == 0
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((camvid_root / "val").glob("*.png"))[:2]]
    return root, images


def test_int8_graph_is_quantized_and_keeps_the_metadata(graphs):
    root, _ = graphs
    fp32, int8 = onnx.load(str(root / "fp32.onnx")), onnx.load(str(root / "int8.onnx"))
    # Every convolution's weights are stored in int8 (and dequantized in the graph): a quantizer
    # that silently did nothing would leave float weights and a file as large as the fp32 one.
    convs = sum(n.op_type == "Conv" for n in fp32.graph.node)
    int8_weights = [t for t in int8.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert convs > 0 and len(int8_weights) == convs
    assert (root / "int8.onnx").stat().st_size < 0.3 * (root / "fp32.onnx").stat().st_size
    props_fp32 = {p.key: p.value for p in fp32.metadata_props}
    props_int8 = {p.key: p.value for p in int8.metadata_props}
    assert {k: v for k, v in props_int8.items() if k != "quantization"} == props_fp32
    record = json.loads(props_int8["quantization"])
    assert record["calibration_images"] == 4 and record["tool"].startswith("nncf ")
    a, b = Predictor(root / "fp32.onnx"), Predictor(root / "int8.onnx")
    assert (b.class_names, b.palette, b.normalization, b.align_corners, b.logits_stride, b.fixed_size) == \
        (a.class_names, a.palette, a.normalization, a.align_corners, a.logits_stride, None)


def test_int8_labels_agree_with_fp32_on_onnxruntime(graphs):
    root, images = graphs
    fp32 = Predictor(root / "fp32.onnx", "onnxruntime", threads=2)
    int8 = Predictor(root / "int8.onnx", "onnxruntime", threads=2)
    for image in images:
        agreement = (int8.predict(image)[0] == fp32.predict(image)[0]).mean()
        assert agreement >= _MIN_AGREEMENT, agreement


@pytest.mark.skipif(not _HAS_OPENVINO and not os.environ.get("CI"), reason="openvino not installed")
def test_int8_labels_agree_with_fp32_on_openvino(graphs, tmp_path):
    root, images = graphs
    ov = [labels for labels, _ in predict(root / "int8.onnx", "openvino", images, tmp_path, precision="auto")]
    fp32 = Predictor(root / "fp32.onnx", "onnxruntime", threads=2)
    for image, labels in zip(images, ov):
        agreement = (labels == fp32.predict(image)[0]).mean()
        assert agreement >= _MIN_AGREEMENT, agreement


def test_a_fixed_size_graph_is_calibrated_at_its_input_size(tmp_path, camvid_root):
    """Without --dynamic the calibration images (360x480) are resized to the graph's 49x65."""
    weights = tiny_weights(tmp_path / "tiny.safetensors")
    assert run_cli(["export", "--weights", str(weights), "--out", str(tmp_path / "tiny8.onnx"), "--height", "49",
                    "--width", "65", "--int8", "--calibration", str(camvid_root / "train"),
                    "--calibration-images", "2"]) == 0
    predictor = Predictor(tmp_path / "tiny8.onnx", "onnxruntime")
    assert predictor.fixed_size == (49, 65)
    assert predictor.metadata["quantization"]["calibration_size"] == "graph input size"
    labels, probs = predictor.predict(np.zeros((49, 65, 3), dtype=np.uint8))
    assert labels.shape == (49, 65) and np.allclose(probs.sum(0), 1.0, atol=1e-5)


def test_calibration_images_are_spread_over_the_folder(tmp_path):
    from deeplab.runtime.quantize import calibration_images

    for i in range(10):
        (tmp_path / "seq" / f"{i:02d}").mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "seq" / f"{i:02d}" / "frame.png")
    (tmp_path / ".hidden").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / ".hidden" / "x.png")
    (tmp_path / "notes.txt").write_text("not an image")
    picked = calibration_images(tmp_path, 5)
    assert [p.parent.name for p in picked] == ["00", "02", "04", "06", "08"]
    assert len(calibration_images(tmp_path, 50)) == 10  # all of them, hidden ones skipped


def _export_error(argv, capsys) -> str:
    assert run_cli(["export", *argv]) != 0
    return capsys.readouterr().err


def test_bad_int8_options_are_named(tmp_path, capsys, monkeypatch):
    out = ["--out", str(tmp_path / "m.onnx")]
    assert "--int8 needs calibration images: add --calibration DIR" in _export_error([*out, "--int8"], capsys)
    assert "--calibration is for --int8" in _export_error([*out, "--calibration", str(tmp_path)], capsys)
    (tmp_path / "empty").mkdir()
    err = _export_error([*out, "--int8", "--calibration", str(tmp_path / "empty")], capsys)
    assert "--calibration" in err and "holds no image" in err and str(tmp_path / "empty") in err
    err = _export_error([*out, "--int8", "--calibration", str(tmp_path / "nowhere")], capsys)
    assert "does not exist" in err and "nowhere" in err
    err = _export_error([*out, "--int8", "--calibration", str(tmp_path), "--calibration-images", "0"], capsys)
    assert "--calibration-images must be at least 1, got 0" in err
    assert not (tmp_path / "m.onnx").exists()
    # nncf missing: the extra to install is named (before the weights are loaded)
    import deeplab.cli.export as export

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec",
                        lambda name, *a: None if name == "nncf" else find_spec(name, *a))
    err = _export_error([*out, "--int8", "--calibration", str(tmp_path)], capsys)
    assert "needs the nncf package: pip install 'deeplab[int8]'" in err


def test_an_unreadable_calibration_image_is_named(tmp_path, capsys):
    weights = tiny_weights(tmp_path / "tiny.safetensors")
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    err = _export_error(["--weights", str(weights), "--out", str(tmp_path / "m.onnx"), "--height", "33", "--width",
                         "33", "--int8", "--calibration", str(tmp_path / "calib")], capsys)
    assert "broken.png" in err and "cannot be read" in err
    assert not (tmp_path / "m.onnx").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the fp32 intermediate is gone
