"""The packaged default model (DeepLab v2 ResNet-18 trained here on CamVid).

The model card (docs/model-cards.md) states the model's mIoU on the first 20 CamVid val images;
this test recomputes it from ../shared/data, so a broken loader, normalisation, palette or weights
file cannot ship unnoticed. The card's other figures, and the README's summary of them, are tied
to the weights' metadata.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from deeplab.data import build_dataset
from deeplab.data.palettes import CAMVID_PALETTE
from deeplab.engine.evaluate import evaluate
from deeplab.models import build_model
from deeplab.weights import default_weights_path, load_weights, read_metadata

_REPO = Path(__file__).resolve().parents[1]
CARD = _REPO / "docs" / "model-cards.md"
README = _REPO / "README.md"
REQUIRED_KEYS = {"model", "num_classes", "class_names", "palette", "normalization", "model_kwargs", "crf", "record"}


def _card_figure() -> float:
    m = re.search(r"mIoU on the first 20 CamVid val images[^0-9]*([0-9]+\.[0-9]+)", CARD.read_text())
    assert m, "the model card must state the mIoU on the first 20 CamVid val images"
    return float(m.group(1))


def test_default_weights_load_strictly_and_metadata_is_complete():
    path = default_weights_path()
    assert path.stat().st_size <= 25_000_000, "the packaged model must stay under 25 MB"
    meta = read_metadata(path)
    assert REQUIRED_KEYS <= set(meta), f"missing metadata keys: {REQUIRED_KEYS - set(meta)}"
    assert meta["num_classes"] == len(meta["class_names"]) == len(meta["palette"]) == 11
    assert [tuple(c) for c in meta["palette"]] == [tuple(int(v) for v in c) for c in CAMVID_PALETTE[:11]]
    model = build_model(meta["model"], num_classes=meta["num_classes"], **meta["model_kwargs"])
    load_weights(model, path, strict=True)
    from deeplab.crf import DenseCRF

    DenseCRF(**meta["crf"])  # the stored CRF parameters are valid keyword arguments
    # The card's "mean of the seventh fine-tune's N checkpoints" (deeplab average-weights).
    m = re.search(r"mean of the seventh fine-tune's (\d+) checkpoints", CARD.read_text())
    assert m, "the model card must state how many checkpoints the shipped weights average"
    assert meta["weight_average"]["count"] == len(meta["weight_average"]["sources"]) == int(m.group(1))


def test_model_card_states_the_shipped_crf_parameters_and_recorded_figures():
    """The card's CRF setting and its val mIoU row are the metadata's (so a repackaged file or
    an edited card cannot drift apart unnoticed)."""
    meta = read_metadata(default_weights_path())
    card = CARD.read_text()
    m = re.search(r"bi_w=([0-9.]+), bi_xy_std=([0-9.]+), bi_rgb_std=([0-9.]+), pos_w=([0-9.]+), "
                  r"pos_xy_std=([0-9.]+), stored in\s+the weights' metadata", card)
    assert m, "the model card must state the shipped CRF parameters"
    stated = dict(zip(("bi_w", "bi_xy_std", "bi_rgb_std", "pos_w", "pos_xy_std"), map(float, m.groups())))
    assert stated == {k: meta["crf"][k] for k in stated}
    row = re.search(r"\| \*\*mIoU\*\* \| ([0-9.]+) \| \*\*([0-9.]+)\*\* \| \*\*([0-9.]+)\*\* \|", card)
    assert row, "the model card must have the per-class table's mIoU row"
    record = meta["record"]
    expected = (record["val_miou_unadjusted"], record["val_miou"], record["val_miou_crf"])
    assert [float(v) for v in row.groups()] == [round(100 * v, 2) for v in expected]



def test_readme_summary_is_the_recorded_figures():
    """The README's one-line summary of the default model (val mIoU without and with the CRF)."""
    record = read_metadata(default_weights_path())["record"]
    m = re.search(r"\(([0-9.]+) CamVid val mIoU, ([0-9.]+)\s+with the CRF\)", README.read_text())
    assert m, "the README must state the default model's val mIoU, without and with the CRF"
    assert [float(v) for v in m.groups()] == [round(100 * record["val_miou"], 2), round(100 * record["val_miou_crf"], 2)]


