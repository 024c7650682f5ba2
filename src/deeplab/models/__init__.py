"""DeepLab networks: atrous VGG-16 / ResNet backbones, ASPP heads, multi-scale inputs (v1/v2),
the v3 ASPP with image pooling and the v3+ decoder (:mod:`deeplab.models.deeplab_v3`).

Public API::

    from deeplab.models import build_model, list_models
    model = build_model("deeplab_v2_resnet101", num_classes=21)          # output_stride 8, ASPP-L
    logits = model(x)                                                   # (B, 21, h, w), stride 8

See :func:`build_model` for the options, :func:`freeze_batchnorm` for the paper's frozen
batch-norm and :func:`optimize_for_inference` / :func:`autocast` for the fast CPU path.
"""

from __future__ import annotations

from deeplab.models.deeplab import MIN_INPUT_SIZE, DeepLab
from deeplab.models.deeplab_v3 import DeepLabV3
from deeplab.models.inference import autocast, fold_batchnorm, native_bf16, optimize_for_inference, resolve_precision
from deeplab.models.layers import FrozenBatchNorm2d, atrous_schedule, freeze_batchnorm, scale_atrous_rates
from deeplab.models.msc import DeepLabMSC
from deeplab.models.zoo import ASPP_L, ASPP_S, ModelInfo, build_model, list_models, model_info

__all__ = [
    "build_model",
    "list_models",
    "model_info",
    "ModelInfo",
    "DeepLab",
    "DeepLabV3",
    "DeepLabMSC",
    "FrozenBatchNorm2d",
    "freeze_batchnorm",
    "fold_batchnorm",
    "optimize_for_inference",
    "autocast",
    "native_bf16",
    "resolve_precision",
    "atrous_schedule",
    "scale_atrous_rates",
    "ASPP_L",
    "ASPP_S",
    "MIN_INPUT_SIZE",
]
