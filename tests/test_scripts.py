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


@pytest.mark.parametrize("storage", [[], ["--int8"]], ids=["float16", "int8"])
def test_package_logit_adjustment_moves_each_logit_by_tau_log_w(tmp_path, storage):
    """The shift is the same with int8 storage: the kernels of both files round alike and the
    bias stays float16."""
    torch.manual_seed(0)
    model = build_model("deeplab_v2_resnet18", num_classes=5, output_stride=16).eval()
    run = tmp_path / "run"
    run.mkdir()
    save_weights(model, run / "best.safetensors")
    weights = [0.5, 1.0, 2.0, 4.0, 8.8]
    (run / "class_weights.json").write_text(json.dumps({"kind": "median_freq", "weights": weights}))
    _script("package_default_model.py", str(run / "best.safetensors"), "--dst", str(tmp_path / "plain.safetensors"),
            *storage)
    _script("package_default_model.py", str(run / "best.safetensors"), "--dst", str(tmp_path / "adj.safetensors"),
            "--logit-adjust", "0.75", *storage)
    meta = read_metadata(tmp_path / "adj.safetensors")
    assert ("int8_weights" in meta) == bool(storage)
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


def _script_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, _REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stride_ceiling_module():
    return _script_module("stride_ceiling")


def _ceiling_by_loops(mask, stride, num_classes, ignore=255):
    """Per-cell shares and pixel-centre bilinear interpolation written out pixel by pixel."""
    import numpy as np

    h, w = mask.shape
    ch, cw = -(-h // stride), -(-w // stride)
    shares = np.zeros((num_classes, ch, cw))
    for i in range(ch):
        for j in range(cw):
            cell = mask[i * stride : (i + 1) * stride, j * stride : (j + 1) * stride]
            for c in range(num_classes):
                shares[c, i, j] = (cell == c).sum() / stride**2
    up = np.zeros((num_classes, h, w))
    for y in range(h):
        sy = max((y + 0.5) / stride - 0.5, 0.0)
        y0 = int(sy)
        y1, ly = min(y0 + 1, ch - 1), sy - y0
        for x in range(w):
            sx = max((x + 0.5) / stride - 0.5, 0.0)
            x0 = int(sx)
            x1, lx = min(x0 + 1, cw - 1), sx - x0
            up[:, y, x] = ((1 - ly) * (1 - lx) * shares[:, y0, x0] + (1 - ly) * lx * shares[:, y0, x1]
                           + ly * (1 - lx) * shares[:, y1, x0] + ly * lx * shares[:, y1, x1])
    return up


def test_stride_ceiling_matches_a_pixel_by_pixel_reference():
    import numpy as np

    ceiling = _stride_ceiling_module().ceiling_prediction
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 4, size=(13, 11))
    mask[rng.random(mask.shape) < 0.15] = 255
    for stride in (2, 3, 4):
        ref = _ceiling_by_loops(mask, stride, 4)
        top2 = np.sort(ref, axis=0)[-2:]
        decided = top2[1] - top2[0] > 1e-6  # exact ties may break either way in float32
        assert decided.mean() > 0.5
        np.testing.assert_array_equal(ceiling(mask, stride, 4)[decided], ref.argmax(0)[decided])
    # Stride 1 gives the labels back.
    valid = mask != 255
    np.testing.assert_array_equal(ceiling(mask, 1, 4)[valid], mask[valid])


def test_stride_ceiling_keeps_aligned_stripes_and_loses_thin_lines():
    import numpy as np

    ceiling = _stride_ceiling_module().ceiling_prediction
    mask = np.zeros((40, 64), np.int64)
    mask[:, 16:32] = 1  # two stride-8 cells wide, on the grid: recovered exactly
    mask[:, 50] = 2  # one pixel wide: at most 1/8 of a cell, never the majority
    pred = ceiling(mask, 8, 3)
    np.testing.assert_array_equal(pred == 1, mask == 1)
    assert not (pred == 2).any()
    assert (ceiling(mask, 1, 3) == mask).all()
    with pytest.raises(ValueError, match="outside"):
        ceiling(np.full((4, 4), 7), 2, 3)


def test_stride_ceiling_script_on_camvid(camvid_root, tmp_path):
    table = tmp_path / "ceiling.json"
    _script("stride_ceiling.py", "--dataset", "camvid", "--data-root", str(camvid_root), "--split", "val",
            "--limit", "2", "--strides", "1,8,16", "--json", str(table))
    rows = json.loads(table.read_text())["rows"]
    assert [r["stride"] for r in rows] == [1, 8, 16]
    assert rows[0]["miou"] == pytest.approx(1.0)
    assert 0.5 < rows[2]["miou"] < rows[1]["miou"] < 1.0
    assert rows[2]["per_class_iou"]["pole"] < rows[1]["per_class_iou"]["pole"]


