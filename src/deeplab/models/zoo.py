"""Model names -> builders: :func:`build_model` and :func:`list_models`.

An explicit table (no registry filled by import side effects). Every entry names the paper's
architecture; ``atrous_rates`` are always given at output stride 8 and scaled to the chosen
``output_stride`` (:func:`deeplab.models.layers.scale_atrous_rates`): DeepLab v3's (12, 24, 36)
are its paper's (6, 12, 18) at output stride 16.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from deeplab.models import resnet, vgg
from deeplab.models.aspp import ASPP, VGGASPP
from deeplab.models.deeplab import DeepLab
from deeplab.models.deeplab_v3 import ASPP_V3_RATES, DECODER_CONVS, DeepLabV3
from deeplab.models.layers import scale_atrous_rates, validate_atrous_rates
from deeplab.models.msc import DeepLabMSC

__all__ = ["build_model", "list_models", "model_info", "ModelInfo", "ASPP_L", "ASPP_S", "LARGEFOV_RATE",
           "ASPP_V3_RATES", "model_build_kwargs", "set_output_stride"]

#: ASPP-L rates (the paper's default for v2) and ASPP-S rates, at output stride 8.
ASPP_L = (6, 12, 18, 24)
ASPP_S = (2, 4, 8, 12)
#: DeepLab-LargeFOV's single fc6 dilation.
LARGEFOV_RATE = (12,)


@dataclass(frozen=True)
class ModelInfo:
    """What a model name stands for (shown by ``deeplab models``)."""

    name: str
    backbone: str
    head: str
    default_atrous_rates: tuple[int, ...]
    output_strides: tuple[int, ...]
    description: str
    family: str = "v2"  # "v1", "v2", "v3" or "v3+"
    default_output_stride: int = 8  # v1/v2: the paper's 8; v3/v3+: 16, where their papers train
    default_resnet_layout: str | None = "caffe"  # None: not a ResNet

    @property
    def msc_fusion(self) -> str:
        """How multi-scale testing fuses: ``"max"`` (v1/v2 papers) or ``"mean"`` (v3 / v3+ papers)."""
        return "mean" if self.family in ("v3", "v3+") else "max"


_RESNETS: dict[str, Callable[..., resnet.ResNet]] = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
}

_MODELS: dict[str, ModelInfo] = {
    "deeplab_v1_largefov_vgg16": ModelInfo(
        "deeplab_v1_largefov_vgg16", "vgg16", "LargeFOV (fc6 3x3 rate 12, 1024 ch)", LARGEFOV_RATE,
        vgg.VGG_OUTPUT_STRIDES, "DeepLab-LargeFOV (v1): atrous VGG-16, one fc6-fc7-fc8 branch",
        family="v1", default_resnet_layout=None),
    "deeplab_v2_vgg16": ModelInfo(
        "deeplab_v2_vgg16", "vgg16", "ASPP (fc6-fc7-fc8 per rate, summed)", ASPP_L,
        vgg.VGG_OUTPUT_STRIDES, "DeepLab v2 VGG-16 with ASPP", default_resnet_layout=None),
    "deeplab_v2_resnet101": ModelInfo(
        "deeplab_v2_resnet101", "resnet101", "ASPP (3x3 classifier per rate, summed)", ASPP_L,
        (8, 16, 32), "DeepLab v2 ResNet-101 (Caffe layout), the paper's main model"),
    "deeplab_v2_resnet50": ModelInfo(
        "deeplab_v2_resnet50", "resnet50", "ASPP (3x3 classifier per rate, summed)", ASPP_L,
        (8, 16, 32), "DeepLab v2 with a Caffe-layout ResNet-50"),
    "deeplab_v2_resnet34": ModelInfo(
        "deeplab_v2_resnet34", "resnet34", "ASPP (3x3 classifier per rate, summed)", ASPP_L,
        (8, 16, 32), "DeepLab v2 with a basic-block ResNet-34 (light, for CPUs)"),
    "deeplab_v2_resnet18": ModelInfo(
        "deeplab_v2_resnet18", "resnet18", "ASPP (3x3 classifier per rate, summed)", ASPP_L,
        (8, 16, 32), "DeepLab v2 with a basic-block ResNet-18 (lightest, for CPUs)"),
}
for _depth in ("18", "34", "50", "101"):
    _MODELS[f"deeplab_v3_resnet{_depth}"] = ModelInfo(
        f"deeplab_v3_resnet{_depth}", f"resnet{_depth}", "ASPP v3 (1x1, 3 atrous 3x3, image pool; BN) + 3x3",
        ASPP_V3_RATES, (8, 16), f"DeepLab v3 with a ResNet-{_depth} (torchvision layout)",
        family="v3", default_output_stride=16, default_resnet_layout="torchvision")
for _depth in ("18", "34", "50", "101"):
    _MODELS[f"deeplab_v3plus_resnet{_depth}"] = ModelInfo(
        f"deeplab_v3plus_resnet{_depth}", f"resnet{_depth}", "ASPP v3 + decoder (stride-4 features, 48 ch)",
        ASPP_V3_RATES, (8, 16), f"DeepLab v3+ (encoder-decoder) with a ResNet-{_depth} (torchvision layout)",
        family="v3+", default_output_stride=16, default_resnet_layout="torchvision")


def list_models() -> list[str]:
    """Return the names :func:`build_model` accepts, in a stable order."""
    return list(_MODELS)


def model_info(name: str) -> ModelInfo:
    """Return the :class:`ModelInfo` of ``name`` (raises ``ValueError`` listing the valid names)."""
    try:
        return _MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(_MODELS)}") from None


def build_model(
    name: str,
    *,
    num_classes: int,
    output_stride: int | None = None,
    atrous_rates: Sequence[int] | None = None,
    msc_scales: Sequence[float] | None = None,
    resnet_layout: str | None = None,
    multi_grid: Sequence[int] | None = None,
    decoder_convs: int | None = None,
) -> nn.Module:
    """Build a DeepLab network with freshly initialised weights.

    ``model(x)`` takes a normalised float batch ``(B, 3, H, W)`` (any H, W >= 1) and returns
    logits ``(B, num_classes, h, w)`` at the network's resolution, without upsampling: the
    output stride for v1 / v2 / v3, stride 4 for v3+. The model has ``.backbone`` (returns
    the last feature map), ``.output_stride``, ``.num_classes`` and ``.classifier_parameters()``
    (v2 ResNet: the ASPP classifiers; VGG: fc8; v3 / v3+: every layer above the backbone).

    With ``msc_scales`` (v1 / v2) the network is wrapped in :class:`~deeplab.models.msc.DeepLabMSC`:
    in eval mode it returns the max-fused logits at the scale-1 logits' size; in train mode a
    list ``[scale-1 logits, *logits of each extra scale, fused logits]``.

    Args:
        name: one of :func:`list_models`.
        num_classes: number of output classes (21 for VOC).
        output_stride: 8, 16 or 32 for v2 ResNets, 8 only for VGG-16, 8 or 16 for v3 / v3+;
            None: the model's default (v1 / v2: 8, as in their paper; v3 / v3+: 16, where their
            papers train; they evaluate at 8 or 16).
        atrous_rates: ASPP rates at output stride 8 (scaled to ``output_stride``); default
            ASPP-L ``(6, 12, 18, 24)`` for v2 (ASPP-S is ``(2, 4, 8, 12)``), one rate (12) for
            LargeFOV, ``(12, 24, 36)`` for v3 / v3+ (the papers' (6, 12, 18) at stride 16).
        msc_scales: v1 / v2 only: extra input scales for multi-scale inputs, e.g. ``(0.5, 0.75)``;
            None: single scale.
        resnet_layout: ResNet models: ``"caffe"`` (stride on the first 1x1 of a bottleneck; v2's
            default, the official release) or ``"torchvision"`` (stride on the 3x3; v3 / v3+'s
            default, the layout of torchvision's, timm's and VainF's weights).
        multi_grid: v3 / v3+: unit rates of the last stage's blocks, e.g. ``(1, 2, 4)`` (the v3
            paper); None: none.
        decoder_convs: v3+: the decoder's 3x3 convolutions, 2 (the paper, the default) or 1
            (VainF/DeepLabV3Plus-Pytorch's checkpoints).

    Raises:
        ValueError: unknown name (the message lists the valid ones), bad output stride, rates,
            scales, layout, multi-grid or class count, or an option the model does not have.
    """
    info = model_info(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive integer (21 for PASCAL VOC)")
    num_classes = int(num_classes)
    if output_stride is None:
        output_stride = info.default_output_stride
    if isinstance(output_stride, bool) or not isinstance(output_stride, numbers.Integral) \
            or output_stride not in info.output_strides:
        raise ValueError(
            f"output_stride={output_stride!r} is not supported by {name}: use one of {info.output_strides}"
            + (" (the official VGG-16 DeepLab computes its function only at stride 8; use a ResNet model "
               "for 16 or 32)" if info.backbone == "vgg16" else "")
        )
    output_stride = int(output_stride)
    v3 = info.family in ("v3", "v3+")
    if info.default_resnet_layout is None and resnet_layout is not None:
        raise ValueError(f"resnet_layout={resnet_layout!r}: {name} has no ResNet backbone")
    if not v3:
        for option, value in (("multi_grid", multi_grid), ("decoder_convs", decoder_convs)):
            if value is not None:
                raise ValueError(f"{option}={value!r} is a DeepLab v3 / v3+ option; {name} is DeepLab {info.family}")
    if info.family == "v3" and decoder_convs is not None:
        raise ValueError(f"decoder_convs={decoder_convs!r}: {name} (DeepLab v3) has no decoder; "
                         f"use {name.replace('_v3_', '_v3plus_')}")
    if v3 and msc_scales is not None:
        raise ValueError(
            f"msc_scales={msc_scales!r}: DeepLab v3 / v3+ are trained on one scale; multi-scale testing "
            "is an inference option (--msc, with mean fusion)"
        )
    rates = info.default_atrous_rates if atrous_rates is None else validate_atrous_rates(atrous_rates)
    if name == "deeplab_v1_largefov_vgg16" and len(rates) != 1:
        raise ValueError(
            f"atrous_rates={rates} for {name}: DeepLab-LargeFOV has a single fc6 branch, give one rate "
            "(the paper: (12,)); use deeplab_v2_vgg16 for several ASPP branches"
        )
    scaled = scale_atrous_rates(rates, output_stride)

    if info.backbone == "vgg16":
        backbone: nn.Module = vgg.vgg16(output_stride=output_stride)
        head: nn.Module = VGGASPP(backbone.out_channels, num_classes, scaled,
                                  pool5a=name == "deeplab_v1_largefov_vgg16")
        model: nn.Module = DeepLab(backbone, head, num_classes=num_classes, atrous_rates=rates, name=name)
    else:
        layout = resnet_layout or info.default_resnet_layout
        grid = None if multi_grid is None else tuple(multi_grid)
        backbone = _RESNETS[info.backbone](output_stride=output_stride, layout=layout, multi_grid=grid)
        if v3:
            if info.family == "v3+":
                decoder_convs = 2 if decoder_convs is None else decoder_convs
                if decoder_convs not in DECODER_CONVS:
                    raise ValueError(f"decoder_convs={decoder_convs!r}: use 2 (the v3+ paper) or 1 "
                                     "(VainF/DeepLabV3Plus-Pytorch's checkpoints)")
            model = DeepLabV3(backbone, num_classes=num_classes, atrous_rates=rates, scaled_rates=scaled,
                              name=name, decoder_convs=decoder_convs)
        else:
            model = DeepLab(backbone, ASPP(backbone.out_channels, num_classes, scaled), num_classes=num_classes,
                            atrous_rates=rates, name=name)
    if msc_scales is not None:
        return DeepLabMSC(model, msc_scales)
    return model


def model_build_kwargs(model: nn.Module) -> dict[str, object]:
    """The :func:`build_model` options that rebuild ``model`` (what weights metadata records).

    ``output_stride``, ``atrous_rates`` (at output stride 8) and ``msc_scales`` always; the
    ResNet layout when it is not the model's default; ``multi_grid`` and ``decoder_convs``
    where the model has them.
    """
    inner = getattr(model, "model", model)  # an optimize_for_inference copy
    kwargs: dict[str, object] = {}
    output_stride = getattr(inner, "output_stride", None)
    if isinstance(output_stride, int):
        kwargs["output_stride"] = output_stride
    rates = getattr(inner, "atrous_rates", None)
    if rates is not None:
        kwargs["atrous_rates"] = [int(r) for r in rates]
    scales = getattr(inner, "msc_scales", None)
    kwargs["msc_scales"] = [float(s) for s in scales] if scales else None
    name = getattr(inner, "name", None)
    info = _MODELS.get(name) if isinstance(name, str) else None
    layout = getattr(getattr(inner, "backbone", None), "layout", None)
    if info is not None and layout is not None and layout != info.default_resnet_layout:
        kwargs["resnet_layout"] = layout
    grid = getattr(getattr(inner, "backbone", None), "multi_grid", None)
    if grid is not None:
        kwargs["multi_grid"] = [int(r) for r in grid]
    if getattr(inner, "decoder_convs", None) is not None:
        kwargs["decoder_convs"] = int(inner.decoder_convs)
    return kwargs


def set_output_stride(model: nn.Module, output_stride: int) -> nn.Module:
    """Change the output stride of a built model in place: the same parameters (the optimiser's
    references stay valid), new strides, dilations and paddings, ASPP rates scaled.

    The geometry is copied from a twin built on the meta device with the same options, so it is
    exactly what :func:`build_model` gives at ``output_stride``. Returns ``model``.

    Raises:
        ValueError: the model does not support ``output_stride`` (e.g. VGG-16 beyond 8).
    """
    import torch

    name = getattr(model, "name", None)
    if name not in _MODELS:
        raise ValueError(f"set_output_stride needs a model from build_model, got {type(model).__name__}")
    kwargs = model_build_kwargs(model)
    kwargs["output_stride"] = output_stride
    with torch.device("meta"):
        twin = build_model(name, num_classes=model.num_classes, **kwargs)
    twin_modules = dict(twin.named_modules())
    for module_name, module in model.named_modules():
        other = twin_modules.get(module_name)
        if other is None:
            continue
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
            module.stride, module.padding, module.dilation = other.stride, other.padding, other.dilation
        for attr in ("output_stride", "logits_stride", "atrous_rates", "feature_info"):
            if hasattr(other, attr) and hasattr(module, attr) and not isinstance(getattr(type(module), attr, None),
                                                                                property):
                setattr(module, attr, getattr(other, attr))
    return model
