"""Model names -> builders: :func:`build_model` and :func:`list_models`.

An explicit table (no registry filled by import side effects). Every entry names the paper's
architecture; ``atrous_rates`` are always given at output stride 8 and scaled to the chosen
``output_stride`` (:func:`deeplab.models.layers.scale_atrous_rates`).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from deeplab.models import resnet, vgg
from deeplab.models.aspp import ASPP, VGGASPP
from deeplab.models.deeplab import DeepLab
from deeplab.models.layers import scale_atrous_rates, validate_atrous_rates
from deeplab.models.msc import DeepLabMSC

__all__ = ["build_model", "list_models", "model_info", "ModelInfo", "ASPP_L", "ASPP_S", "LARGEFOV_RATE"]

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


_RESNETS: dict[str, Callable[..., resnet.ResNet]] = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
}

_MODELS: dict[str, ModelInfo] = {
    "deeplab_v1_largefov_vgg16": ModelInfo(
        "deeplab_v1_largefov_vgg16", "vgg16", "LargeFOV (fc6 3x3 rate 12, 1024 ch)", LARGEFOV_RATE,
        vgg.VGG_OUTPUT_STRIDES, "DeepLab-LargeFOV (v1): atrous VGG-16, one fc6-fc7-fc8 branch"),
    "deeplab_v2_vgg16": ModelInfo(
        "deeplab_v2_vgg16", "vgg16", "ASPP (fc6-fc7-fc8 per rate, summed)", ASPP_L,
        vgg.VGG_OUTPUT_STRIDES, "DeepLab v2 VGG-16 with ASPP"),
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
    output_stride: int = 8,
    atrous_rates: Sequence[int] | None = None,
    msc_scales: Sequence[float] | None = None,
) -> nn.Module:
    """Build a DeepLab network with freshly initialised weights.

    ``model(x)`` takes a normalised float batch ``(B, 3, H, W)`` (any H, W >= 1) and returns
    logits ``(B, num_classes, h, w)`` at the network's stride, without upsampling. The model
    has ``.backbone`` (returns the last feature map), ``.output_stride``, ``.num_classes`` and
    ``.classifier_parameters()`` (ResNet: the ASPP classifiers; VGG: fc8).

    With ``msc_scales`` the network is wrapped in :class:`~deeplab.models.msc.DeepLabMSC`:
    in eval mode it returns the max-fused logits at the scale-1 logits' size; in train mode a
    list ``[scale-1 logits, *logits of each extra scale, fused logits]``.

    Args:
        name: one of :func:`list_models`.
        num_classes: number of output classes (21 for VOC).
        output_stride: 8 (the paper), 16 or 32 for ResNets; 8 only for VGG-16.
        atrous_rates: ASPP rates at output stride 8 (scaled to ``output_stride``); default
            ASPP-L ``(6, 12, 18, 24)``, ASPP-S is ``(2, 4, 8, 12)``; LargeFOV takes one rate (12).
        msc_scales: extra input scales for multi-scale inputs, e.g. ``(0.5, 0.75)``; None: single scale.

    Raises:
        ValueError: unknown name (the message lists the valid ones), bad output stride, rates,
            scales or class count.
    """
    info = model_info(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive integer (21 for PASCAL VOC)")
    num_classes = int(num_classes)
    if isinstance(output_stride, bool) or not isinstance(output_stride, numbers.Integral) \
            or output_stride not in info.output_strides:
        raise ValueError(
            f"output_stride={output_stride!r} is not supported by {name}: use one of {info.output_strides}"
            + (" (the official VGG-16 DeepLab computes its function only at stride 8; use a ResNet model "
               "for 16 or 32)" if info.backbone == "vgg16" else "")
        )
    output_stride = int(output_stride)
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
    else:
        backbone = _RESNETS[info.backbone](output_stride=output_stride)
        head = ASPP(backbone.out_channels, num_classes, scaled)
    model = DeepLab(backbone, head, num_classes=num_classes, atrous_rates=rates, name=name)
    if msc_scales is not None:
        return DeepLabMSC(model, msc_scales)
    return model
