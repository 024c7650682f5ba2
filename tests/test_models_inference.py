"""Tests of the inference path (BN folding, channels_last, bf16) and of ``deeplab models``."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from deeplab.models import (
    autocast,
    build_model,
    fold_batchnorm,
    freeze_batchnorm,
    list_models,
    optimize_for_inference,
)

torch.set_num_threads(min(2, torch.get_num_threads()))


def _randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            elif isinstance(m, nn.Conv2d) and m.out_channels < 64:
                # Larger classifier weights than the N(0, 0.01) init, so logits are not ~0.
                m.weight.normal_(0, 0.05, generator=g)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return _randomize_bn(build_model("deeplab_v2_resnet18", num_classes=6), 0).eval()


def test_fold_batchnorm_is_exact_and_removes_bn(resnet18: nn.Module) -> None:
    import copy

    folded = fold_batchnorm(copy.deepcopy(resnet18))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 45, 38)
    with torch.no_grad():
        assert _rel(folded(x), resnet18(x)) < 1e-5
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(build_model("deeplab_v2_resnet18", num_classes=2))  # training mode


def test_fold_batchnorm_handles_frozen_bn(resnet18: nn.Module) -> None:
    import copy

    frozen = freeze_batchnorm(copy.deepcopy(resnet18)).eval()
    folded = fold_batchnorm(copy.deepcopy(frozen))
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert _rel(folded(x), resnet18(x)) < 1e-5


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("fold_bn", [True, False])
def test_fp32_path_equals_the_plain_model(resnet18: nn.Module, channels_last: bool, fold_bn: bool) -> None:
    fast = optimize_for_inference(resnet18, precision="fp32", channels_last=channels_last, fold_bn=fold_bn)
    x = torch.randn(2, 3, 53, 47)
    with torch.no_grad():
        ref = resnet18(x)
    out = fast(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert _rel(out, ref) < 1e-4
    # The original model is untouched (still has its batch-norms and fp32 weights).
    assert isinstance(resnet18.backbone.stem.bn1, nn.BatchNorm2d)
    assert resnet18.backbone.stem.conv1.weight.dtype == torch.float32


def test_bf16_path_is_close(resnet18: nn.Module) -> None:
    # bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2%); ResNet-18 has ~20 layers
    # in sequence, each rounding its output once, so errors of a few 0.2% steps accumulate:
    # 1-2% of the largest logit is expected, 5% allows for unlucky inputs, and a wrong
    # network (e.g. unfolded BN applied twice, a missing layer) would be off by ~100%.
    fast = optimize_for_inference(resnet18)  # the defaults: bf16, channels_last, folded BN
    x = torch.randn(2, 3, 65, 57)
    with torch.no_grad():
        ref = resnet18(x)
    out = fast(x)
    assert out.dtype == torch.float32
    err = _rel(out, ref)
    assert 0 < err < 5e-2, err  # > 0: it really ran in bf16
    assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.9
    assert fast.output_stride == 8 and fast.num_classes == 6
    with pytest.raises(ValueError, match="inference-only"):
        fast.train()


def test_bf16_path_on_msc_and_vgg() -> None:
    msc = _randomize_bn(build_model("deeplab_v2_resnet18", num_classes=3, msc_scales=(0.5, 0.75)), 1).eval()
    x = torch.randn(1, 3, 49, 61)
    with torch.no_grad():
        ref = msc(x)
    assert _rel(optimize_for_inference(msc)(x), ref) < 5e-2
    assert _rel(optimize_for_inference(msc, precision="fp32")(x), ref) < 1e-4
    # VGG (no batch-norm to fold, biases on every convolution): the bf16 mechanism is the same
    # as for the ResNets, so the fp32 path (layout conversion, no folding) is what is new here.
    vgg = _randomize_bn(build_model("deeplab_v1_largefov_vgg16", num_classes=3), 2).eval()
    x = torch.randn(1, 3, 25, 30)
    with torch.no_grad():
        ref = vgg(x)
    assert _rel(optimize_for_inference(vgg, precision="fp32")(x), ref) < 1e-4


def test_autocast_context(resnet18: nn.Module) -> None:
    x = torch.randn(1, 3, 41, 41)
    with torch.no_grad():
        ref = resnet18(x)
        with autocast("cpu", "bf16"):
            out = resnet18(x)
        with autocast(torch.device("cpu"), "fp32"):
            same = resnet18(x)
    assert out.dtype == torch.bfloat16 and same.dtype == torch.float32
    assert 0 < _rel(out.float(), ref) < 5e-2
    assert _rel(same, ref) == 0
    with pytest.raises(ValueError, match="precision='fp16'"):
        autocast("cpu", "fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precision='int8'"):
        optimize_for_inference(resnet18, precision="int8")  # type: ignore[arg-type]


def test_cli_models_lists_every_model_with_counts(capsys: pytest.CaptureFixture[str]) -> None:
    from deeplab.cli import models as cli_models

    parser = argparse.ArgumentParser()
    cli_models.add_arguments(parser)
    assert cli_models.run(parser.parse_args([])) == 0
    out = capsys.readouterr().out
    for name in list_models():
        assert name in out
    assert "44,048,532" in out and "20,505,429" in out
    from deeplab.models import resolve_precision

    assert f"precision 'auto' here: {resolve_precision('auto', 'cpu')} on cpu" in out
    assert cli_models.run(parser.parse_args(["--names"])) == 0
    assert capsys.readouterr().out.split() == list_models()
    assert cli_models.run(parser.parse_args(["--num-classes", "0"])) == 2
    assert "error:" in capsys.readouterr().err


def test_onnx_export_accepts_any_input_size(tmp_path) -> None:
    # The MSC input sizes are computed inside the exported graph, so one export serves every size.
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _randomize_bn(build_model("deeplab_v2_resnet18", num_classes=4, msc_scales=(0.5, 0.75)), 3).eval()
    path = tmp_path / "msc.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 65, 57),), str(path), dynamo=False, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 65, 57), (2, 3, 49, 70)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = model(x)
        out = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
        assert out.shape == ref.shape and _rel(out, ref) < 1e-4


# ---- precision "auto" ---------------------------------------------------------------------


@pytest.fixture
def bf16_units(monkeypatch):
    """Pretend the CPU has (True) or lacks (False) native bf16; returns a setter."""
    import deeplab.models.inference as inf

    def set_native(native: bool) -> None:
        monkeypatch.setattr(inf, "_native_bf16", lambda device_type, index=None: native)
        inf._warn_emulated_bf16.cache_clear()

    yield set_native
    inf._warn_emulated_bf16.cache_clear()


def test_native_bf16_on_this_cpu():
    """The real probe, unpatched: the bf16 units /proc/cpuinfo lists on x86 Linux, else oneDNN's
    own answer; never a GPU's."""
    from deeplab.models import native_bf16, resolve_precision

    try:
        lines = open("/proc/cpuinfo").read().splitlines()
    except OSError:
        lines = []
    flags = [line.split(":", 1)[1].split() for line in lines if line.startswith("flags")]
    if flags:
        expected = "avx512_bf16" in flags[0] or "amx_bf16" in flags[0]
    else:
        expected = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert native_bf16("cpu") is expected
    assert resolve_precision("auto", "cpu") == ("bf16" if expected else "fp32")
    assert native_bf16("meta") is False


