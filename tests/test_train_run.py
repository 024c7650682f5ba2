"""End-to-end training on the real CamVid data (tiny crops, few iterations).

Each run is a real ``deeplab train`` on ``../shared/data/camvid_segnet`` with a ResNet-18
DeepLab v2 at 97x97 crops. Weights are compared as stored in the run folders' safetensors files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from deeplab.engine import checkpoint as ckpt
from deeplab.engine import train as train_mod
from deeplab.engine.config import parse_config
from deeplab.engine.train import TrainingDiverged, TrainingError, train

_REPO = Path(__file__).resolve().parents[1]


def _config(camvid_root: Path, **changes) -> dict:
    cfg = yaml.safe_load((_REPO / "configs" / "camvid_resnet18.yaml").read_text())
    cfg["data"].update(root=str(camvid_root), crop_size=97, class_weights=None, num_workers=0, val_split=None)
    cfg["solver"].update(max_iter=4, batch_size=2, iter_size=1, warmup_iter=0)
    cfg["model"]["output_stride"] = 16  # 4x cheaper than 8 on these shared CPUs
    cfg.update(checkpoint_interval=2, val_interval=0, log_interval=1)
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return cfg


def _write(tmp_path: Path, cfg: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run_cli(args: list[str], *, torchrun: int = 0, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1" if torchrun else os.environ.get("OMP_NUM_THREADS", "2"))
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "-m", "deeplab.cli", *args]
    else:
        cmd = [sys.executable, "-m", "deeplab.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=_REPO)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


@pytest.mark.slow
def test_training_lowers_the_loss_on_real_camvid(camvid_root, tmp_path, capsys):
    from deeplab.data import build_dataset
    from deeplab.data.transforms import normalize_image
    from deeplab.engine.losses import msc_cross_entropy
    from deeplab.models import build_model

    cfg = parse_config(_config(camvid_root, **{"solver.max_iter": 12, "solver.batch_size": 4, "solver.base_lr": 0.002,
                                               "checkpoint_interval": 0, "data.val_split": "val",
                                               "data.val_max_images": 2, "val_interval": 0}))
    # A fixed batch: the first 4 training images, centre 161x161 crops.
    ds = build_dataset("camvid", camvid_root, "train")
    imgs, masks = zip(*(ds[i] for i in range(4)))
    x = torch.stack([normalize_image(np.ascontiguousarray(im[100:261, 160:321]), cfg.data.normalization) for im in imgs])
    y = torch.from_numpy(np.stack([m[100:261, 160:321] for m in masks]).astype(np.int64))

    def fixed_batch_loss(model) -> float:
        model.train()  # batch statistics: BN's running averages are still young after 12 steps
        with torch.no_grad():
            return float(msc_cross_entropy(model(x), y))

    torch.manual_seed(cfg.seed)
    model = build_model("deeplab_v2_resnet18", num_classes=11, output_stride=16)
    before = fixed_batch_loss(model)
    summary = train(cfg, tmp_path / "run", progress=False)
    model.load_state_dict(_weights(tmp_path / "run" / "last.safetensors"))
    after = fixed_batch_loss(model)
    print(f"fixed-batch loss before {before:.4f} after {after:.4f}")
    assert after < 0.9 * before, (before, after)
    # the run folder: resolved config, metrics log, final validation with best checkpoint
    assert parse_config(yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())) == cfg
    lines = [yaml.safe_load(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [rec["iteration"] for rec in lines if "loss" in rec][-1] == 12
    assert any("val" in rec and 0 <= rec["val"]["miou"] <= 1 for rec in lines)
    assert (tmp_path / "run" / "best.safetensors").is_file() and summary["best_miou"] is not None
    # The first validation is the best so far, and the log says so (not the -1 it starts from).
    val_line = f"val mIoU {100 * summary['best_miou']:.2f}% (best {100 * summary['best_miou']:.2f}% at iteration 12)"
    assert val_line in capsys.readouterr().err
    from deeplab.weights.safetensors_io import read_metadata

    meta = read_metadata(tmp_path / "run" / "last.safetensors")
    assert meta["model"] == "deeplab_v2_resnet18" and meta["num_classes"] == 11
    assert meta["class_names"][0].lower() == "sky" and len(meta["palette"]) == 11


@pytest.mark.slow
def test_resume_after_a_crash_gives_the_uninterrupted_weights(camvid_root, tmp_path):
    """Run 4 iterations (checkpoints at 2 and 4); then drop everything after the checkpoint at 2,
    as a crash would, and resume in a fresh process: the final weights must be identical."""
    import shutil

    cfg = _config(camvid_root, **{"data.num_workers": 1})
    cfg["data"]["class_weights"] = [1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 2.0, 2.0]
    path = _write(tmp_path, cfg)
    train(parse_config(cfg), tmp_path / "full", progress=False)
    full = _weights(tmp_path / "full" / "checkpoints" / "iter_0000004.safetensors")
    two = _weights(tmp_path / "full" / "checkpoints" / "iter_0000002.safetensors")
    assert _max_diff(two, full) > 1e-4  # the run really moved after the checkpoint at 2

    shutil.copytree(tmp_path / "full", tmp_path / "crash")
    for f in (tmp_path / "crash" / "checkpoints").glob("iter_0000004.*"):
        f.unlink()
    (tmp_path / "crash" / "last.safetensors").unlink()
    res = _run_cli(["train", str(path), "--out", str(tmp_path / "crash"), "--resume", "--no-progress"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr and "iter_0000002.pt" in res.stderr
    resumed = _weights(tmp_path / "crash" / "checkpoints" / "iter_0000004.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full), _max_diff(full, resumed)
    # the log of the killed run was cut back to the checkpoint, then continued
    its = [yaml.safe_load(x)["iteration"] for x in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert its == [1, 2, 3, 4]


@pytest.mark.slow
def test_iter_size_and_ddp_equal_one_big_batch(camvid_root, tmp_path):
    """Global batch 4 as 4 x 1 (one process), 2 x iter_size 2, and 2 processes x 2 (gloo):
    the same weights after 2 steps, augmentation on (it is seeded by the sample stream).
    fp32 and frozen batch norm: batch statistics would differ between the splits otherwise."""
    # Frozen BN of a from-scratch net is the identity: activations are large, so a small rate.
    base = {"precision": "fp32", "model.freeze_bn": True, "solver.max_iter": 2, "checkpoint_interval": 0,
            "data.val_split": None, "solver.base_lr": 1e-5}
    big = _config(camvid_root, **base, **{"solver.batch_size": 4})
    acc = _config(camvid_root, **base, **{"solver.batch_size": 2, "solver.iter_size": 2})
    train(parse_config(big), tmp_path / "big", progress=False)
    train(parse_config(acc), tmp_path / "acc", progress=False)
    w_big = _weights(tmp_path / "big" / "last.safetensors")
    w_acc = _weights(tmp_path / "acc" / "last.safetensors")
    print("iter_size vs big batch:", _max_diff(w_big, w_acc))
    assert _max_diff(w_big, w_acc) < 2e-5

    ddp = _config(camvid_root, **base, **{"solver.batch_size": 2})
    path = _write(tmp_path, ddp, "ddp.yaml")
    res = _run_cli(["train", str(path), "--out", str(tmp_path / "ddp"), "--no-progress"], torchrun=2)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    w_ddp = _weights(tmp_path / "ddp" / "last.safetensors")
    print("ddp vs big batch:", _max_diff(w_big, w_ddp))
    assert _max_diff(w_big, w_ddp) < 2e-5
    # the weights did move from the initialisation, so the comparisons above can fail
    from deeplab.models import build_model, freeze_batchnorm

    torch.manual_seed(0)
    init = freeze_batchnorm(build_model("deeplab_v2_resnet18", num_classes=11, output_stride=16)).state_dict()
    print("trained vs init:", _max_diff(w_big, init))
    assert _max_diff(w_big, init) > 1e-4


def test_divergence_stops_with_the_last_good_checkpoint(camvid_root, tmp_path, monkeypatch, capsys):
    real = train_mod.msc_cross_entropy
    calls = {"n": 0}

    def exploding(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 3 else loss  # iteration 2 (0-based) goes NaN

    monkeypatch.setattr(train_mod, "msc_cross_entropy", exploding)
    cfg = parse_config(_config(camvid_root, **{"checkpoint_interval": 1, "solver.max_iter": 3}))
    with pytest.raises(TrainingDiverged) as e:
        train(cfg, tmp_path / "run", progress=False)
    msg = str(e.value)
    assert "iteration 2" in msg and "iter_0000002.pt" in msg and "nan" in msg
    state, weights = ckpt.load_training_state(tmp_path / "run" / "checkpoints" / "iter_0000002.pt")
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert not (tmp_path / "run" / "checkpoints" / "iter_0000003.pt").exists()
    # the CLI turns it into an error line and exit status 3 (NaN from the first iteration on)
    from deeplab.cli import main

    calls["n"] = 10
    assert main(["train", str(_write(tmp_path, _config(camvid_root))), "--out", str(tmp_path / "cli"),
                 "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "error: the loss is nan at iteration 0" in err and "no checkpoint was written yet" in err
    assert "Traceback" not in err


def test_truncated_checkpoint_and_existing_run_errors(camvid_root, tmp_path, capsys):
    cfg = _config(camvid_root, **{"solver.max_iter": 2, "checkpoint_interval": 1})
    path = _write(tmp_path, cfg)
    train(parse_config(cfg), tmp_path / "run", progress=False)
    newest = tmp_path / "run" / "checkpoints" / "iter_0000002.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 3])
    from deeplab.cli import main

    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "iter_0000002.pt" in err and "truncated" in err and "--resume" in err and "iter_0000001.pt" in err
    assert "Traceback" not in err
    # starting a new run over an old one is refused
    with pytest.raises(TrainingError, match="--resume"):
        train(parse_config(cfg), tmp_path / "run", progress=False)
    # a bad --set key is a config error naming it
    assert main(["train", str(path), "--out", str(tmp_path / "x"), "--set", "solver.bse_lr=1"]) == 2
    assert "solver.bse_lr" in capsys.readouterr().err


def test_full_disk_keeps_the_previous_checkpoint(camvid_root, tmp_path, monkeypatch):
    cfg = parse_config(_config(camvid_root, **{"solver.max_iter": 2, "checkpoint_interval": 1}))
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if "iter_0000002" in str(f):
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ckpt.CheckpointError, match="No space left"):
        train(cfg, tmp_path / "run", progress=False)
    folder = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpt.find_checkpoints(folder)] == ["iter_0000001.pt"]
    state, _ = ckpt.load_training_state(folder / "iter_0000001.pt")
    assert state["iteration"] == 1
    assert not [p for p in folder.iterdir() if ".tmp" in p.name]


def test_tensorboard_missing_is_a_clear_error(camvid_root, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    cfg = parse_config(_config(camvid_root, tensorboard=True))
    with pytest.raises(TrainingError, match=r"pip install 'deeplab\[tensorboard\]'"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before writing anything


@pytest.mark.slow
def test_named_class_weights_come_from_the_training_masks(camvid_root, tmp_path):
    """data.class_weights names a weighting of the masks' class frequencies; the run folder keeps
    it with its kind, and weights of another kind found there are not reused."""
    import json

    from deeplab.data import build_dataset
    from deeplab.data.balance import (class_frequencies, enet_weights, median_frequency_weights,
                                      sqrt_median_frequency_weights)

    freqs = class_frequencies(build_dataset("camvid", camvid_root, "train"))
    cases = [  # (kind, file found in the run folder, weights the run must use)
        ("median_freq", None, median_frequency_weights(freqs)),
        ("enet", {"kind": "median_freq", "weights": [1.0] * 11}, enet_weights(freqs)),  # another kind: recomputed
        ("median_freq", {"weights": [1.0] * 11}, [1.0] * 11),  # the old format held median-frequency weights
        ("sqrt_median_freq", {"kind": "median_freq", "weights": [1.0] * 11}, sqrt_median_frequency_weights(freqs)),
    ]
    for i, (kind, found, expected) in enumerate(cases):
        out = tmp_path / f"run{i}"
        out.mkdir()
        if found is not None:
            (out / "class_weights.json").write_text(json.dumps(found))
        cfg = _config(camvid_root, **{"data.class_weights": kind, "solver.max_iter": 1, "checkpoint_interval": 0})
        train(parse_config(cfg), out, progress=False)
        saved = json.loads((out / "class_weights.json").read_text())
        assert saved.get("kind", "median_freq") == kind
        np.testing.assert_allclose(saved["weights"], expected, rtol=1e-6)
    # A list given by hand is recorded too: the packaging and logit-adjustment scripts read it there.
    given = [0.5 + 0.25 * c for c in range(11)]
    cfg = _config(camvid_root, **{"data.class_weights": given, "solver.max_iter": 1, "checkpoint_interval": 0})
    train(parse_config(cfg), tmp_path / "run_list", progress=False)
    assert json.loads((tmp_path / "run_list" / "class_weights.json").read_text()) == {"kind": "list", "weights": given}
    # ENet's weights are bounded by 1 / ln(1.02); the rarest class (bicyclist) weighs most in both.
    assert enet_weights(freqs).max() <= 1 / np.log(1.02)
    assert int(np.argmax(enet_weights(freqs))) == int(np.argmax(median_frequency_weights(freqs))) == 10
    # The list the from-scratch CamVid run of docs/camvid_model.md passes by hand (4 decimals) is this weighting.
    np.testing.assert_allclose(sqrt_median_frequency_weights(freqs), [0.5286, 0.4493, 2.1884, 0.3861, 1.0, 0.6508,
                                                                    1.9612, 1.4071, 0.8883, 2.5268, 2.9697], atol=6e-5)


def _tiny_camvid(root: Path, bad: str | None = None, split: str = "train") -> Path:
    """Two 72x96 CamVid-layout samples (SPLIT/, SPLITannot/); ``bad="size"`` halves the second mask,
    ``bad="label"`` puts label 40 into it."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for folder in (split, f"{split}annot"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)).save(root / split / f"s{i}.png")
        mask = rng.integers(0, 11, (72, 96), dtype=np.uint8)
        if i == 1 and bad == "size":
            mask = mask[::2, ::2]
        elif i == 1 and bad == "label":
            mask[0, 0] = 40
        Image.fromarray(mask).save(root / f"{split}annot" / f"s{i}.png")
    return root


