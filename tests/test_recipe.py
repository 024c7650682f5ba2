"""The default model's recipe (configs/camvid_default.yaml) runs as one command: every stage of its
schedule (warm-up, loss schedule, output-stride switch, weight averaging at a constant rate, the
final batch-norm re-estimation) on a small subset of real CamVid frames, and a run killed inside
the averaging, after a stage boundary, resumes to the same weights bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from deeplab.engine.config import parse_config
from deeplab.engine.train import TrainingDiverged, stage_settings, train
from deeplab.weights import build_from_weights, read_metadata

_REPO = Path(__file__).resolve().parents[1]


def _subset(camvid_root: Path, out: Path, n: int = 4) -> Path:
    """``n`` real CamVid train frames of three drives (and their labels), downscaled 4x, in the SegNet layout."""
    ids = [line.split()[0].rsplit("/", 1)[1] for line in (camvid_root / "train.txt").read_text().splitlines()]
    picked = [ids[0], ids[len(ids) // 3], ids[2 * len(ids) // 3], ids[-1]][:n]
    for folder in ("train", "trainannot"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for name in picked:
        Image.open(camvid_root / "train" / name).resize((120, 90), Image.BILINEAR).save(out / "train" / name)
        Image.open(camvid_root / "trainannot" / name).resize((120, 90), Image.NEAREST).save(out / "trainannot" / name)
    return out


def _recipe(root: Path, **changes) -> dict:
    cfg = yaml.safe_load((_REPO / "configs" / "camvid_default.yaml").read_text())
    cfg["data"].update(root=str(root), crop_size=65, num_workers=0, class_weights=None)
    cfg["solver"].update(max_iter=8, batch_size=2, warmup_iter=2)
    cfg.update(precision="fp32", device="cpu", checkpoint_interval=1, keep_checkpoints=20, log_interval=1,
               stages=[{"start": 3, "lovasz_weight": 1.0}, {"start": 5, "output_stride": 8}],
               averaging={"start": 4, "interval": 1, "lr": 0.005, "recalibrate_bn": True, "bn_batch_size": 2})
    cfg.update(changes)
    return cfg


def test_the_shipped_recipe_is_one_config():
    cfg = parse_config(yaml.safe_load((_REPO / "configs" / "camvid_default.yaml").read_text()))
    assert cfg.init_weights is None and cfg.model.freeze_bn is None  # from scratch: BN trained
    assert cfg.data.val_split is None  # val is looked at once, for the final model
    assert cfg.averaging.start is not None and cfg.averaging.recalibrate_bn
    assert [stage_settings(cfg, it) for it in (0, cfg.stages[0].start)] == [(16, 0.0), (16, 1.0)]


@pytest.mark.slow
def test_every_stage_runs_and_a_resume_after_the_switch_is_bit_exact(camvid_root, tmp_path, capsys):
    root = _subset(camvid_root, tmp_path / "camvid")
    cfg = parse_config(_recipe(root))
    train(cfg, tmp_path / "full", progress=False)
    log = capsys.readouterr().err
    assert "batch norm: trained (model.freeze_bn: null -> no init_weights)" in log
    assert "iteration 5: output stride 8 from here on (stages)" in log
    assert "averaging: the mean of 4 weights (every 1 iterations from 4)" in log
    assert "batch norm re-estimated on 4 whole training images" in log
    ckpts = tmp_path / "full" / "checkpoints"
    rates = [json.loads(line)["lr"] for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert rates[4:] == [0.005] * 4 and rates[0] < rates[1]  # warm-up, then the constant SWA rate
    assert read_metadata(ckpts / "iter_0000004.safetensors")["model_kwargs"]["output_stride"] == 16
    assert read_metadata(ckpts / "iter_0000006.safetensors")["model_kwargs"]["output_stride"] == 8

    # final = the mean of the weights after iterations 5..8, its BN statistics re-estimated.
    final = load_file(str(tmp_path / "full" / "final.safetensors"))
    snapshots = [load_file(str(ckpts / f"iter_{i:07d}.safetensors")) for i in range(5, 9)]
    for key, value in final.items():
        if "running_" in key or "num_batches" in key:
            continue
        mean = sum(s[key].double() for s in snapshots) / 4
        assert torch.allclose(value.double(), mean, atol=1e-6), key
    bn = [k for k in final if k.endswith("running_var")]
    assert any(not torch.allclose(final[k], snapshots[-1][k]) for k in bn)  # re-estimated, not averaged
    meta = read_metadata(tmp_path / "full" / "final.safetensors")
    assert meta["weight_average"]["count"] == 4 and meta["bn_calibration"]["images"] == 4
    model, _ = build_from_weights(tmp_path / "full" / "final.safetensors")
    assert model.output_stride == 8

    # Killed after the checkpoint at 6 (past the switch, inside the averaging): resume.
    shutil.copytree(tmp_path / "full", tmp_path / "crash")
    for i in (7, 8):
        for f in (tmp_path / "crash" / "checkpoints").glob(f"iter_{i:07d}.*"):
            f.unlink()
    for name in ("final.safetensors", "last.safetensors"):
        (tmp_path / "crash" / name).unlink()
    train(cfg, tmp_path / "crash", resume=True, progress=False)
    for name in ("checkpoints/iter_0000008.safetensors", "final.safetensors"):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "crash" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_frozen_bn_without_weights_is_named_as_the_cause(camvid_root, tmp_path, capsys, monkeypatch):
    """The issue's new-user case: frozen BN on a random network; the log and the error say so."""
    root = _subset(camvid_root, tmp_path / "camvid", n=2)
    cfg = _recipe(root, stages=[], averaging={"start": None})
    cfg["model"]["freeze_bn"] = True
    cfg["solver"].update(max_iter=1)
    import deeplab.engine.train as train_mod

    monkeypatch.setattr(train_mod, "train_step", lambda *a, **k: torch.tensor(float("nan")))
    with pytest.raises(TrainingDiverged, match=r"Batch norm is frozen .* no init_weights were loaded"):
        train(parse_config(cfg), tmp_path / "run", progress=False)
    assert "no init_weights are loaded: batch norm stays at its initial statistics" in capsys.readouterr().err
    np.testing.assert_equal(parse_config(_recipe(root)).model.freeze_bn, None)


