"""``data.options``: a data set's own options reach ``deeplab train`` through the config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from deeplab.engine.config import ConfigError, parse_config
from deeplab.engine.train import TrainingError, train

_REPO = Path(__file__).resolve().parents[1]


def _masks_as_0_and_200(root: Path) -> Path:
    """A ``folder`` data set whose masks need both options: ``NAME_mask.png`` files holding 0 / 200."""
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i in range(3):
        image = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
        mask = np.where(rng.random((48, 64)) < 0.3, 200, 0).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"im{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"im{i}_mask.png")
    (root / "classes.txt").write_text("background\nthing\n")
    return root


def _config(root: Path, **data) -> dict:
    cfg = yaml.safe_load((_REPO / "configs" / "camvid_resnet18.yaml").read_text())
    cfg["model"].update(num_classes=None, output_stride=16)
    cfg["data"].update(dataset="folder", root=str(root), train_split="all", val_split="all", crop_size=33,
                       class_weights="median_freq", num_workers=0, **data)
    cfg["solver"].update(max_iter=1, batch_size=2, warmup_iter=0)
    cfg.update(checkpoint_interval=0, val_interval=0, log_interval=1)
    return cfg


def test_data_options_reach_both_splits(tmp_path):
    root = _masks_as_0_and_200(tmp_path / "data")
    options = {"mask_suffix": "_mask.png", "label_map": {0: 0, 200: 1}}
    summary = train(parse_config(_config(root, options=options)), tmp_path / "run", progress=False)
    assert summary["best_miou"] is not None  # the val split read the mapped masks too
    # the class weights were computed from the mapped masks: 2 classes, the rarer one heavier
    weights = json.loads((tmp_path / "run" / "class_weights.json").read_text())["weights"]
    assert len(weights) == 2 and weights[1] > weights[0]
    # the same run without the options cannot find the masks
    with pytest.raises(TrainingError, match="cannot load data set 'folder'"):
        train(parse_config(_config(root)), tmp_path / "run_plain", progress=False)


def test_unknown_data_option_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data.options: 'folder' has no option\(s\) \['mask_sufix'\]"):
        parse_config(_config(tmp_path, options={"mask_sufix": "_mask.png"}))
    with pytest.raises(ConfigError, match="data.dataset: unknown data set 'camvid2'"):
        parse_config({**_config(tmp_path), "data": {**_config(tmp_path)["data"], "dataset": "camvid2"}})


def test_a_plain_dict_config_is_a_clear_type_error(tmp_path):
    # Not an AttributeError from deep inside: the message names the function that builds a config.
    with pytest.raises(TypeError, match=r"TrainConfig, got dict.*parse_config"):
        train(_config(tmp_path), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
