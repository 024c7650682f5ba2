"""The packaged default model (DeepLab v2 ResNet-18 trained here on CamVid).

The README's model card states the model's mIoU on the first 20 CamVid val images; this test
recomputes it from ../shared/data, so a broken loader, normalisation, palette or weights file
cannot ship unnoticed.
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

README = Path(__file__).resolve().parents[1] / "README.md"
REQUIRED_KEYS = {"model", "num_classes", "class_names", "palette", "normalization", "model_kwargs", "crf", "record"}


def _card_figure() -> float:
    m = re.search(r"mIoU on the first 20 CamVid val images[^0-9]*([0-9]+\.[0-9]+)", README.read_text())
    assert m, "README model card must state the mIoU on the first 20 CamVid val images"
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
