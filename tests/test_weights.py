"""Weights: safetensors save/load with metadata, PyTorch files (project and kazuto1011 layouts),
mismatch errors, the convert CLI and the default-weights lookup."""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from deeplab.models import build_model
from deeplab.weights import (
    WeightsMismatchError,
    build_from_weights,
    default_weights_path,
    load_weights,
    read_metadata,
    save_weights,
    write_caffemodel,
)
from deeplab.weights.safetensors_io import (
    INT8_SCALE_SUFFIX,
    dequantize_state_dict,
    int8_state_dict,
    read_safetensors,
)


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every tensor distinctive values (BN statistics included) so that a misplaced
    tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "running_var" in key else
                        torch.randn(t.shape, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module")
def small():
    return _randomize(build_model("deeplab_v2_resnet18", num_classes=5).eval())


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


# --------------------------------------------------------------------------------------------
# safetensors


def test_safetensors_metadata_round_trip(tmp_path, small):
    meta = {
        "class_names": ["sky", "road", "car", "tree", "person"],
        "palette": np.array([[0, 0, 0], [128, 64, 128], [64, 0, 128], [128, 128, 0], [64, 64, 0]], np.uint8),
        "normalization": {"mode": "rgb", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "crf": {"bi_w": 4, "bi_xy_std": 67, "bi_rgb_std": 3, "pos_w": 3, "pos_xy_std": 1},
        "miou": 0.5123,
        "dataset": "camvid",
    }
    path = save_weights(small, tmp_path / "m.safetensors", meta)
    assert not list(tmp_path.glob("*.tmp")), "temp file left behind"
    got = read_metadata(path)
    assert got["model"] == "deeplab_v2_resnet18" and got["num_classes"] == 5
    assert got["class_names"] == meta["class_names"]
    assert got["palette"] == meta["palette"].tolist()
    assert got["normalization"] == meta["normalization"] and got["crf"] == meta["crf"]
    assert got["miou"] == 0.5123 and got["dataset"] == "camvid"
    assert got["model_kwargs"] == {"output_stride": 8, "atrous_rates": [6, 12, 18, 24], "msc_scales": None}
    # The header really holds JSON strings (what other tools see).
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        raw = f.metadata()
    assert json.loads(raw["class_names"]) == meta["class_names"]

    model, meta2 = build_from_weights(path)
    _same_state(model, small)
    x = torch.randn(1, 3, 33, 41)
    with torch.no_grad():
        torch.testing.assert_close(model(x), small(x))
    assert meta2["class_names"] == meta["class_names"]
    # Overrides change how the same weights run; unknown ones are refused.
    model16, _ = build_from_weights(path, output_stride=16)
    assert model16.output_stride == 16
    with pytest.raises(TypeError, match="unknown option"):
        build_from_weights(path, outputstride=16)


def test_save_refuses_inconsistent_metadata(tmp_path, small):
    with pytest.raises(ValueError, match="class_names has 2 entries"):
        save_weights(small, tmp_path / "bad.safetensors", {"class_names": ["a", "b"]})
    with pytest.raises(ValueError, match="num_classes=7"):
        save_weights(small, tmp_path / "bad.safetensors", {"num_classes": 7})
    assert not list(tmp_path.iterdir())


def test_wrong_class_count_names_keys_and_shapes(tmp_path, small):
    path = save_weights(small, tmp_path / "five.safetensors")
    other = build_model("deeplab_v2_resnet18", num_classes=3)
    with pytest.raises(WeightsMismatchError) as e:
        load_weights(other, path)
    msg = str(e.value)
    assert "aspp.branches.0.weight: file (5, 512, 3, 3) vs model (3, 512, 3, 3)" in msg
    assert "class count" in msg
    # strict=False keeps the backbone and leaves the classifier alone.
    before = other.aspp.branches[0].weight.detach().clone()
    result = load_weights(other, path, strict=False)
    assert "aspp.branches.0.weight" in result.skipped_shape
    torch.testing.assert_close(other.aspp.branches[0].weight, before)
    torch.testing.assert_close(other.backbone.layer4[1].conv2.weight, small.backbone.layer4[1].conv2.weight)


def test_wrong_model_names_missing_and_unexpected_keys(tmp_path, small):
    path = save_weights(small, tmp_path / "r18.safetensors")
    other = build_model("deeplab_v2_resnet34", num_classes=5)  # more blocks than ResNet-18
    with pytest.raises(WeightsMismatchError, match=r"missing key\(s\), first: \['backbone\.layer1\.2\.conv1\.weight'"):
        load_weights(other, path)
    vgg = build_model("deeplab_v1_largefov_vgg16", num_classes=5)
    with pytest.raises(WeightsMismatchError, match=r"missing key\(s\), first: \['backbone\.conv1_1\.weight'.*"
                                                   r"unexpected key\(s\), first: \['aspp\.branches\.0\.bias'"):
        load_weights(vgg, path)


def test_msc_model_loads_single_scale_weights(tmp_path, small):
    path = save_weights(small, tmp_path / "m.safetensors")
    msc = build_model("deeplab_v2_resnet18", num_classes=5, msc_scales=(0.5, 0.75))
    load_weights(msc, path)
    torch.testing.assert_close(msc.aspp.branches[2].bias, small.aspp.branches[2].bias)
    meta = read_metadata(save_weights(msc, tmp_path / "msc.safetensors"))
    assert meta["model_kwargs"]["msc_scales"] == [0.5, 0.75]


# --------------------------------------------------------------------------------------------
# PyTorch files


def test_pth_in_project_layout_and_containers(tmp_path, small):
    state = small.state_dict()
    # (A plain state dict is what the kazuto1011 test saves.)
    variants = {
        "wrapped.pt": {"state_dict": state, "epoch": 3, "best_miou": 0.61},
        "ckpt.pth.tar": {"model": OrderedDict(("module." + k, v) for k, v in state.items()), "iteration": 100},
    }
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        model = build_model("deeplab_v2_resnet18", num_classes=5)
        result = load_weights(model, tmp_path / name)
        assert result.layout == "deeplab", name
        _same_state(model, small)


class _NotATensor:
    pass


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pth_with_pickled_object_is_refused(tmp_path, small):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": small.state_dict(), "extra": _NotATensor()}, path)
    model = build_model("deeplab_v2_resnet18", num_classes=5)
    with pytest.raises(ValueError, match=r"evil\.pth: refused to unpickle"):
        load_weights(model, path)
    # A raw pickle that would run code on load: never executed.
    payload = tmp_path / "payload.pt"
    marker = tmp_path / "pwned"
    payload.write_bytes(pickle.dumps(_Exploit(str(marker))))
    with pytest.raises(ValueError, match="payload.pt"):
        load_weights(model, payload)
    assert not marker.exists()


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_unreadable_files(tmp_path, small):
    model = build_model("deeplab_v2_resnet18", num_classes=5)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match="broken.safetensors"):
        load_weights(model, bad)
    with pytest.raises(ValueError, match=r"unknown weights format"):
        load_weights(model, tmp_path / "weights.h5")
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_weights(model, tmp_path / "nothere.pth")


# kazuto1011/deeplab-pytorch DeepLabV2_ResNet101_MSC, written from its module structure:
# MSC(base=DeepLabV2(layer1=_Stem(conv1=_ConvBnReLU(conv, bn), pool),
#                    layer2..layer5=_ResLayer(block1..blockN=_Bottleneck(reduce, conv3x3, increase, shortcut)),
#                    aspp=_ASPP(c0..c3 = Conv2d 3x3 with bias)))
def _kazuto_state(num_classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv_bn_relu(prefix, in_ch, out_ch, k):
        sd[f"{prefix}.conv.weight"] = torch.randn(out_ch, in_ch, k, k, generator=g)
        sd[f"{prefix}.bn.weight"] = torch.randn(out_ch, generator=g)
        sd[f"{prefix}.bn.bias"] = torch.randn(out_ch, generator=g)
        sd[f"{prefix}.bn.running_mean"] = torch.randn(out_ch, generator=g)
        sd[f"{prefix}.bn.running_var"] = torch.rand(out_ch, generator=g) + 0.5
        sd[f"{prefix}.bn.num_batches_tracked"] = torch.tensor(0)

    conv_bn_relu("base.layer1.conv1", 3, 64, 7)
    ch = [64 * 2**p for p in range(6)]  # 64 .. 2048
    n_blocks = [3, 4, 23, 3]
    in_ch = ch[0]
    for layer, (n, out_ch) in enumerate(zip(n_blocks, ch[2:]), start=2):
        mid = out_ch // 4
        for b in range(1, n + 1):
            p = f"base.layer{layer}.block{b}"
            conv_bn_relu(f"{p}.reduce", in_ch if b == 1 else out_ch, mid, 1)
            conv_bn_relu(f"{p}.conv3x3", mid, mid, 3)
            conv_bn_relu(f"{p}.increase", mid, out_ch, 1)
            if b == 1:
                conv_bn_relu(f"{p}.shortcut", in_ch, out_ch, 1)
        in_ch = out_ch
    for i in range(4):
        sd[f"base.aspp.c{i}.weight"] = torch.randn(num_classes, 2048, 3, 3, generator=g) * 0.01
        sd[f"base.aspp.c{i}.bias"] = torch.randn(num_classes, generator=g)
    return sd


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def resnet101():
    return build_model("deeplab_v2_resnet101", num_classes=21)


@pytest.fixture(scope="module")
def kazuto_sd():
    return _kazuto_state(21)


def test_kazuto1011_state_dict_loads_strictly(tmp_path, resnet101, kazuto_sd):
    sd = kazuto_sd
    path = tmp_path / "deeplabv2_resnet101_msc-vocaug-20000.pth"
    torch.save(sd, path)
    result = load_weights(resnet101, path, strict=True)
    assert result.layout == "kazuto1011"
    state = resnet101.state_dict()
    # Spot checks from the two networks' definitions: kazuto's layer{k} is Caffe res{k}, the
    # project's layer{k-1}; block{n} counts from 1; reduce / conv3x3 / increase / shortcut.
    pairs = {
        "base.layer1.conv1.conv.weight": "backbone.stem.conv1.weight",
        "base.layer1.conv1.bn.running_var": "backbone.stem.bn1.running_var",
        "base.layer3.block1.reduce.conv.weight": "backbone.layer2.0.conv1.weight",
        "base.layer3.block1.shortcut.bn.running_mean": "backbone.layer2.0.downsample.1.running_mean",
        "base.layer4.block23.conv3x3.conv.weight": "backbone.layer3.22.conv2.weight",
        "base.layer5.block3.increase.bn.bias": "backbone.layer4.2.bn3.bias",
        "base.aspp.c3.weight": "aspp.branches.3.weight",
    }
    for theirs, ours in pairs.items():
        torch.testing.assert_close(state[ours], sd[theirs], rtol=0, atol=0, msg=ours)
    # ... and the whole file is a bijection onto the model's tensors (values are all distinct).
    by_digest = {_digest(v): k for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert len(by_digest) == len([k for k in sd if not k.endswith("num_batches_tracked")])
    hits = {by_digest.get(_digest(v)) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert None not in hits and hits == set(by_digest.values())
    # The block stride of res3 sits on kazuto's `reduce` (the first 1x1) in both networks.
    assert resnet101.backbone.layer2[0].conv1.stride == (2, 2)


def test_kazuto1011_other_class_count_fails(tmp_path, resnet101, kazuto_sd):
    sd = dict(kazuto_sd)
    for i in range(4):  # COCO-Stuff 164k: 182 classes
        sd[f"base.aspp.c{i}.weight"] = torch.zeros(182, 2048, 3, 3)
        sd[f"base.aspp.c{i}.bias"] = torch.zeros(182)
    path = tmp_path / "deeplabv2_resnet101_msc-cocostuff164k-100000.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsMismatchError, match=r"kazuto1011 layout.*aspp\.branches\.0\.weight: file \(182, 2048, 3, 3\) vs model \(21, 2048, 3, 3\)"):
        load_weights(resnet101, path)


# --------------------------------------------------------------------------------------------
# convert CLI and the default weights


def _cli(module_name: str, argv: list[str]) -> int:
    import importlib

    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def test_convert_cli_end_to_end(tmp_path, small, capsys):
    src = tmp_path / "model.pth"
    torch.save({"state_dict": small.state_dict()}, src)
    names = tmp_path / "classes.txt"
    names.write_text("sky\nroad\ncar\n\ntree\nperson\n")
    dst = tmp_path / "out.safetensors"
    from deeplab.cli import main  # through the real subcommand table

    assert main(["convert", str(src), str(dst), "--model", "deeplab_v2_resnet18", "--class-names", str(names)]) == 0
    assert "5 classes" in capsys.readouterr().out
    model, meta = build_from_weights(dst)
    _same_state(model, small)
    assert meta["class_names"] == ["sky", "road", "car", "tree", "person"]
    assert meta["source"] == {"file": "model.pth", "layout": "deeplab"}

    # Wrong model: exit status 1 and an error naming keys, no traceback, no output file.
    dst2 = tmp_path / "wrong.safetensors"
    assert _cli("deeplab.cli.convert", [str(src), str(dst2), "--model", "deeplab_v2_resnet34"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "backbone.layer1.2.conv1.weight" in err and "Traceback" not in err
    assert not dst2.exists()


def test_convert_half_keeps_bn_statistics_float32(tmp_path, small):
    """--half: float16 weights, about half the file; BN statistics (here ~4e7, beyond float16's
    range, as a from-scratch stem's running variance is) stay float32 and load exactly."""
    with torch.no_grad():
        small.backbone.stem.bn1.running_var.fill_(4e7)
    src = tmp_path / "model.safetensors"
    save_weights(small, src)
    dst = tmp_path / "half.safetensors"
    assert _cli("deeplab.cli.convert", [str(src), str(dst), "--model", "deeplab_v2_resnet18", "--half"]) == 0
    state, _ = read_safetensors(dst)
    assert state["backbone.stem.conv1.weight"].dtype == torch.float16
    assert state["backbone.stem.bn1.running_var"].dtype == torch.float32
    assert dst.stat().st_size < 0.6 * src.stat().st_size
    model, _ = build_from_weights(dst)
    loaded = model.state_dict()
    assert torch.equal(loaded["backbone.stem.bn1.running_var"], small.state_dict()["backbone.stem.bn1.running_var"])
    w, w0 = loaded["backbone.stem.conv1.weight"], small.state_dict()["backbone.stem.conv1.weight"]
    assert float((w - w0).abs().max()) <= 1e-3 * float(w0.abs().max())


def test_int8_state_dict_rounding_bound_and_what_stays_float():
    """Each weight comes back within half its output channel's scale (max|w| / 127); a zero
    channel comes back zero; biases go float16 as with --half and BN statistics stay float32."""
    g = torch.Generator().manual_seed(3)
    # Channels 100x apart in magnitude: one scale per tensor would round the small ones to ~0.
    w = torch.randn(6, 4, 3, 3, generator=g) * torch.tensor([1e-3, 1e-2, 0.1, 1.0, 10.0, 0.0])[:, None, None, None]
    state = {"conv.weight": w, "conv.bias": torch.randn(6, generator=g),
             "bn.running_var": torch.full((6,), 4e7), "bn.num_batches_tracked": torch.tensor(7)}
    packed = int8_state_dict(state)
    assert packed["conv.weight"].dtype == torch.int8
    assert packed["conv.bias"].dtype == torch.float16
    assert packed["bn.running_var"].dtype == torch.float32 and packed["bn.num_batches_tracked"].dtype == torch.int64
    restored = dequantize_state_dict(packed, "mem")
    assert set(restored) == set(state)
    assert restored["conv.weight"].dtype == torch.float32
    bound = w.abs().flatten(1).amax(1) / 127 / 2  # per channel
    err = (restored["conv.weight"] - w).abs().flatten(1).amax(1)
    assert bool((err <= bound * (1 + 1e-5)).all()), (err, bound)
    assert bool((restored["conv.weight"][5] == 0).all())
    # The extreme of each channel is stored exactly (q = +-127).
    for c in range(5):
        i = int(w[c].abs().argmax())
        assert float(restored["conv.weight"][c].flatten()[i]) == pytest.approx(float(w[c].flatten()[i]), rel=1e-6)


def test_convert_int8_loads_and_predicts_like_float32(tmp_path, small):
    """--int8: under 30 % of the float32 file, loads strictly into the model, and the logits stay
    close to the float32 model's (same argmax almost everywhere); converting back to --half
    drops the int8 note from the metadata."""
    src = tmp_path / "model.safetensors"
    save_weights(small, src)
    dst = tmp_path / "int8.safetensors"
    assert _cli("deeplab.cli.convert", [str(src), str(dst), "--model", "deeplab_v2_resnet18", "--int8"]) == 0
    assert dst.stat().st_size < 0.3 * src.stat().st_size
    raw, meta = read_safetensors(dst)
    assert meta["int8_weights"]["scale_suffix"] == INT8_SCALE_SUFFIX
    assert raw["backbone.stem.conv1.weight"].dtype == torch.float32  # dequantized on reading
    model, _ = build_from_weights(dst)
    x = torch.randn(1, 3, 65, 65, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = small.eval()(x), model.eval()(x)
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 0.02, rel  # measured 0.006
    assert float((got.argmax(1) == ref.argmax(1)).float().mean()) > 0.9
    # The same weights through the training loader (init_weights) read the same tensors.
    from deeplab.engine.checkpoint import load_state_dict_file

    via_ckpt = load_state_dict_file(dst)
    assert all(torch.equal(via_ckpt[k], raw[k]) for k in raw) and via_ckpt.keys() == raw.keys()
    back = tmp_path / "half.safetensors"
    assert _cli("deeplab.cli.convert", [str(dst), str(back), "--model", "deeplab_v2_resnet18", "--half"]) == 0
    assert "int8_weights" not in read_metadata(back)


@pytest.mark.parametrize("damage", ["drop_scale", "drop_tensor", "wrong_scale_shape"])
def test_damaged_int8_file_names_the_file_and_tensor(tmp_path, small, damage):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "int8.safetensors"
    save_weights(small, path, int8=True)
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        raw_meta = f.metadata()
    key = "backbone.stem.conv1.weight"
    if damage == "drop_scale":
        del tensors[key + INT8_SCALE_SUFFIX]
    elif damage == "drop_tensor":
        del tensors[key]
    else:
        tensors[key + INT8_SCALE_SUFFIX] = tensors[key + INT8_SCALE_SUFFIX][:3].clone()
    save_file(tensors, str(path), metadata=raw_meta)
    with pytest.raises(ValueError, match=rf"{path.name}.*{key}.*re-export"):
        read_safetensors(path)
    with pytest.raises(ValueError, match=key):
        build_from_weights(path)


def test_convert_cli_from_caffemodel(tmp_path, capsys):
    # A LargeFOV caffemodel in the legacy encoding, names from the official prototxt.
    model = _randomize(build_model("deeplab_v1_largefov_vgg16", num_classes=4), seed=2)
    from deeplab.weights.caffe import CaffeLayer

    layers = []
    for key, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            name = key.split(".")[-1] if key.startswith("backbone.") else key.split(".")[-1]
            name = {"fc8": "fc8_voc12"}.get(name, name)
            layers.append(CaffeLayer(name, "Convolution",
                                     [module.weight.detach().numpy().copy(), module.bias.detach().numpy().copy()]))
    src = tmp_path / "train_iter_6000.caffemodel"
    write_caffemodel(src, layers, legacy=True)
    dst = tmp_path / "largefov.safetensors"
    assert _cli("deeplab.cli.convert", [str(src), str(dst), "--model", "deeplab_v1_largefov_vgg16"]) == 0
    capsys.readouterr()
    back, meta = build_from_weights(dst)
    _same_state(back, model)
    assert meta["num_classes"] == 4 and meta["normalization"]["mode"] == "caffe_bgr"
    # Truncated source: a clear error naming the file.
    src.write_bytes(src.read_bytes()[:1000])
    assert _cli("deeplab.cli.convert", [str(src), str(dst), "--model", "deeplab_v1_largefov_vgg16"]) == 2
    assert "train_iter_6000.caffemodel" in capsys.readouterr().err


def test_default_weights_path():
    try:
        path = default_weights_path()
    except FileNotFoundError as e:
        assert "deeplab_v2_camvid.safetensors" in str(e) and "--weights" in str(e)
    else:
        meta = read_metadata(path)
        assert meta["model"] and meta["num_classes"] == len(meta["class_names"])


def test_kazuto1011_early_layout_names():
    # Early versions of the repository: MSC attribute `scale`, shortcut `proj`, ASPP `stages.cN`.
    from deeplab.weights.mapping import is_kazuto_layout, kazuto_to_project

    t = torch.zeros(1)
    old = {"scale.layer2.block1.proj.bn.running_var": t, "scale.layer5.block3.conv3x3.conv.weight": t,
           "scale.aspp.stages.c2.bias": t, "scale.layer1.conv1.bn.weight": t}
    assert is_kazuto_layout(old)
    renamed, unknown = kazuto_to_project(old)
    assert not unknown
    assert sorted(renamed) == ["aspp.branches.2.bias", "backbone.layer1.0.downsample.1.running_var",
                               "backbone.layer4.2.conv2.weight", "backbone.stem.bn1.weight"]
    assert kazuto_to_project({"base.layer2.block1.se.fc.weight": t})[1] == ["base.layer2.block1.se.fc.weight"]
