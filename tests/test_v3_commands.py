"""Every command with a DeepLab v3+ model, on tiny inputs: train (from an ImageNet ResNet file
through init_weights), average-weights, calibrate-bn, eval, segment (+ CRF), crf and export
(ONNX Runtime parity at a fixed size and with --dynamic)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from _evaluation_helpers import random_dataset, run_cli, write_folder_dataset
from _foreign_reference import randomize, tv_resnet
from deeplab.weights import build_from_weights, read_metadata

torch.set_num_threads(min(2, torch.get_num_threads()))
_REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-iteration v3+ ResNet-18 run initialised from a (random) torchvision ImageNet file."""
    root = tmp_path_factory.mktemp("v3cmd")
    data = write_folder_dataset(root / "data", random_dataset(n=3, sizes=((40, 56), (48, 64), (33, 47))))
    imagenet = root / "resnet18-f37072fd.pth"
    torch.save(randomize(tv_resnet(18)).state_dict(), imagenet)
    cfg = yaml.safe_load((_REPO / "configs" / "camvid_resnet18.yaml").read_text())
    cfg["model"] = {"name": "deeplab_v3plus_resnet18", "num_classes": 4, "output_stride": 16, "freeze_bn": False}
    cfg["data"].update(dataset="folder", root=str(data), train_split="all", val_split=None, crop_size=33,
                       class_weights=None, num_workers=0,
                       normalization={"mode": "rgb", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
    cfg["solver"].update(max_iter=2, batch_size=2, iter_size=1, warmup_iter=0, classifier_lr_mult=1.0,
                         classifier_bias_lr_mult=1.0)
    cfg.update(checkpoint_interval=1, val_interval=0, log_interval=1, keep_checkpoints=2, init_weights=str(imagenet),
               device="cpu", precision="fp32")
    config = root / "v3plus.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return root, data, config


def test_train_from_an_imagenet_file_then_every_command(trained, tmp_path, capsys):
    root, data, config = trained
    run = tmp_path / "run"
    assert run_cli(["train", str(config), "--out", str(run), "--no-progress"]) == 0
    log = capsys.readouterr().err  # the training log goes to stderr
    assert "(imagenet layout)" in log and "dropped the ImageNet classifier" in log
    last = run / "last.safetensors"
    meta = read_metadata(last)
    assert meta["model"] == "deeplab_v3plus_resnet18" and meta["model_kwargs"]["decoder_convs"] == 2
    assert meta["model_kwargs"]["output_stride"] == 16

    checkpoints = sorted((run / "checkpoints").glob("*.safetensors"))
    assert len(checkpoints) == 2
    avg = tmp_path / "avg.safetensors"
    assert run_cli(["average-weights", *map(str, checkpoints), "--out", str(avg)]) == 0
    cal = tmp_path / "cal.safetensors"
    assert run_cli(["calibrate-bn", "--weights", str(avg), "--dataset", "folder", "--data-root", str(data),
                    "--split", "all", "--precision", "fp32", "--out", str(cal)]) == 0
    assert read_metadata(cal)["bn_calibration"]["layers"] > 0
    capsys.readouterr()

    report = tmp_path / "eval.json"
    assert run_cli(["eval", "--dataset", "folder", "--data-root", str(data), "--split", "all", "--weights", str(cal),
                    "--msc", "0.75", "--flip", "--precision", "fp32", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["settings"]["msc_fusion"] == "mean" and 0 <= result["miou"] <= 1

    out = tmp_path / "seg"
    image = data / "images" / sorted(p.name for p in (data / "images").iterdir())[0]
    assert run_cli(["segment", str(data / "images"), "--out", str(out), "--weights", str(cal), "--precision",
                    "fp32", "--save-probs"]) == 0
    labels = np.asarray(Image.open(out / f"{image.stem}.png"))
    from deeplab.engine.segment import segment

    expected, _ = segment(str(image), weights=cal, precision="fp32")
    assert np.array_equal(labels, expected)
    assert run_cli(["segment", str(image), "--out", str(tmp_path / "segcrf"), "--weights", str(cal), "--crf",
                    "--precision", "fp32"]) == 0
    assert run_cli(["crf", "--images", str(data / "images"), "--probs", str(out), "--out",
                    str(tmp_path / "crf")]) == 0
    assert (tmp_path / "crf" / f"{image.stem}.png").is_file()


@pytest.mark.parametrize("name", ["deeplab_v3_resnet18", "deeplab_v3plus_resnet18"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_onnx_export_matches_pytorch(tmp_path, name: str, dynamic: bool):
    import onnx
    import onnxruntime as ort

    from deeplab.models import build_model
    from deeplab.weights import save_weights

    torch.manual_seed(0)
    save_weights(randomize(build_model(name, num_classes=5)), tmp_path / "m.safetensors")
    onnx_path = tmp_path / "m.onnx"
    argv = ["export", "--weights", str(tmp_path / "m.safetensors"), "--out", str(onnx_path), "--height", "65",
            "--width", "81"]
    assert run_cli(argv + (["--dynamic"] if dynamic else [])) == 0
    props = {p.key: json.loads(p.value) for p in onnx.load(str(onnx_path)).metadata_props}
    assert props["align_corners"] is False and props["logits_stride"] == (4 if "plus" in name else 16)
    model, _ = build_from_weights(tmp_path / "m.safetensors")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for size in ([(65, 81)] + ([(50, 77), (96, 64)] if dynamic else [])):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
