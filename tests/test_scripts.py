"""The maintainer scripts that make the default model: packaging with a logit adjustment, and
the measurement that chooses it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deeplab.models import build_model
from deeplab.weights import load_weights, read_metadata, save_weights

_REPO = Path(__file__).resolve().parents[1]


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, str(_REPO / "scripts" / name), *args], capture_output=True, text=True,
                         timeout=300, cwd=_REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_package_logit_adjustment_moves_each_logit_by_tau_log_w(tmp_path):
    torch.manual_seed(0)
    model = build_model("deeplab_v2_resnet18", num_classes=5, output_stride=16).eval()
    run = tmp_path / "run"
    run.mkdir()
    save_weights(model, run / "best.safetensors")
    weights = [0.5, 1.0, 2.0, 4.0, 8.8]
    (run / "class_weights.json").write_text(json.dumps({"kind": "median_freq", "weights": weights}))
    _script("package_default_model.py", str(run / "best.safetensors"), "--dst", str(tmp_path / "plain.safetensors"))
    _script("package_default_model.py", str(run / "best.safetensors"), "--dst", str(tmp_path / "adj.safetensors"),
            "--logit-adjust", "0.75")
    meta = read_metadata(tmp_path / "adj.safetensors")
    assert meta["logit_adjustment"] == {"tau": 0.75, "class_weights": weights, "bias": "aspp.branches.0.bias"}
    plain, adjusted = (build_model("deeplab_v2_resnet18", num_classes=5, output_stride=16).eval() for _ in range(2))
    load_weights(plain, tmp_path / "plain.safetensors", strict=True)
    load_weights(adjusted, tmp_path / "adj.safetensors", strict=True)
    x = torch.randn(1, 3, 67, 59)
    with torch.no_grad():
        shift = adjusted(x) - plain(x)
    expected = -0.75 * torch.log(torch.tensor(weights))[None, :, None, None]
    # float16 biases: the shift is exact up to their rounding (~1e-3 at |shift| ~ 1.6).
    torch.testing.assert_close(shift, expected.expand_as(shift), atol=2e-3, rtol=0)


def test_logit_adjustment_at_tau_zero_is_plain_evaluation(camvid_root, tmp_path):
    """tau = 0 must reproduce `deeplab eval` from its own saved probabilities; larger tau moves
    predictions away from the classes with the largest weights."""
    from deeplab.cli import main

    probs, out = tmp_path / "probs", tmp_path / "eval.json"
    assert main(["eval", "--dataset", "camvid", "--data-root", str(camvid_root), "--split", "val", "--limit", "3",
                 "--save-probs", str(probs), "--json", str(out)]) == 0
    reference = json.loads(out.read_text())
    weights = tmp_path / "w.json"
    weights.write_text(json.dumps({"weights": [0.3, 0.2, 4.8, 0.15, 1.0, 0.42, 3.9, 2.0, 0.79, 6.4, 8.8]}))
    table = tmp_path / "tau.json"
    _script("logit_adjustment.py", "--dataset", "camvid", "--data-root", str(camvid_root), "--split", "val",
            "--limit", "3", "--probs", str(probs), "--class-weights", str(weights), "--taus", "0,1",
            "--json", str(table))
    rows = json.loads(table.read_text())["rows"]
    assert json.loads(table.read_text())["images"] == 3
    # float16 probabilities on disk: an argmax may flip where two classes tie to 1e-3.
    assert rows[0]["miou"] == pytest.approx(reference["miou"], abs=2e-3)
    assert rows[0]["pixel_acc"] == pytest.approx(reference["pixel_acc"], abs=1e-3)
    assert rows[1]["pixel_acc"] != rows[0]["pixel_acc"]
