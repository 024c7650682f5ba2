"""Config loading: typed dataclasses, unknown keys, overrides, every shipped config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deeplab.engine.config import (
    ConfigError,
    TrainConfig,
    config_to_dict,
    load_config,
    parse_config,
    save_config,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_unknown_key_names_path_and_valid_keys():
    with pytest.raises(ConfigError) as e:
        parse_config({"solver": {"bse_lr": 0.1}})
    msg = str(e.value)
    assert "solver.bse_lr" in msg
    assert "base_lr" in msg and "max_iter" in msg  # lists the valid keys


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match="'modle'"):
        parse_config({"modle": {}})


@pytest.mark.parametrize(
    "data, where",
    [
        ({"solver": {"max_iter": "many"}}, "solver.max_iter"),
        ({"solver": {"max_iter": 1.5}}, "solver.max_iter"),
        ({"model": {"freeze_bn": "yes"}}, "model.freeze_bn"),
        ({"precision": "fp16"}, "precision"),
        ({"model": {"atrous_rates": [6, "x"]}}, "model.atrous_rates[1]"),
        ({"solver": {"base_lr": -1}}, "solver.base_lr"),
        ({"data": {"class_weights": "inverse"}}, "data.class_weights"),
        ({"data": {"normalization": {"mode": "rgb", "mean": [0, 0, 0]}}}, "data.normalization"),
        ({"data": {"crop_size": [321]}}, "data.crop_size"),
        ({"data": {"color_jitter": 1.0}}, "data.color_jitter"),
    ],
)
def test_bad_values_name_the_key(data, where):
    with pytest.raises(ConfigError, match=where.replace("[", r"\[").replace("]", r"\]")):
        parse_config(data)


def test_types_are_converted():
    cfg = parse_config({"solver": {"base_lr": 1, "max_iter": 10}, "data": {"crop_size": [97, 129]}})
    assert isinstance(cfg.solver.base_lr, float) and cfg.solver.base_lr == 1.0
    assert cfg.data.crop_size == [97, 129]
    # YAML 1.1 reads 1e-3 without a dot as a string: still the number the user meant.
    assert parse_config(yaml.safe_load("solver: {base_lr: 1e-3}")).solver.base_lr == 1e-3


def test_overrides_are_yaml_typed():
    cfg = parse_config(
        {"solver": {"base_lr": 0.1}},
        ["solver.base_lr=2.5e-4", "model.msc_scales=[0.5, 0.75]", "data.val_split=null", "model.freeze_bn=false"],
    )
    assert cfg.solver.base_lr == 2.5e-4
    assert cfg.model.msc_scales == [0.5, 0.75]
    assert cfg.data.val_split is None
    assert cfg.model.freeze_bn is False
    with pytest.raises(ConfigError, match="solver.bse_lr"):
        parse_config({}, ["solver.bse_lr=1"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_config({}, ["solver.base_lr"])


def test_save_load_round_trip(tmp_path):
    cfg = parse_config({"model": {"name": "deeplab_v2_resnet18", "msc_scales": [0.5, 0.75]}, "seed": 7})
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert config_to_dict(again)["model"]["msc_scales"] == [0.5, 0.75]
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_bad_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)


def test_shipped_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert any(n.startswith("camvid") for n in names), names
    assert any(n.startswith("voc12") for n in names), names
    assert len(CONFIGS) >= 8


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    # Every key written in the file is a real option (load_config rejects unknown ones) and the
    # file spells out the whole tree, so a reader sees every value the run uses.
    raw = yaml.safe_load(path.read_text())
    assert set(raw) == set(config_to_dict(cfg)), f"{path.name} leaves top-level keys implicit"
    from deeplab.data import list_datasets
    from deeplab.models import list_models

    assert cfg.model.name in list_models()
    assert cfg.data.dataset in list_datasets(), f"{cfg.data.dataset} is not a known data set"
    assert cfg.solver.momentum == 0.9 and cfg.solver.lr_power == 0.9
    # v1 / v2: the DeepLab paper's Caffe decay; v3+: the TF release's ResNet decay (VainF's too).
    assert cfg.solver.weight_decay == (1e-4 if "deeplabv3" in path.name else 5e-4)


@pytest.mark.parametrize(("name", "crop", "lr"), [("voc12_deeplabv3plus_resnet101.yaml", 513, 0.007),
                                                  ("cityscapes_deeplabv3plus_resnet101.yaml", 769, 0.01)])
def test_v3plus_configs_follow_the_paper(name, crop, lr):
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / name)
    assert cfg.model.name == "deeplab_v3plus_resnet101" and cfg.model.output_stride == 16
    assert cfg.model.freeze_bn is False and cfg.model.decoder_convs == 2
    crop_size = [cfg.data.crop_size] * 2 if isinstance(cfg.data.crop_size, int) else cfg.data.crop_size
    assert crop_size == [crop, crop] and cfg.solver.base_lr == lr
    assert cfg.solver.batch_size * cfg.solver.iter_size == 16
    assert cfg.init_weights.endswith(".pth") and cfg.data.normalization["mode"] == "rgb"


def test_non_utf8_config_names_the_file(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match=r"bin\.yaml is not UTF-8 text"):
        load_config(path)