def _tiny_cfg(root: Path, **changes) -> dict:
    return _config(root, **{"data.crop_size": 65, "solver.batch_size": 2, "solver.max_iter": 1,
                            "checkpoint_interval": 1, "device": "cpu", **changes})


@pytest.mark.parametrize("bad, workers", [("size", 0), ("size", 1), ("label", 0)])
def test_bad_training_sample_is_one_error_line(tmp_path, capsys, bad, workers):
    from deeplab.cli import main

    root = _tiny_camvid(tmp_path / "data", bad)
    cfg = _write(tmp_path, _tiny_cfg(root, **{"data.num_workers": workers}))
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    line = err[err.index("error:"):]
    named = root / ("trainannot" if bad == "label" else "train") / "s1.png"  # the file to fix
    assert line.startswith(f"error: training data: {named}: ") and line.count("\n") == 1, err
    assert "data.options: {skip_bad: true}" in line
    assert "Traceback" not in err and "DataLoader worker" not in err
    # ... and the option the message names skips the sample
    cfg = _write(tmp_path, _tiny_cfg(root, **{"data.options": {"skip_bad": True}}))
    with pytest.warns(UserWarning, match="skipping bad sample"):
        assert main(["train", str(cfg), "--out", str(tmp_path / "run2"), "--no-progress"]) == 0


