"""deeplab.runtime: the exported graph on ONNX Runtime / OpenVINO, without PyTorch.

References: PyTorch's own interpolation for the numpy bilinear matrices, and ``deeplab.segment``
(the PyTorch path) for the labels and probabilities of real CamVid val images.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import deeplab
from _runtime_helpers import predict
from deeplab.runtime import BACKENDS, Predictor, bilinear_matrix, upsample

torch.set_num_threads(min(2, torch.get_num_threads()))
# Looked up, not imported: OpenVINO only ever runs in child processes here (see _predict).
_HAS_OPENVINO = importlib.util.find_spec("openvino") is not None  # an optional extra; CI installs it (.[dev])
backends = [pytest.param(b, marks=pytest.mark.skipif(b == "openvino" and not _HAS_OPENVINO and not os.environ.get("CI"),
                                                     reason="openvino not installed (pip install deeplab[openvino])"))
            for b in BACKENDS]


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize(("n_in", "n_out"), [(45, 360), (46, 481), (1, 7), (9, 9), (17, 4)])
def test_bilinear_matrices_are_torchs_interpolation(n_in, n_out, align_corners):
    x = torch.randn(2, 3, n_in, n_in + 3)
    expected = F.interpolate(x, size=(n_out, n_out + 5), mode="bilinear", align_corners=align_corners).numpy()
    got = upsample(x.numpy(), (n_out, n_out + 5), align_corners)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.allclose(bilinear_matrix(n_in, n_out, align_corners).sum(1), 1.0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, camvid_root):
    """The packaged default model (v2, corners aligned) and a random v3+ (align_corners=False), exported --dynamic."""
    from _evaluation_helpers import run_cli
    from deeplab.models import build_model
    from deeplab.weights import save_weights

    root = tmp_path_factory.mktemp("rt")
    assert run_cli(["export", "--out", str(root / "camvid.onnx"), "--dynamic", "--height", "97", "--width", "129"]) == 0
    torch.manual_seed(0)
    save_weights(build_model("deeplab_v3plus_resnet18", num_classes=11), root / "v3p.safetensors",
                 {"normalization": {"mode": "rgb", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}})
    assert run_cli(["export", "--weights", str(root / "v3p.safetensors"), "--out", str(root / "v3p.onnx"),
                    "--dynamic", "--height", "97", "--width", "129"]) == 0
    assert run_cli(["export", "--out", str(root / "fixed.onnx"), "--height", "97", "--width", "129"]) == 0
    images = [np.asarray(Image.open(p).convert("RGB"))
              for p in sorted((camvid_root / "val").glob("*.png"))[:2]]
    return root, images


@pytest.mark.parametrize("backend", backends)
def test_labels_equal_pytorchs_on_camvid_val(exported, backend, tmp_path):
    root, images = exported
    for name, weights in (("camvid.onnx", None), ("v3p.onnx", root / "v3p.safetensors")):
        for image, (labels, probs) in zip(images, predict(root / name, backend, images, tmp_path)):
            ref_labels, ref_probs = deeplab.segment(image, weights=weights, precision="fp32")
            assert probs.shape == ref_probs.shape and np.abs(probs - ref_probs).max() < 1e-4
            assert (labels != ref_labels).mean() <= 1e-4, (name, (labels != ref_labels).mean())
    assert Predictor(root / "v3p.onnx", "onnxruntime").align_corners is False
    assert Predictor(root / "camvid.onnx", "onnxruntime").align_corners is True
    # flip averages the mirrored image's logits, as deeplab.segment(flip=True)
    labels, _ = predict(root / "camvid.onnx", backend, images[:1], tmp_path, flip=True)[0]
    ref, _ = deeplab.segment(images[0], flip=True, precision="fp32")
    assert (labels != ref).mean() <= 1e-4


@pytest.mark.skipif(not _HAS_OPENVINO and not os.environ.get("CI"), reason="openvino not installed")
def test_openvino_default_precision_stays_within_the_bf16_tolerance(exported, tmp_path):
    """precision "auto": OpenVINO's own choice (bf16 on CPUs with bf16 units): at most 0.5 % of
    pixels may change label against PyTorch fp32 (measured: under 0.1 % on CamVid val)."""
    root, images = exported
    for image, (labels, _) in zip(images, predict(root / "camvid.onnx", "openvino", images, tmp_path,
                                                    precision="auto")):
        ref, _ = deeplab.segment(image, precision="fp32")
        assert (labels != ref).mean() <= 5e-3


def test_runtime_imports_and_runs_without_torch(exported, tmp_path):
    root, images = exported
    Image.fromarray(images[0]).save(tmp_path / "frame.png")
    expected, _ = Predictor(root / "camvid.onnx", "onnxruntime", precision="fp32").predict(images[0])
    script = f"""
import sys
sys.modules["torch"] = None  # any import of torch now fails
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch imported")
import numpy as np
from PIL import Image
from deeplab.runtime import Predictor
p = Predictor({str(root / 'camvid.onnx')!r}, "onnxruntime", precision="fp32")
labels, _ = p.predict(np.asarray(Image.open({str(tmp_path / 'frame.png')!r}).convert("RGB")))
np.save({str(tmp_path / 'labels.npy')!r}, labels)
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "['torch']"  # only the None placeholder: nothing of torch was loaded
    assert np.array_equal(np.load(tmp_path / "labels.npy"), expected)


def test_bad_inputs_are_named(exported, tmp_path):
    root, images = exported
    with pytest.raises(ValueError, match="--dynamic"):
        Predictor(root / "fixed.onnx", "onnxruntime").predict(images[0])  # 360x480 into a 97x129 graph
    with pytest.raises(ValueError, match="backend='tensorrt'"):
        Predictor(root / "camvid.onnx", "tensorrt")
    with pytest.raises(FileNotFoundError, match="deeplab export"):
        Predictor(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="uint8"):
        Predictor(root / "camvid.onnx").predict(images[0].astype(np.float32))
    meta = Predictor(root / "camvid.onnx").metadata
    assert meta["model"] == "deeplab_v2_resnet18" and json.dumps(meta["crf"])