def test_gpu_camvid_run_length_fits_the_time_left():
    fit = _script_module("gpu_camvid").fit_iterations
    assert fit(400.0, 0.05) == 7200  # 90 % of 400 s at 50 ms a step
    assert fit(400.0, 0.05, margin=0.0) == 8000
    assert fit(10.0, 3.0) == 3
    assert fit(-20.0, 0.05) == fit(0.0, 0.05) == 1  # the checks and the probe overran: one step


def test_gpu_camvid_pack_train_unpack_round_trip(camvid_root, tmp_path):
    """The lent-GPU workflow end to end on the CPU at toy size: the pack holds the real labels
    byte for byte and near-identical JPEG images, the run's length follows the probe's step
    time, and the returned shards join into exactly the run's float16 weights."""
    import numpy as np
    from PIL import Image

    from deeplab.weights import half_state_dict
    from deeplab.weights.safetensors_io import read_safetensors

    pack, out, work = tmp_path / "pack", tmp_path / "out", tmp_path / "work"
    _script("gpu_camvid.py", "pack", "--data-root", str(camvid_root), "--dst", str(pack), "--limit", "2")
    for split in ("train", "val"):
        rows = [line.split() for line in (pack / f"{split}.txt").read_text().splitlines()]
        assert len(rows) == 2
        for image, mask in rows:
            stem = Path(mask).stem
            assert (pack / mask).read_bytes() == (camvid_root / f"{split}annot" / f"{stem}.png").read_bytes()
            jpeg = np.asarray(Image.open(pack / image), dtype=np.float32)
            png = np.asarray(Image.open(camvid_root / split / f"{stem}.png").convert("RGB"), dtype=np.float32)
            assert jpeg.shape == png.shape and np.abs(jpeg - png).mean() < 3.0  # quality 90, 4:4:4: ~1.9 levels

    _script("gpu_camvid.py", "train", "--pack", str(pack), "--out", str(out), "--work-dir", str(work),
            "--deadline-s", "1", "--reserve-s", "0", "--probe-iters", "4", "--workers", "0", "--shard-mb", "8",
            "--checks", "on", "--check-images", "1",
            "--set", "data.crop_size=65", "--set", "solver.batch_size=2", "--set", "model.output_stride=16")
    record = json.loads((out / "record.json").read_text())
    assert record["max_iter"] >= 1  # the deadline is already spent by the checks and the probe
    assert record["seconds_per_iteration"] > 0
    assert f"max_iter: {record['max_iter']}" in (out / "config.yaml").read_text()
    assert 0.0 <= record["val_miou_stride8_jpeg"] <= 1.0
    # The checks' code path on the CPU: the CRF fed torch tensors against numpy arrays, and the
    # packaged model on the JPEG val image near its PNG figures.
    assert record["checks"]["crf_label_agreement"] == 1.0
    assert 0.3 < record["checks"]["cpu_fp32"]["miou"] <= 1.0
    shards = sorted(out.glob("weights-*.safetensors"))
    assert len(shards) == len(record["shards"]) >= 2  # ResNet-18 in float16: 23 MB
    assert all(p.stat().st_size <= 8 * 2**20 + 2**16 for p in shards)

    back = tmp_path / "back" / "last.safetensors"
    _script("gpu_camvid.py", "unpack", str(out), "--dst", str(back))
    joined, meta = read_safetensors(back)
    expected = half_state_dict(read_safetensors(work / "run" / "last.safetensors")[0])
    assert joined.keys() == expected.keys()
    assert all(torch.equal(joined[k], expected[k]) for k in expected)
    assert meta["model"] == "deeplab_v2_resnet18" and meta["num_classes"] == 11
    assert (back.parent / "class_weights.json").is_file() and (back.parent / "metrics.jsonl").is_file()

    shards[0].write_bytes(shards[0].read_bytes()[:-10])  # a truncated transfer is refused
    res = subprocess.run([sys.executable, str(_REPO / "scripts" / "gpu_camvid.py"), "unpack", str(out),
                          "--dst", str(tmp_path / "again.safetensors")], capture_output=True, text=True)
    assert res.returncode != 0 and shards[0].name in res.stderr and "sha256" in res.stderr
