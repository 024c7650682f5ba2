"""Small layers shared by the backbones: frozen batch-norm and the output-stride schedule.

The paper trains with batch-norm frozen (ImageNet statistics, affine parameters not trained):
:class:`FrozenBatchNorm2d` and :func:`freeze_batchnorm` implement that. The atrous schedule
(which stage gets which stride and dilation for a given ``output_stride``) lives here, in one
place, so that every backbone derives its dilations the same way.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "FrozenBatchNorm2d",
    "freeze_batchnorm",
    "atrous_schedule",
    "scale_atrous_rates",
    "validate_atrous_rates",
    "RESNET_OUTPUT_STRIDES",
]

#: Output strides a ResNet backbone supports (the stem alone has stride 4).
RESNET_OUTPUT_STRIDES = (8, 16, 32)


class FrozenBatchNorm2d(nn.Module):
    """Batch-norm with fixed statistics and affine parameters (``y = (x - mean) / sqrt(var + eps) * w + b``).

    It has the same state-dict keys as :class:`torch.nn.BatchNorm2d` (``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``), all stored as buffers, so a
    checkpoint loads into either. It behaves like ``BatchNorm2d`` in eval mode in both train and
    eval mode, and has no trainable parameters.

    Args:
        num_features: number of channels.
        eps: added to the variance; 1e-5 as in the Caffe ResNet-101 of DeepLab v2.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # noqa: D401 - torch hook
        # Checkpoints written before BatchNorm2d had `num_batches_tracked` (and Caffe imports)
        # lack it; it carries no information for a frozen layer, so fill it in.
        key = prefix + "num_batches_tracked"
        if key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
        """Return a frozen copy of ``bn`` (its running statistics and affine parameters)."""
        frozen = cls(bn.num_features, eps=bn.eps)
        # The source's device and dtype, before copying: float64 statistics stay exact and a
        # bf16 model's state dict keeps its dtypes.
        ref = bn.running_mean if bn.running_mean is not None else bn.weight
        if ref is not None:
            frozen.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            if bn.affine:
                frozen.weight.copy_(bn.weight)
                frozen.bias.copy_(bn.bias)
            if bn.track_running_stats and bn.running_mean is not None:
                frozen.running_mean.copy_(bn.running_mean)
                frozen.running_var.copy_(bn.running_var)
                frozen.num_batches_tracked.copy_(bn.num_batches_tracked)
        return frozen

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` of ``model`` by a :class:`FrozenBatchNorm2d`, in place.

    The state-dict keys do not change, so weights saved before or after freezing load either
    way. Returns ``model`` for chaining.

    Args:
        model: any module; its ``BatchNorm2d`` children (at any depth) are replaced.
    """
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, FrozenBatchNorm2d.from_batchnorm(child))
        else:
            freeze_batchnorm(child)
    return model


def atrous_schedule(output_stride: int) -> tuple[tuple[int, int], ...]:
    """Return ``(stride, dilation)`` of the four ResNet stages ``layer1..layer4`` (conv2_x..conv5_x).

    The single place where dilation is derived from the output stride: every stage whose
    stride is removed multiplies the dilation of itself and of all later stages by 2, which is
    what keeps the function of the network unchanged (the atrous identity).

    Args:
        output_stride: 8 (the paper: conv4_x dilation 2, conv5_x dilation 4), 16 or 32.
    """
    if output_stride not in RESNET_OUTPUT_STRIDES:
        raise ValueError(
            f"output_stride={output_stride!r} is not supported: use one of {RESNET_OUTPUT_STRIDES} "
            "(8 is the paper's setting, 16 is about 3x cheaper, 32 is the plain classifier stride)"
        )
    schedule = []
    current, dilation = 4, 1  # the stem (stride-2 conv1 + stride-2 max pool) gives stride 4
    for stride in (1, 2, 2, 2):
        if stride > 1 and current * stride > output_stride:
            dilation *= stride
            stride = 1
        current *= stride
        schedule.append((stride, dilation))
    return tuple(schedule)


def scale_atrous_rates(atrous_rates: Sequence[int], output_stride: int) -> tuple[int, ...]:
    """Scale ASPP rates given at output stride 8 to ``output_stride`` (``rate * 8 / output_stride``).

    With scaled rates the same weights compute the same function at every supported stride.

    Args:
        atrous_rates: positive integer rates at output stride 8, e.g. ASPP-L ``(6, 12, 18, 24)``.
        output_stride: the network's output stride (8, 16 or 32).

    Raises:
        ValueError: if a rate is not a positive integer or does not scale to an integer.
    """
    rates = validate_atrous_rates(atrous_rates)
    if output_stride % 8 != 0 or output_stride < 8:
        raise ValueError(f"output_stride={output_stride!r} must be 8, 16 or 32 to scale atrous_rates")
    factor = output_stride // 8
    bad = [r for r in rates if r % factor]
    if bad:
        raise ValueError(
            f"atrous_rates={rates} are given at output stride 8 and become rate * 8 / {output_stride} "
            f"at output_stride={output_stride}; {bad} are not divisible by {factor}, so the same "
            f"weights could not compute the same function. Pass rates divisible by {factor} "
            f"(for example {tuple(factor * max(1, round(r / factor)) for r in rates)}) or use output_stride=8."
        )
    return tuple(r // factor for r in rates)


def validate_atrous_rates(atrous_rates: Sequence[int]) -> tuple[int, ...]:
    """Return ``atrous_rates`` as a tuple after checking they are a non-empty list of positive ints."""
    if isinstance(atrous_rates, (str, bytes)) or not isinstance(atrous_rates, Sequence):
        raise ValueError(
            f"atrous_rates={atrous_rates!r} must be a sequence of positive integers, e.g. (6, 12, 18, 24)"
        )
    rates = tuple(atrous_rates)
    if not rates:
        raise ValueError("atrous_rates=() is empty: give at least one rate, e.g. (6, 12, 18, 24)")
    for r in rates:
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
            raise ValueError(
                f"atrous_rates={rates!r}: {r!r} is not a positive integer; rates are dilations at "
                "output stride 8, e.g. ASPP-L (6, 12, 18, 24) or ASPP-S (2, 4, 8, 12)"
            )
    return tuple(int(r) for r in rates)