def test_bad_validation_sample_is_one_error_line(tmp_path, capsys):
    from deeplab.cli import main

    root = _tiny_camvid(_tiny_camvid(tmp_path / "data"), "size", split="val")
    cfg = _write(tmp_path, _tiny_cfg(root, **{"data.val_split": "val", "checkpoint_interval": 0}))
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"error: validation data: {root / 'val' / 's1.png'}: image is 72x96" in err
    assert "Traceback" not in err


def test_resume_from_a_weights_file_or_another_model_is_a_short_error(tmp_path, capsys):
    from deeplab.cli import main

    root = _tiny_camvid(tmp_path / "data")
    cfg = _tiny_cfg(root, **{"solver.max_iter": 2})
    path = _write(tmp_path, cfg)
    run = tmp_path / "run"
    assert main(["train", str(path), "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    folder = run / "checkpoints"
    weights = folder / "iter_0000002.safetensors"
    assert main(["train", str(path), "--out", str(run), "--resume", str(weights), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is a weights file" in err and f"--resume {folder / 'iter_0000002.pt'}" in err
    assert "no earlier checkpoint" not in err
    # last.safetensors has no iter_N.pt twin: the way to reuse its weights is init_weights
    assert main(["train", str(path), "--out", str(run), "--resume", str(run / "last.safetensors")]) == 2
    assert "init_weights:" in capsys.readouterr().err
    # a checkpoint under another name still offers the real ones
    (folder / "backup.pt").write_bytes(b"junk")
    assert main(["train", str(path), "--out", str(run), "--resume", str(folder / "backup.pt")]) == 2
    assert "--resume " + str(folder / "iter_0000002.pt") in capsys.readouterr().err

    saved = (run / "config.yaml").read_text()
    other = _write(tmp_path, {**cfg, "model": {**cfg["model"], "name": "deeplab_v2_resnet34"}}, "other.yaml")
    assert main(["train", str(other), "--out", str(run), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "does not fit model 'deeplab_v2_resnet34'" in err and "'deeplab_v2_resnet18'" in err
    assert "missing key(s)" in err and len(err) < 1000, err  # a few names and a count, not hundreds
    assert (run / "config.yaml").read_text() == saved  # the refused resume left the run's config
