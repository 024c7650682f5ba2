"""Tests of deeplab.models: the atrous identity, sizes, parameter counts, MSC, errors, frozen BN.

Each test compares against an independent reference: a mathematical property of atrous
convolution, a size formula written here from the layer definitions, parameter counts
computed here from the architecture tables, or an MSC fusion recomputed by hand.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deeplab.models import (
    DeepLab,
    DeepLabMSC,
    FrozenBatchNorm2d,
    atrous_schedule,
    build_model,
    freeze_batchnorm,
    list_models,
    scale_atrous_rates,
)
from deeplab.models.msc import scaled_size

torch.set_num_threads(min(2, torch.get_num_threads()))

PAPER_NAMES = {
    "deeplab_v1_largefov_vgg16",
    "deeplab_v2_vgg16",
    "deeplab_v2_resnet101",
    "deeplab_v2_resnet50",
    "deeplab_v2_resnet18",
    "deeplab_v2_resnet34",
}


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random batch-norm statistics and affine parameters (so BN is not the identity) and random
    biases; the convolution weights keep their (random) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = b.abs().max().clamp_min(1e-12)
    err = ((a - b).abs().max() / scale).item()
    assert err < rtol, f"max |difference| / max |reference| = {err:.3g} >= {rtol}"


# ---------------------------------------------------------------- independent size formulas
def _conv_out(n: int, k: int, s: int, p: int, d: int = 1) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _pool_out_ceil(n: int, k: int, s: int, p: int) -> int:
    # Caffe/PyTorch ceil rounding, minus a window that would start in the right padding.
    out = -(-(n + 2 * p - k) // s) + 1
    if (out - 1) * s >= n + p:
        out -= 1
    return out


def _resnet_logits_size(n: int, output_stride: int) -> int:
    n = _conv_out(n, 7, 2, 3)  # conv1
    n = _pool_out_ceil(n, 3, 2, 1)  # pool1: stride 4
    for stage_stride in (8, 16, 32):  # first 1x1 of layer2/3/4 carries stride 2 unless dilated
        if stage_stride <= output_stride:
            n = _conv_out(n, 1, 2, 0)
    return n


def _vgg_logits_size(n: int) -> int:
    for _ in range(3):
        n = _pool_out_ceil(n, 3, 2, 1)  # pool1-3; pool4-5 (stride 1, pad 1) keep the size
    return n


def test_size_formulas_match_the_paper() -> None:
    # The paper's numbers: 321 -> 41 and 513 -> 65 at output stride 8, for both backbones.
    assert _resnet_logits_size(321, 8) == 41 and _resnet_logits_size(513, 8) == 65
    assert _vgg_logits_size(321) == 41 and _vgg_logits_size(513) == 65


@pytest.mark.parametrize("name", ["deeplab_v2_resnet101", "deeplab_v1_largefov_vgg16", "deeplab_v2_vgg16"])
@pytest.mark.parametrize("size", [(321, 321), (513, 513), (320, 322), (1, 2), (17, 64), (100, 129), (500, 375)])
def test_output_sizes_odd_and_even(name: str, size: tuple[int, int]) -> None:
    # Shapes only: the meta device runs no arithmetic, so the full-size nets cost nothing.
    with torch.device("meta"):
        model = build_model(name, num_classes=21).eval()
        out = model(torch.empty(1, 3, *size))
    formula = _vgg_logits_size if "vgg" in name else (lambda n: _resnet_logits_size(n, 8))
    assert tuple(out.shape) == (1, 21, formula(size[0]), formula(size[1]))


@pytest.mark.parametrize("output_stride", [8, 16, 32])
@pytest.mark.parametrize("size", [321, 513, 64, 65, 33])
def test_resnet_output_sizes_per_stride(output_stride: int, size: int) -> None:
    rates = (8, 16) if output_stride == 32 else (2, 4)
    with torch.device("meta"):
        model = build_model("deeplab_v2_resnet50", num_classes=5, output_stride=output_stride,
                            atrous_rates=rates).eval()
        out = model(torch.empty(2, 3, size, size + 1))
    n = _resnet_logits_size
    assert tuple(out.shape) == (2, 5, n(size, output_stride), n(size + 1, output_stride))


# ---------------------------------------------------------------- every model in the zoo
def test_list_models_has_the_contract_names() -> None:
    assert PAPER_NAMES <= set(list_models())
    assert len(set(list_models())) == len(list_models())


@pytest.mark.parametrize("name", sorted(PAPER_NAMES))  # v3 / v3+: tests/test_models_v3.py
def test_every_model_shape_stride_and_classifier(name: str) -> None:
    model = build_model(name, num_classes=7).eval()
    assert model.output_stride == 8 and model.num_classes == 7
    x = torch.randn(1, 3, 33, 40)
    with torch.no_grad():
        out = model(x)
        feats = model.backbone(x)
    formula = _vgg_logits_size if "vgg" in name else (lambda n: _resnet_logits_size(n, 8))
    assert tuple(out.shape) == (1, 7, formula(33), formula(40))
    assert feats.shape[-2:] == out.shape[-2:]
    assert feats.shape[1] == model.backbone.out_channels == (512 if ("vgg" in name or name[-2:] in ("18", "34")) else 2048)
    # classifier_parameters: ResNet -> the ASPP convolutions, VGG -> only the fc8 layers.
    cls_ids = {id(p) for p in model.classifier_parameters()}
    all_named = dict(model.named_parameters())
    expected = {id(p) for k, p in all_named.items()
                if k.startswith("aspp.") and ("vgg" not in name or ".fc8." in k)}
    assert cls_ids == expected and cls_ids


# ---------------------------------------------------------------- parameter counts
def _bottleneck_resnet_params(blocks: tuple[int, ...], num_classes: int, rates: int = 4) -> int:
    total = 3 * 64 * 49 + 2 * 64  # conv1 (no bias) + bn_conv1 (gamma, beta)
    inp = 64
    for planes, n in zip((64, 128, 256, 512), blocks):
        for i in range(n):
            total += inp * planes + 2 * planes  # branch2a + bn
            total += 9 * planes * planes + 2 * planes  # branch2b + bn
            total += planes * 4 * planes + 2 * 4 * planes  # branch2c + bn
            if i == 0:
                total += inp * 4 * planes + 2 * 4 * planes  # branch1 + bn
            inp = 4 * planes
    return total + rates * (9 * 2048 * num_classes + num_classes)


def _vgg_params(num_classes: int, branches: int) -> int:
    channels = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
                (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
    conv = sum(9 * i * o + o for i, o in channels)
    branch = (9 * 512 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * num_classes + num_classes)
    return conv + branches * branch


def _count(name: str, num_classes: int = 21) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(name, num_classes=num_classes).parameters())


def test_parameter_counts_of_the_papers_models() -> None:
    # deeplab_v2_resnet101: 42,500,160 backbone parameters (torchvision's ResNet-101 has
    # 44,549,160 with its 2048x1000 fc; the Caffe layout only moves strides) plus ASPP
    # 4 x (3*3*2048*21 + 21) = 1,548,372 -> 44,048,532, the paper's "about 44.05M".
    assert _count("deeplab_v2_resnet101") == _bottleneck_resnet_params((3, 4, 23, 3), 21) == 44_048_532
    assert round(_count("deeplab_v2_resnet101") / 1e6, 2) == 44.05
    assert _count("deeplab_v2_resnet50") == _bottleneck_resnet_params((3, 4, 6, 3), 21)
    # LargeFOV: 14.71M VGG-16 convolutions + fc6 (3x3x512x1024) + fc7 + fc8 = 20.5M (the paper).
    assert _count("deeplab_v1_largefov_vgg16") == _vgg_params(21, 1) == 20_505_429
    assert round(_count("deeplab_v1_largefov_vgg16") / 1e6, 1) == 20.5
    assert _count("deeplab_v2_vgg16") == _vgg_params(21, 4)
    # The class count only changes the classifiers.
    assert _count("deeplab_v2_resnet101", 19) == _bottleneck_resnet_params((3, 4, 23, 3), 19)


# ---------------------------------------------------------------- the atrous identity
def test_atrous_schedule() -> None:
    assert atrous_schedule(8) == ((1, 1), (2, 1), (1, 2), (1, 4))
    assert atrous_schedule(16) == ((1, 1), (2, 1), (2, 1), (1, 2))
    assert atrous_schedule(32) == ((1, 1), (2, 1), (2, 1), (2, 1))
    assert scale_atrous_rates((6, 12, 18, 24), 16) == (3, 6, 9, 12)
    assert scale_atrous_rates((8, 12), 32) == (2, 3)


def _same_weights(name: str, strides: tuple[int, int], rates: tuple[int, ...] | None, seed: int):
    torch.manual_seed(seed)
    a = _randomize(build_model(name, num_classes=3, output_stride=strides[0], atrous_rates=rates), seed).eval()
    with torch.device("meta"):  # no second initialisation: the weights come from `a`
        b = build_model(name, num_classes=3, output_stride=strides[1], atrous_rates=rates).eval()
    b.load_state_dict(a.state_dict(), strict=True, assign=True)  # same keys at every stride
    return a, b


@pytest.mark.parametrize("name", ["deeplab_v2_resnet18", "deeplab_v2_resnet50"])
def test_atrous_identity_logits_stride8_vs_16(name: str) -> None:
    # Rates up to 12 at stride 8 on a 13x13 logits map: the largest branch reaches inside the
    # map, so a rate that was not scaled (12 instead of 6 at stride 16) would change the result.
    m8, m16 = _same_weights(name, (8, 16), (2, 4, 8, 12), seed=1)
    x = torch.randn(1, 3, 97, 104)
    with torch.no_grad():
        y8, y16 = m8(x), m16(x)
    assert y8.shape[-2] == 13 and y16.shape[-2] == 7
    _close(y8[..., ::2, ::2], y16)
    # And the property is not vacuous: the odd positions are not the same as the even ones.
    assert (y8[..., 1::2, 1::2] - y8[..., :-1:2, :-1:2]).abs().max() > 1e-3 * y8.abs().max()


@pytest.mark.parametrize("name", ["deeplab_v2_resnet18", "deeplab_v2_resnet50"])
def test_atrous_identity_backbone_stride8_vs_32(name: str) -> None:
    m8, m32 = _same_weights(name, (8, 32), (8,), seed=2)
    x = torch.randn(1, 3, 65, 58)
    with torch.no_grad():
        f8, f32 = m8.backbone(x), m32.backbone(x)
    _close(f8[..., ::4, ::4], f32)


def test_atrous_identity_resnet101_backbone_stride8_vs_16() -> None:
    m8, m16 = _same_weights("deeplab_v2_resnet101", (8, 16), None, seed=3)
    x = torch.randn(1, 3, 33, 40)
    with torch.no_grad():
        f8, f16 = m8.backbone(x), m16.backbone(x)
    _close(f8[..., ::2, ::2], f16)


def test_default_aspp_l_identity_at_stride16() -> None:
    # The default ASPP-L rates (6, 12, 18, 24) on a 25x25 map (rate 24 still reaches in).
    m8, m16 = _same_weights("deeplab_v2_resnet18", (8, 16), None, seed=4)
    with torch.no_grad():
        x = torch.randn(1, 3, 193, 193)
        _close(m8(x)[..., ::2, ::2], m16(x))


def test_identity_fails_without_rate_scaling() -> None:
    # Control: the same check with rates that were *not* scaled (12 at both strides) fails,
    # so the identity tests above can detect a scaling bug.
    m8, _ = _same_weights("deeplab_v2_resnet18", (8, 16), (12,), seed=5)
    m16_wrong = build_model("deeplab_v2_resnet18", num_classes=3, output_stride=16, atrous_rates=(24,)).eval()
    m16_wrong.load_state_dict(m8.state_dict())
    x = torch.randn(1, 3, 161, 161)
    with torch.no_grad():
        with pytest.raises(AssertionError):
            _close(m8(x)[..., ::2, ::2], m16_wrong(x))


# ---------------------------------------------------------------- MSC
def _manual_fusion(base: nn.Module, x: torch.Tensor, scales: tuple[float, ...]) -> list[torch.Tensor]:
    h, w = x.shape[-2:]
    outs = [base(x)]
    for s in scales:
        size = (int((h - 1) * s + 1e-9) + 1, int((w - 1) * s + 1e-9) + 1)  # Caffe Interp size
        outs.append(base(F.interpolate(x, size=size, mode="bilinear", align_corners=True)))
    resized = [outs[0]] + [F.interpolate(o, size=outs[0].shape[-2:], mode="bilinear", align_corners=True)
                           for o in outs[1:]]
    return [*outs, torch.stack(resized).amax(dim=0)]


def test_msc_scaled_sizes_match_caffe_interp() -> None:
    # Caffe Interp: shrink_factor 2 -> (321-1)/2+1 = 161; shrink 4 zoom 3 -> 81 + 80*2 = 241.
    assert scaled_size(321, 0.5) == 161 and scaled_size(321, 0.75) == 241
    assert scaled_size(513, 0.5) == 257 and scaled_size(513, 0.75) == 385
    assert scaled_size(1, 0.5) == 1


def test_msc_eval_returns_the_fused_max() -> None:
    scales = (0.5, 0.75)
    msc = _randomize(build_model("deeplab_v2_resnet18", num_classes=4, msc_scales=scales), 6).eval()
    assert isinstance(msc, DeepLabMSC) and msc.output_stride == 8 and msc.num_classes == 4
    base = build_model("deeplab_v2_resnet18", num_classes=4).eval()
    base.load_state_dict(msc.state_dict(), strict=True)  # same keys as the single-scale model
    x = torch.randn(1, 3, 57, 50)
    with torch.no_grad():
        fused = msc(x)
        ref = _manual_fusion(base, x, scales)
    assert isinstance(fused, torch.Tensor)
    _close(fused, ref[-1], rtol=1e-5)
    # The max actually picks from more than one scale on random weights.
    stacked = torch.stack([ref[0]] + [F.interpolate(o, size=ref[0].shape[-2:], mode="bilinear",
                                                    align_corners=True) for o in ref[1:-1]])
    assert len(torch.unique(stacked.argmax(dim=0))) > 1


def test_msc_train_returns_every_scale_then_fused() -> None:
    scales = (0.5, 0.75)
    msc = _randomize(build_model("deeplab_v2_resnet18", num_classes=4, msc_scales=scales), 7).train()
    base = build_model("deeplab_v2_resnet18", num_classes=4).train()
    base.load_state_dict(msc.state_dict())
    x = torch.randn(2, 3, 49, 49)  # scaled inputs 25x25 and 37x37 (Caffe Interp sizes)
    outs = msc(x)
    with torch.no_grad():
        ref = _manual_fusion(base, x, scales)  # train-mode BN (batch statistics) in both
    assert isinstance(outs, list) and len(outs) == 2 + len(scales)
    assert [tuple(o.shape[-2:]) for o in outs] == [(7, 7), (4, 4), (5, 5), (7, 7)]
    for got, want in zip(outs, ref):
        _close(got.detach(), want, rtol=1e-5)
    sum(o.mean() for o in outs).backward()  # the 4-term loss reaches the shared weights
    assert msc.backbone.stem.conv1.weight.grad is not None


def test_msc_vgg_has_same_keys_and_classifier() -> None:
    with torch.device("meta"):
        msc = build_model("deeplab_v1_largefov_vgg16", num_classes=21, msc_scales=(0.5,))
        plain = build_model("deeplab_v1_largefov_vgg16", num_classes=21)
    assert list(msc.state_dict()) == list(plain.state_dict())
    assert len(list(msc.classifier_parameters())) == 2


# ---------------------------------------------------------------- errors
def test_unknown_name_lists_the_valid_names() -> None:
    with pytest.raises(ValueError) as err:
        build_model("deeplab_v4_resnet101", num_classes=21)
    for name in list_models():
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "deeplab_v2_resnet101", "output_stride": 4}, r"output_stride=4 .*\(8, 16, 32\)"),
        ({"name": "deeplab_v2_resnet101", "output_stride": 16.0}, r"output_stride=16.0"),
        ({"name": "deeplab_v2_vgg16", "output_stride": 16}, r"output_stride=16 .*only at stride 8"),
        ({"name": "deeplab_v1_largefov_vgg16", "output_stride": 32}, r"output_stride=32"),
        ({"name": "deeplab_v2_resnet18", "atrous_rates": (6, 0)}, r"0 is not a positive integer"),
        ({"name": "deeplab_v2_resnet18", "atrous_rates": (6, 1.5)}, r"1.5 is not a positive integer"),
        ({"name": "deeplab_v2_resnet18", "atrous_rates": (6, True)}, r"True is not a positive integer"),
        ({"name": "deeplab_v2_resnet18", "atrous_rates": ()}, r"empty"),
        ({"name": "deeplab_v2_resnet18", "atrous_rates": "6"}, r"sequence of positive integers"),
        ({"name": "deeplab_v2_resnet18", "atrous_rates": (6, 12, 18, 24), "output_stride": 32},
         r"\[6, 18\] are not divisible by 4"),
        ({"name": "deeplab_v2_resnet18", "atrous_rates": (3,), "output_stride": 16}, r"\[3\] are not divisible by 2"),
        ({"name": "deeplab_v1_largefov_vgg16", "atrous_rates": (6, 12)}, r"single fc6 branch"),
        ({"name": "deeplab_v2_resnet18", "msc_scales": (1.0, 0.5)}, r"contains 1"),
        ({"name": "deeplab_v2_resnet18", "msc_scales": (0.5, -1)}, r"-1 is not a positive"),
        ({"name": "deeplab_v2_resnet18", "msc_scales": ()}, r"non-empty"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs: dict, match: str) -> None:
    kwargs = dict(kwargs)
    name = kwargs.pop("name")
    with torch.device("meta"), pytest.raises(ValueError, match=match):
        build_model(name, num_classes=21, **kwargs)


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True])
def test_bad_num_classes(num_classes) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_model("deeplab_v2_resnet18", num_classes=num_classes)


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.zeros(3, 33, 33), r"\(B, 3, H, W\), got \(3, 33, 33\)"),
        (torch.zeros(1, 1, 33, 33), r"got \(1, 1, 33, 33\)"),
        (torch.zeros(1, 3, 33, 33, dtype=torch.uint8), r"floating-point"),
        (torch.zeros(1, 3, 0, 33), r"input size 0x33 is too small: any height and width >= 1 work"),
    ],
)
def test_bad_inputs_raise_clear_errors(x: torch.Tensor, match: str) -> None:
    model = build_model("deeplab_v2_resnet18", num_classes=2).eval()
    with pytest.raises(ValueError, match=match):
        model(x)
    msc = build_model("deeplab_v2_resnet18", num_classes=2, msc_scales=(0.5,)).eval()
    with pytest.raises(ValueError, match=match):
        msc(x)


# ---------------------------------------------------------------- frozen batch-norm
def test_frozen_batchnorm_equals_batchnorm_in_eval() -> None:
    bn = _randomize(nn.Sequential(nn.BatchNorm2d(16)), 8)[0].eval()
    frozen = FrozenBatchNorm2d.from_batchnorm(bn)
    x = torch.randn(2, 16, 5, 7)
    _close(frozen(x), bn(x), rtol=1e-6)
    frozen.train()
    _close(frozen(x), bn(x), rtol=1e-6)  # frozen: training mode changes nothing
    assert list(frozen.state_dict()) == list(bn.state_dict())
    assert not list(frozen.parameters())
    # Loads a BatchNorm2d state dict without num_batches_tracked (Caffe imports, old files).
    sd = {k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"}
    fresh = FrozenBatchNorm2d(16)
    fresh.load_state_dict(sd, strict=True)
    _close(fresh(x), bn(x), rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_frozen_batchnorm_keeps_the_source_dtype(dtype: torch.dtype) -> None:
    bn = _randomize(nn.Sequential(nn.BatchNorm2d(16)), 8)[0].eval().to(dtype)
    frozen = FrozenBatchNorm2d.from_batchnorm(bn)
    assert {k: v.dtype for k, v in frozen.state_dict().items()} == {k: v.dtype for k, v in bn.state_dict().items()}
    for k, v in bn.state_dict().items():
        assert torch.equal(frozen.state_dict()[k], v), k  # copied without a float32 detour
    if dtype == torch.float64:  # float64 statistics: the eval BN's function to ~1e-15
        x = torch.randn(2, 16, 5, 7, dtype=dtype)
        assert (frozen(x) - bn(x)).abs().max().item() < 1e-12


def test_freeze_batchnorm_keeps_keys_and_function() -> None:
    model = _randomize(build_model("deeplab_v2_resnet18", num_classes=3), 9).eval()
    frozen = freeze_batchnorm(build_model("deeplab_v2_resnet18", num_classes=3))
    assert isinstance(frozen, DeepLab)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert list(frozen.state_dict()) == list(model.state_dict())
    frozen.load_state_dict(model.state_dict(), strict=True)
    frozen.train()  # frozen BN in a training-mode model: still the eval function (dropout aside)
    x = torch.randn(1, 3, 45, 50)
    with torch.no_grad():
        _close(frozen(x), model(x), rtol=1e-5)
    # The BN affine parameters are no longer trainable parameters.
    n_conv = sum(p.numel() for n, p in model.named_parameters() if ".bn" not in n and "downsample.1" not in n)
    assert sum(p.numel() for p in frozen.parameters()) == n_conv