@pytest.mark.parametrize(("flags", "native"), [({"avx2", "fma"}, False), ({"avx512f", "avx512bw"}, False),
                                               ({"avx512f", "avx512_bf16"}, True), ({"amx_tile", "amx_bf16"}, True)])
def test_native_bf16_reads_the_x86_flags(monkeypatch, flags, native):
    """AVX-512 alone is not enough: oneDNN runs bf16 there, but emulated."""
    import deeplab.models.inference as inf

    monkeypatch.setattr(inf, "_x86_cpu_flags", lambda: flags)
    inf._native_bf16.cache_clear()
    try:
        assert inf.native_bf16("cpu") is native
    finally:
        inf._native_bf16.cache_clear()


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_picks_bf16_only_where_native(bf16_units, native, recwarn):
    from deeplab.models import resolve_precision

    bf16_units(native)
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"  # asked for: kept, warned where emulated
    warned = [w for w in recwarn if issubclass(w.category, RuntimeWarning) and "emulated" in str(w.message)]
    assert len(warned) == (0 if native else 1)
    resolve_precision("bf16", "cpu")
    assert len([w for w in recwarn if "emulated" in str(w.message)]) == len(warned)  # once per process
    with pytest.raises(ValueError, match="auto"):
        resolve_precision("fp16", "cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_reaches_the_inference_path(bf16_units, native):
    """optimize_for_inference, evaluate's prepared model and autocast all follow the probe; an
    emulating CPU runs the exact fp32 function."""
    from deeplab.engine.inference import prepare_model

    bf16_units(native)
    torch.manual_seed(0)
    model = build_model("deeplab_v2_resnet18", num_classes=3, output_stride=16).eval()
    fast = optimize_for_inference(model)
    assert fast.precision == ("bf16" if native else "fp32")
    assert prepare_model(model).precision == fast.precision
    with autocast("cpu"):
        assert torch.is_autocast_enabled("cpu") is native
    if not native:
        x = torch.randn(1, 3, 65, 65)
        torch.testing.assert_close(fast(x), optimize_for_inference(model, precision="fp32")(x), rtol=0, atol=0)


def test_prepare_model_resolves_for_the_target_device(monkeypatch, recwarn):
    """A model still on the CPU, prepared for a device with bf16 units (here "meta" plays the
    GPU), runs in bf16 there and raises no emulation warning for the CPU it came from."""
    import deeplab.models.inference as inf
    from deeplab.engine.inference import prepare_model

    monkeypatch.setattr(inf, "_native_bf16", lambda device_type, index=None: device_type == "meta")
    inf._warn_emulated_bf16.cache_clear()
    model = build_model("deeplab_v2_resnet18", num_classes=3, output_stride=16).eval()
    prepared = prepare_model(model, device="meta")
    assert prepared.precision == "bf16"
    assert next(prepared.parameters()).device.type == "meta"
    assert not [w for w in recwarn if "emulated" in str(w.message)]
    assert optimize_for_inference(model).precision == "fp32"  # the CPU itself has none here
    inf._warn_emulated_bf16.cache_clear()
