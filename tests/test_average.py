"""Weight averaging (`deeplab.weights.average`, `deeplab average-weights`)."""

from __future__ import annotations

import pytest
import torch

from _evaluation_helpers import run_cli, tiny_weights
from deeplab.weights import build_from_weights, half_state_dict, read_metadata, save_state_dict
from deeplab.weights.average import average_weight_files
from deeplab.weights.safetensors_io import read_safetensors


@pytest.fixture
def three(tmp_path):
    return [tiny_weights(tmp_path / f"w{seed}.safetensors", seed=seed) for seed in (0, 1, 2)]


def test_the_average_is_the_element_wise_mean(three):
    states = [read_safetensors(p)[0] for p in three]
    for i, s in enumerate(states):  # distinct counters show which file the integer tensors come from
        for key in s:
            if key.endswith("num_batches_tracked"):
                s[key].fill_(10 * (i + 1))
    for p, s in zip(three, states):  # as deeplab calibrate-bn and the packaging script leave them
        save_state_dict(s, p, {**read_metadata(p), "bn_calibration": {"split": "train"}, "record": {"miou": 0.5}})
    avg, meta = average_weight_files(three)
    assert avg.keys() == states[0].keys()
    for key, value in avg.items():
        if key.endswith("num_batches_tracked"):
            assert int(value) == 30  # the last file's
            continue
        brute = sum(s[key].double() for s in states) / 3  # independent of the accumulation order
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, brute.float(), rtol=0, atol=1e-6)
    assert meta["weight_average"] == {"count": 3, "sources": ["w0.safetensors", "w1.safetensors", "w2.safetensors"]}
    assert meta["model"] == "deeplab_v2_resnet18" and meta["num_classes"] == 4
    assert "bn_calibration" not in meta and "record" not in meta  # true of one input, not of the mean
    # The seeds differ, so the mean is none of its inputs.
    key = next(k for k in avg if k.endswith("conv1.weight"))
    assert all(not torch.equal(avg[key], s[key]) for s in states)


def test_a_file_averaged_with_itself_is_unchanged(three):
    avg, _ = average_weight_files([three[1]] * 3)
    original = read_safetensors(three[1])[0]
    for key, value in original.items():
        assert torch.equal(avg[key], value), key


def test_float16_files_stay_float16_with_float32_statistics(three, tmp_path):
    halves = []
    for p in three[:2]:
        state, meta = read_safetensors(p)
        halves.append(save_state_dict(half_state_dict(state), tmp_path / f"h_{p.name}", meta))
    avg, _ = average_weight_files(halves)
    ref = [read_safetensors(p)[0] for p in halves]
    for key, value in avg.items():
        assert value.dtype == ref[0][key].dtype, key
        if value.is_floating_point():
            brute = (ref[0][key].double() + ref[1][key].double()) / 2
            torch.testing.assert_close(value.double(), brute.to(value.dtype).double(), rtol=0, atol=0)
    assert any(v.dtype == torch.float16 for v in avg.values())
    assert avg[next(k for k in avg if k.endswith("running_var"))].dtype == torch.float32


def test_cli_writes_a_file_that_loads_strictly(three, tmp_path, capsys):
    out = tmp_path / "avg.safetensors"
    assert run_cli(["average-weights", *map(str, three), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "averaged 3 files" in printed and "calibrate-bn" in printed
    model, meta = build_from_weights(out)  # strict: every tensor present, every shape right
    assert meta["weight_average"]["count"] == 3
    expected, _ = average_weight_files(three)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_bad_inputs_are_refused_with_the_file_named(three, tmp_path, capsys):
    out = tmp_path / "avg.safetensors"

    def fails(args: list[str], *words: str) -> None:
        assert run_cli(["average-weights", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        for w in words:
            assert w in err, (w, err)
        assert not out.exists()

    fails([str(three[0])], "at least two")
    other = tiny_weights(tmp_path / "five.safetensors", num_classes=5)
    fails([str(three[0]), str(other)], "five.safetensors", "shape", "one network")
    state, meta = read_safetensors(three[0])
    renamed = save_state_dict(state, tmp_path / "renamed.safetensors", {**meta, "model": "deeplab_v2_resnet34"})
    fails([str(three[0]), str(renamed)], "renamed.safetensors", "deeplab_v2_resnet34")
    fewer = save_state_dict(dict(list(state.items())[:-3]), tmp_path / "fewer.safetensors", meta)
    fails([str(three[0]), str(fewer)], "fewer.safetensors", "different tensors")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(three[1].read_bytes()[:5000])
    fails([str(three[0]), str(truncated)], "cut.safetensors", "not a readable safetensors")
    torch.save(state, tmp_path / "w.pth")
    fails([str(three[0]), str(tmp_path / "w.pth")], "w.pth", "deeplab convert")
    fails([str(three[0]), str(tmp_path / "missing.safetensors")], "missing.safetensors")
    assert run_cli(["average-weights", str(three[0]), str(three[1]), "--out", str(three[1])]) == 2
    assert "one of the inputs" in capsys.readouterr().err
