"""ONNX export: the exported graph computes what the PyTorch model computes (onnxruntime)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from deeplab.models import build_model
from deeplab.weights import export_onnx, save_weights

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("deeplab_v2_resnet18", num_classes=6).eval()
    with torch.no_grad():  # non-trivial BN statistics, so that BN folding errors would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("export") / "r18.safetensors"
    save_weights(model, path, {"class_names": [f"c{i}" for i in range(6)],
                               "normalization": {"mode": "caffe_bgr", "mean": [104.008, 116.669, 122.675]}})
    return model, path


def _run_cli(argv: list[str]) -> int:
    from deeplab.cli import export as export_cli

    parser = argparse.ArgumentParser()
    export_cli.add_arguments(parser)
    return export_cli.run(parser.parse_args(argv))


def test_onnx_parity_dynamic(tmp_path, weights, capsys):
    model, path = weights
    out = tmp_path / "model.onnx"
    assert _run_cli(["--model", "deeplab_v2_resnet18", "--weights", str(path), "--out", str(out),
                     "--height", "65", "--width", "65", "--dynamic"]) == 0
    assert "wrote" in capsys.readouterr().out
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    props = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert props["model"] == "deeplab_v2_resnet18" and props["num_classes"] == 6
    assert props["class_names"][5] == "c5" and props["normalization"]["mode"] == "caffe_bgr"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for shape in [(1, 3, 65, 65), (2, 3, 49, 70)]:  # the export size, and another (odd) one
        x = rng.standard_normal(shape).astype(np.float32) * 50
        (got,) = session.run(["logits"], {"image": x})
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_onnx_fixed_size_and_errors(tmp_path, weights, capsys):
    # (parity is checked on the dynamic export above)
    model, path = weights
    out = tmp_path / "fixed.onnx"
    export_onnx(model, out, height=41, width=57, opset=13)
    proto = onnx.load(str(out))
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 41, 57] and proto.opset_import[0].version == 13
    assert not list(tmp_path.glob("*.tmp"))
    # A --model that contradicts the metadata, and a bad output name: exit 1, nothing written.
    assert _run_cli(["--model", "deeplab_v2_resnet34", "--weights", str(path), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "deeplab_v2_resnet18" in capsys.readouterr().err
    assert _run_cli(["--weights", str(path), "--out", str(tmp_path / "x.txt")]) == 2
    assert ".onnx" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(ValueError, match="msc_scales"):
        export_onnx(build_model("deeplab_v2_resnet18", num_classes=6, msc_scales=(0.5,)), tmp_path / "m.onnx")
