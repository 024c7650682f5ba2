"""DeepLab v3 / v3+ and the weights users have: torchvision, VainF/DeepLabV3Plus-Pytorch, ImageNet.

References are independent of the models under test: published parameter counts, size
formulas written from the layer definitions, the atrous identity, and re-implementations of
torchvision's and VainF's networks (``_foreign_reference.py``) whose state dicts, saved in
those projects' file layouts, must load strictly and compute the same logits.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from _foreign_reference import TorchvisionDeepLabV3, VainFDeepLab, randomize, tv_resnet
from deeplab.models import build_model, list_models, model_info
from deeplab.weights import build_from_weights, load_weights, read_metadata, save_weights
from deeplab.weights.mapping import WeightsMismatchError

torch.set_num_threads(min(2, torch.get_num_threads()))

V3_NAMES = [f"deeplab_v3{plus}_resnet{d}" for plus in ("", "plus") for d in (18, 34, 50, 101)]


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):  # no memory, no initialisation kernels
        return build_model(name, num_classes=21, **kwargs)


# ---------------------------------------------------------------- the zoo
def test_every_v3_name_is_listed_with_its_family_and_default_stride() -> None:
    assert set(V3_NAMES) <= set(list_models())
    for name in V3_NAMES:
        info = model_info(name)
        assert info.family == ("v3+" if "plus" in name else "v3")
        assert info.default_output_stride == 16 and info.msc_fusion == "mean"
    assert model_info("deeplab_v2_resnet101").msc_fusion == "max"


def test_parameter_counts_match_torchvision_and_vainf() -> None:
    # torchvision: 42,004,074 / 60,996,202 with the auxiliary FCN head on layer3 (1024 -> 256 -> 21).
    aux = 1024 * 256 * 9 + 2 * 256 + 256 * 21 + 21
    assert _count(_meta("deeplab_v3_resnet50")) == 39_638_869 == 42_004_074 - aux
    assert _count(_meta("deeplab_v3_resnet101")) == 58_630_997 == 60_996_202 - aux
    assert _count(_meta("deeplab_v3plus_resnet101", decoder_convs=1)) == 58_753_973
    # The paper's decoder adds a second 3x3 convolution of 256 with its batch-norm.
    assert _count(_meta("deeplab_v3plus_resnet101")) == 58_753_973 + 256 * 256 * 9 + 2 * 256
    # The reference implementations agree with the published totals.
    with torch.device("meta"):
        assert _count(TorchvisionDeepLabV3(50)) == 42_004_074
        assert _count(TorchvisionDeepLabV3(101)) == 60_996_202
        assert _count(VainFDeepLab(101, 21, 16, plus=True)) == 58_753_973


# ---------------------------------------------------------------- sizes
def _conv_out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def _tv_sizes(n: int, output_stride: int) -> tuple[int, int]:
    """(stride-4 size, output-stride size) of a torchvision-layout ResNet, layer by layer."""
    n = _conv_out(n, 7, 2, 3)  # conv1
    n = _conv_out(n, 3, 2, 1)  # max pool, floor rounding
    low = n
    for stride in (8, 16, 32):
        if stride <= output_stride:
            n = _conv_out(n, 3, 2, 1)  # the strided 3x3 (dilation 1 before any dilated stage)
    return low, n


@pytest.mark.parametrize("name", ["deeplab_v3_resnet18", "deeplab_v3plus_resnet18", "deeplab_v3plus_resnet50"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_sizes_for_odd_and_even_inputs(name: str, output_stride: int) -> None:
    model = build_model(name, num_classes=5, output_stride=output_stride).eval()
    for h, w in ((33, 40), (64, 57)):
        with torch.no_grad():
            out = model(torch.randn(1, 3, h, w))
        (lh, oh), (lw, ow) = _tv_sizes(h, output_stride), _tv_sizes(w, output_stride)
        expected = (lh, lw) if "plus" in name else (oh, ow)
        assert tuple(out.shape) == (1, 5, *expected)
        assert (oh, ow) == (math.ceil(h / output_stride), math.ceil(w / output_stride))
        assert model.backbone(torch.randn(1, 3, h, w)).shape[-2:] == (oh, ow)
    assert model.logits_stride == (4 if "plus" in name else output_stride)


def test_rates_scale_with_the_output_stride() -> None:
    for stride, rates in ((16, (6, 12, 18)), (8, (12, 24, 36))):
        model = _meta("deeplab_v3plus_resnet50", output_stride=stride)
        assert tuple(b[0].dilation[0] for b in list(model.aspp.convs)[1:4]) == rates
        assert model.aspp.atrous_rates == rates and model.atrous_rates == (12, 24, 36)


# ---------------------------------------------------------------- the torchvision layout
@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_layout_backbone_atrous_identity(depth: int) -> None:
    """Same weights at output stride 8 and 32: the stride-8 features sampled every 4 pixels are
    the stride-32 features (stride on the 3x3, first block at the previous dilation)."""
    dense = randomize(build_model(f"deeplab_v3_resnet{depth}", num_classes=3, output_stride=8).backbone)
    from deeplab.models.resnet import resnet18, resnet50

    sparse = (resnet18 if depth == 18 else resnet50)(output_stride=32, layout="torchvision").eval()
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(1, 3, 67, 45)
    with torch.no_grad():
        a, b = dense(x)[..., ::4, ::4], sparse(x)
    assert a.shape == b.shape
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_strides_sit_where_each_layout_puts_them() -> None:
    tv = _meta("deeplab_v3_resnet50").backbone
    caffe = _meta("deeplab_v3_resnet50", resnet_layout="caffe").backbone
    assert tv.layer2[0].conv2.stride == (2, 2) and tv.layer2[0].conv1.stride == (1, 1)
    assert caffe.layer2[0].conv1.stride == (2, 2) and caffe.layer2[0].conv2.stride == (1, 1)
    assert tv.stem.pool.ceil_mode is False and caffe.stem.pool.ceil_mode is True
    # v2 keeps the Caffe layout by default and can take torchvision's.
    assert _meta("deeplab_v2_resnet101").backbone.layout == "caffe"
    assert _meta("deeplab_v2_resnet101", resnet_layout="torchvision").backbone.layer2[0].conv2.stride == (2, 2)


def test_multi_grid_multiplies_the_last_stage_rates() -> None:
    model = _meta("deeplab_v3_resnet101", multi_grid=(1, 2, 4))  # output stride 16: layer4 rate 2
    assert [b.conv2.dilation[0] for b in model.backbone.layer4] == [2, 4, 8]
    model = _meta("deeplab_v3_resnet101", output_stride=8, multi_grid=(1, 2, 4))
    assert [b.conv2.dilation[0] for b in model.backbone.layer4] == [4, 8, 16]
    assert [b.conv2.dilation[0] for b in _meta("deeplab_v3_resnet101").backbone.layer4] == [1, 2, 2]
    with pytest.raises(ValueError, match=r"multi_grid=\(1, 2\) .*\(3 blocks\)"):
        _meta("deeplab_v3_resnet101", multi_grid=(1, 2))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"name": "deeplab_v3_resnet50", "output_stride": 32}, r"output_stride=32 .*\(8, 16\)"),
    ({"name": "deeplab_v2_resnet50", "decoder_convs": 1}, r"decoder_convs=1 is a DeepLab v3"),
    ({"name": "deeplab_v3_resnet50", "decoder_convs": 1}, r"has no decoder; use deeplab_v3plus_resnet50"),
    ({"name": "deeplab_v3plus_resnet50", "decoder_convs": 3}, r"decoder_convs=3"),
    ({"name": "deeplab_v3_resnet50", "msc_scales": (0.5,)}, r"inference option \(--msc"),
    ({"name": "deeplab_v2_vgg16", "resnet_layout": "caffe"}, r"no ResNet backbone"),
    ({"name": "deeplab_v3_resnet50", "resnet_layout": "timm"}, r"layout='timm'"),
])
def test_bad_options_are_named(kwargs: dict, match: str) -> None:
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        build_model(name, num_classes=3, **kwargs)


# ---------------------------------------------------------------- foreign weights
def _parity(ours: nn.Module, reference: nn.Module, size=(61, 70)) -> None:
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(x), reference.logits(x)
    assert a.shape == b.shape
    assert (a - b).abs().max() <= 1e-4 * b.abs().max(), (a - b).abs().max()


def test_torchvision_checkpoint_loads_strictly_and_computes_the_same(tmp_path) -> None:
    ref = randomize(TorchvisionDeepLabV3(50, num_classes=21))
    path = tmp_path / "deeplabv3_resnet50_coco-cd0a2569.pth"
    torch.save(ref.state_dict(), path)
    model, meta = build_from_weights(path)
    assert meta["model"] == "deeplab_v3_resnet50" and meta["model_kwargs"]["output_stride"] == 8
    assert meta["class_names"][1] == "aeroplane" and meta["normalization"]["mode"] == "rgb"
    _parity(model, ref)
    # load_weights into a model built by hand names the dropped auxiliary head.
    result = load_weights(build_model("deeplab_v3_resnet50", num_classes=21, output_stride=8), path)
    assert result.layout == "torchvision" and "auxiliary FCN head" in result.notes[0] and "aux_classifier" in result.notes[0]
    # Full resolution: the engine upsamples as torchvision does (align_corners=False).
    from deeplab.data.transforms import IMAGENET_NORMALIZATION, normalize_image
    from deeplab.engine.inference import predict_probs

    image = np.random.default_rng(0).integers(0, 256, (45, 52, 3), dtype=np.uint8)
    probs = predict_probs(model, image, normalization=IMAGENET_NORMALIZATION, precision="fp32")
    with torch.no_grad():
        expected = torch.softmax(ref(normalize_image(image, IMAGENET_NORMALIZATION)[None])["out"], dim=1)
    assert (probs - expected).abs().max() < 1e-4


@pytest.mark.parametrize("plus", [False, True])
def test_vainf_checkpoints_build_the_right_network(tmp_path, plus: bool) -> None:
    ref = randomize(VainFDeepLab(50, num_classes=19, output_stride=16, plus=plus))
    path = tmp_path / f"best_deeplabv3{'plus' if plus else ''}_resnet50_cityscapes_os16.pth"
    torch.save({"model_state": ref.state_dict(), "optimizer_state": {"state": {}, "param_groups": []},
                "cur_itrs": 30000, "best_score": 0.71}, path)
    model, meta = build_from_weights(path)
    assert meta["model"] == ("deeplab_v3plus_resnet50" if plus else "deeplab_v3_resnet50")
    assert meta["model_kwargs"]["output_stride"] == 16 and meta["num_classes"] == 19
    assert meta["class_names"][0] == "road"
    if plus:
        assert meta["model_kwargs"]["decoder_convs"] == 1 and model.decoder.num_convs == 1
    _parity(model, ref)
    # Evaluated at output stride 8 (rates doubled), as VainF's --output_stride 8 does.
    dense, _ = build_from_weights(path, output_stride=8)
    ref8 = VainFDeepLab(50, num_classes=19, output_stride=8, plus=plus).eval()
    ref8.load_state_dict(ref.state_dict())
    _parity(dense, ref8)


def test_imagenet_resnet_initialises_the_backbone_only(tmp_path) -> None:
    ref = randomize(tv_resnet(50))
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(ref.state_dict(), path)
    model = build_model("deeplab_v3plus_resnet50", num_classes=11)
    with pytest.raises(WeightsMismatchError, match="no classifier"):
        load_weights(model, path)  # strict: the head is missing
    result = load_weights(model, path, strict=False)
    assert result.layout == "imagenet" and "fc.*" in result.notes[0]
    assert result.missing and all(k.startswith(("aspp.", "decoder.", "classifier.")) for k in result.missing)
    from deeplab.models.resnet import resnet50

    plain = resnet50(output_stride=32, layout="torchvision").eval()
    plain.load_state_dict(model.backbone.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(plain(x), ref.features(x)["out"], atol=1e-5, rtol=1e-4)
    # Into the Caffe layout: it loads, with a warning that the strides sit elsewhere.
    with pytest.warns(UserWarning, match="strides sit elsewhere"):
        load_weights(build_model("deeplab_v2_resnet50", num_classes=11), path, strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # basic blocks stride on the same 3x3 in both layouts
        torch.save(randomize(tv_resnet(18)).state_dict(), tmp_path / "r18.pth")
        load_weights(build_model("deeplab_v2_resnet18", num_classes=11), tmp_path / "r18.pth", strict=False)


def test_wrong_files_fail_naming_keys_and_layouts(tmp_path) -> None:
    ref = randomize(VainFDeepLab(50, num_classes=21, plus=True))
    path = tmp_path / "vainf_v3plus.pth"
    torch.save({"model_state": ref.state_dict()}, path)
    with pytest.raises(WeightsMismatchError) as err:
        load_weights(build_model("deeplab_v3_resnet50", num_classes=21), path)
    text = str(err.value)
    assert "vainf_v3plus layout" in text and "decoder.reduce.0.weight" in text and "head.0.weight" in text
    assert "torchvision segmentation" in text and "kazuto1011" in text  # the layouts the project reads
    # A torchvision file with a key no rule knows is named as such.
    state = randomize(TorchvisionDeepLabV3(50, aux=False)).state_dict()
    state["backbone.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(WeightsMismatchError, match=r"torchvision segmentation .*backbone\.extra\.weight"):
        build_from_weights(tmp_path / "odd.pth")


def test_project_files_record_the_v3_options(tmp_path) -> None:
    model = build_model("deeplab_v3plus_resnet18", num_classes=4, output_stride=8, multi_grid=(1, 2),
                        resnet_layout="caffe")
    save_weights(model, tmp_path / "m.safetensors")
    kwargs = read_metadata(tmp_path / "m.safetensors")["model_kwargs"]
    assert kwargs["decoder_convs"] == 2 and kwargs["multi_grid"] == [1, 2] and kwargs["resnet_layout"] == "caffe"
    again, _ = build_from_weights(tmp_path / "m.safetensors")
    assert [b.conv2.dilation[0] for b in again.backbone.layer4] == [4, 8]
    assert again.backbone.layout == "caffe" and again.decoder.num_convs == 2


# ---------------------------------------------------------------- multi-scale testing
def test_v3_multi_scale_testing_averages_the_scales() -> None:
    from deeplab.data.transforms import IMAGENET_NORMALIZATION, normalize_image
    from deeplab.engine.inference import predict_logits
    from deeplab.models.msc import scaled_size

    model = randomize(build_model("deeplab_v3_resnet18", num_classes=3))
    image = np.random.default_rng(1).integers(0, 256, (48, 56, 3), dtype=np.uint8)
    x = normalize_image(image, IMAGENET_NORMALIZATION)[None]
    with torch.no_grad():
        full = model(x)
        half = model(nn.functional.interpolate(x, size=(scaled_size(48, 0.5), scaled_size(56, 0.5)),
                                               mode="bilinear", align_corners=False))
        half = nn.functional.interpolate(half, size=full.shape[-2:], mode="bilinear", align_corners=False)
    kw = dict(normalization=IMAGENET_NORMALIZATION, msc_scales=(0.5,), precision="fp32")
    assert torch.allclose(predict_logits(model, image, **kw), (full + half) / 2, atol=1e-5)
    assert torch.allclose(predict_logits(model, image, msc_fusion="max", **kw), torch.maximum(full, half), atol=1e-5)
    with pytest.raises(ValueError, match="msc_fusion='sum'"):
        predict_logits(model, image, msc_fusion="sum", **kw)


def test_bench_models_prints_the_baseline_and_the_candidate() -> None:
    """The benchmark runs end to end (tiny input); the timings themselves are not asserted."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_models.py"
    out = subprocess.run([sys.executable, str(script), "--models", "deeplab_v3plus_resnet18", "--size", "65",
                          "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[2:]}
    assert set(rows) == {"deeplab_v2_resnet101", "deeplab_v3plus_resnet18"}
    assert rows["deeplab_v3plus_resnet18"][3] == f"{_count(_meta('deeplab_v3plus_resnet18')) / 1e6:.2f}M"
    assert rows["deeplab_v3plus_resnet18"][2] == "17x17" and rows["deeplab_v2_resnet101"][7] == "1.00"