def test_package_makes_one_file_whose_card_figures_are_its_own(camvid_root, tmp_path, capsys):
    """`deeplab package RUN`: float16 weights, the run's record, and figures equal to what
    `deeplab eval` measures on the written file; an unfinished run is refused with the fix."""
    from _evaluation_helpers import run_cli

    root = _subset(camvid_root, tmp_path / "camvid")
    train(parse_config(_recipe(root, stages=[], averaging={"start": None, "recalibrate_bn": False})),
          tmp_path / "run", progress=False)
    out = tmp_path / "model.safetensors"
    assert run_cli(["package", str(tmp_path / "run"), "--out", str(out), "--output-stride", "8",
                    "--split", "train", "--data-root", str(root), "--precision", "fp32"]) == 0
    meta = read_metadata(out)
    assert meta["model_kwargs"]["output_stride"] == 8 and meta["record"]["iterations"] == 8
    assert meta["record"]["config"]["model"]["name"] == "deeplab_v3plus_resnet18"
    stored = load_file(str(out))
    assert {t.dtype for k, t in stored.items() if k.endswith(".weight") and t.dim() == 4} == {torch.float16}
    figures = meta["record"]["figures"]
    capsys.readouterr()
    for name, extra in (("plain", []), ("flip", ["--flip"]), ("crf", ["--crf"])):
        assert run_cli(["eval", "--weights", str(out), "--dataset", "camvid", "--data-root", str(root),
                        "--split", "train", "--precision", "fp32", "--json", str(tmp_path / f"{name}.json"),
                        *extra]) == 0
        measured = json.loads((tmp_path / f"{name}.json").read_text())
        assert figures[name]["miou"] == pytest.approx(100 * measured["miou"], abs=0.006), name

    # Stopped before its last iteration: refused, naming the resume command.
    shutil.copytree(tmp_path / "run", tmp_path / "stopped")
    cfg = yaml.safe_load((tmp_path / "stopped" / "config.yaml").read_text())
    cfg["solver"]["max_iter"] = 12
    (tmp_path / "stopped" / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert run_cli(["package", str(tmp_path / "stopped"), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "stopped at iteration 8 of 12" in err and "--resume" in err and not (tmp_path / "x.safetensors").exists()
