"""Checkpoint files: atomic writes, weights-only loading, RNG round trip, clear errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from deeplab.engine import checkpoint as ckpt


def _state():
    torch.manual_seed(0)
    return {"a.weight": torch.randn(3, 4, 2, 2).to(memory_format=torch.channels_last), "a.bias": torch.randn(3),
            "n": torch.tensor(5)}


def test_round_trip_and_weights_only(tmp_path):
    model_state = _state()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, momentum=0.9)
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    opt.step()
    training = {"optimizer": opt.state_dict(), "rng": [ckpt.capture_rng_state()], "best": {"miou": 0.5, "iteration": 3}}
    pt = ckpt.save_training_checkpoint(tmp_path, 7, model_state, training, metadata={"model": "x", "num_classes": 3})
    assert pt.name == "iter_0000007.pt"
    raw = torch.load(pt, weights_only=True)  # nothing but tensors and plain types inside
    assert raw["iteration"] == 7 and raw["weights_file"] == "iter_0000007.safetensors"
    state, weights = ckpt.load_training_state(pt)
    assert weights.keys() == model_state.keys()
    assert all(torch.equal(weights[k], model_state[k]) for k in weights)
    assert torch.equal(state["optimizer"]["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])
    from deeplab.weights.safetensors_io import read_metadata

    assert read_metadata(tmp_path / "iter_0000007.safetensors") == {"model": "x", "num_classes": 3}


def test_keeps_only_the_newest(tmp_path):
    for it in (1, 2, 3, 4):
        ckpt.save_training_checkpoint(tmp_path, it, _state(), {}, keep=2)
    assert [p.name for p in ckpt.find_checkpoints(tmp_path)] == ["iter_0000003.pt", "iter_0000004.pt"]
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["iter_0000003.safetensors", "iter_0000004.safetensors"]


def test_rng_round_trip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    random.random(), np.random.randn(), torch.randn(1)  # move every generator off its seed state
    state = ckpt.capture_rng_state()
    expected = (random.random(), float(np.random.randn()), float(torch.randn(1)))
    random.random(), np.random.randn(7), torch.randn(5)
    ckpt.restore_rng_state(state)
    assert (random.random(), float(np.random.randn()), float(torch.randn(1))) == expected


def test_truncated_files_name_the_file_and_the_previous_one(tmp_path):
    for it in (1, 2):
        ckpt.save_training_checkpoint(tmp_path, it, _state(), {}, keep=5)
    pt = tmp_path / "iter_0000002.pt"
    pt.write_bytes(pt.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_training_state(pt)
    assert str(pt) in str(e.value) and "iter_0000001.pt" in str(e.value)
    # a truncated weights file is caught by its checksum
    w = tmp_path / "iter_0000001.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    with pytest.raises(ckpt.CheckpointError, match="does not match"):
        ckpt.load_training_state(tmp_path / "iter_0000001.pt")


def test_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def fail(p):
        p.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(ckpt.CheckpointError, match="No space left.*previous checkpoint is untouched"):
        ckpt.atomic_write(target, fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