def test_model_card_miou_on_first_20_val_images(camvid_root):
    path = default_weights_path()
    meta = read_metadata(path)
    model = build_model(meta["model"], num_classes=meta["num_classes"], **meta["model_kwargs"])
    load_weights(model, path, strict=True)
    dataset = build_dataset("camvid", camvid_root, "val")
    result = evaluate(model, dataset, normalization=meta["normalization"], limit=20)
    assert result["num_images"] == 20
    assert 100 * result["miou"] == pytest.approx(_card_figure(), abs=0.5)
    assert 100 * result["miou"] == pytest.approx(100 * meta["record"]["val_first20_miou"], abs=0.5)


def test_default_model_batch_norm_holds_whole_train_image_statistics(camvid_root):
    """`deeplab calibrate-bn` ran on CamVid train, as the card says: the stem's batch norm holds
    the mean and variance of its convolution's output over every pixel of the 367 whole train
    images, computed here by brute force in float64 (the training-time statistics, from
    rescaled, padded crops, miss the mean by 0.24 standard deviations and the variance by 14 %)."""
    import numpy as np
    import torch

    from deeplab.data.transforms import normalize_image
    from deeplab.weights import build_from_weights

    model, meta = build_from_weights(default_weights_path())
    assert meta["bn_calibration"]["dataset"] == "camvid" and meta["bn_calibration"]["split"] == "train"
    dataset = build_dataset("camvid", camvid_root, "train")
    assert meta["bn_calibration"]["images"] == len(dataset) == 367
    conv, bn = model.backbone.stem.conv1, model.backbone.stem.bn1
    total = torch.zeros(conv.out_channels, dtype=torch.float64)
    squares = torch.zeros_like(total)
    count = 0
    with torch.no_grad():
        for i in range(len(dataset)):
            h = conv(normalize_image(np.asarray(dataset[i][0]), meta["normalization"])[None]).double()
            total += h.sum((0, 2, 3))
            squares += h.square().sum((0, 2, 3))
            count += h[0, 0].numel()
    mean = total / count
    var = squares / count - mean.square()
    # bf16 convolutions in the calibration pass, float16 storage: within a percent or two
    assert ((bn.running_mean.double() - mean).abs() / var.sqrt()).max() < 0.01
    rel = (bn.running_var.double() - var).abs() / var
    assert rel.median() < 0.01 and rel.max() < 0.05


def test_packaged_models_are_named_by_short_name(tmp_path, monkeypatch):
    from deeplab.weights import PACKAGED_WEIGHTS, resolve_weights

    assert resolve_weights(None) == default_weights_path()
    assert resolve_weights("camvid-v2") == default_weights_path()  # today's default is the v2 model
    assert read_metadata(resolve_weights("camvid-v2"))["model"] == "deeplab_v2_resnet18"
    assert set(PACKAGED_WEIGHTS) >= {"camvid-v2"}
    # A file of that name in the working directory is the user's, and wins.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "camvid-v2").write_bytes(b"mine")
    assert resolve_weights("camvid-v2") == Path("camvid-v2")
    assert resolve_weights("other.safetensors") == Path("other.safetensors")


def test_segment_takes_the_packaged_name(camvid_root, tmp_path):
    from _evaluation_helpers import run_cli

    frame = camvid_root / "val" / "0016E5_07959.png"
    assert run_cli(["segment", str(frame), "--out", str(tmp_path / "a")]) == 0
    assert run_cli(["segment", str(frame), "--out", str(tmp_path / "b"), "--weights", "camvid-v2"]) == 0
    name = f"{frame.stem}.png"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert run_cli(["segment", str(frame), "--out", str(tmp_path / "c"), "--weights", "camvid-v9"]) != 0
