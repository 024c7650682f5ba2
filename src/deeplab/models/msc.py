"""Multi-scale inputs (MSC) with max fusion, as in DeepLab v2.

The same network runs on the image at scale 1 and at each extra scale (the paper: 0.75 and
0.5); every output is resized to the scale-1 logits' size and the maps are fused by a
pixel-wise max. Training sums the loss of every scale and of the fused map.

Resizing follows Caffe's ``Interp`` layer of the official prototxt: bilinear with
``align_corners=True`` and an input of size ``floor((H - 1) * scale) + 1`` (Caffe's
``shrink_factor``/``zoom_factor`` formula: 321 -> 161 at 0.5 and 241 at 0.75, 513 -> 257 / 385),
so the sample points of the scaled image lie on the original pixel grid where they can.
(kazuto1011/deeplab-pytorch uses ``align_corners=False`` and ``int(H * scale)``; the
difference is a fraction of a pixel.)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deeplab.models.deeplab import DeepLab, check_input

__all__ = ["DeepLabMSC", "validate_msc_scales", "scaled_size"]


def validate_msc_scales(msc_scales: Sequence[float]) -> tuple[float, ...]:
    """Return ``msc_scales`` as a tuple of floats after checking them (positive, finite, not 1)."""
    if isinstance(msc_scales, (str, bytes)) or not isinstance(msc_scales, Sequence) or not msc_scales:
        raise ValueError(
            f"msc_scales={msc_scales!r} must be a non-empty sequence of extra input scales, e.g. (0.5, 0.75); "
            "pass None for a single-scale model"
        )
    scales = []
    for s in msc_scales:
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s) or s <= 0:
            raise ValueError(f"msc_scales={tuple(msc_scales)!r}: {s!r} is not a positive finite number")
        if s == 1:
            raise ValueError(
                f"msc_scales={tuple(msc_scales)!r} contains 1: scale 1 is always run; list only the extra "
                "scales, e.g. (0.5, 0.75)"
            )
        scales.append(float(s))
    return tuple(scales)


def scaled_size(size: int, scale: float) -> int:
    """Size of an input side ``size`` at ``scale`` the way Caffe's Interp computes it: ``floor((size-1)*scale)+1``."""
    # The small epsilon keeps e.g. 320 * 0.75 = 240 from rounding down to 239 in binary floating point.
    return int(math.floor((size - 1) * scale + 1e-6)) + 1


def _scaled_input_size(x: Tensor, scale: float) -> tuple:
    h, w = x.shape[-2:]
    if torch.jit.is_tracing():
        # While exporting (ONNX), sizes are traced tensors: keep the arithmetic in the graph so
        # the exported model accepts any input size.
        return tuple(torch.floor((v - 1) * scale + 1e-6).long() + 1 if isinstance(v, Tensor) else scaled_size(v, scale)
                     for v in (h, w))
    return scaled_size(h, scale), scaled_size(w, scale)


class DeepLabMSC(nn.Module):
    """A DeepLab network run on several input scales with max fusion.

    It shares (not copies) the wrapped network's ``backbone`` and ``aspp``, so its state-dict
    keys are the same as the single-scale model's and weights load into either.

    ``forward(x)``:

    - eval mode: the fused logits ``(B, C, h, w)`` at the scale-1 logits' size ``(h, w)``;
    - train mode: ``list[Tensor]``: the scale-1 logits, then the logits of each scale in
      ``msc_scales`` (each at its own resolution), then the fused logits last (the paper's
      4-term loss with the default two extra scales).

    Args:
        model: the single-scale network (from :func:`deeplab.models.build_model`).
        msc_scales: the extra scales, e.g. ``(0.5, 0.75)``; scale 1 is always included.
    """

    def __init__(self, model: DeepLab, msc_scales: Sequence[float]) -> None:
        super().__init__()
        self.msc_scales = validate_msc_scales(msc_scales)
        self.backbone = model.backbone
        self.aspp = model.aspp
        self.num_classes: int = model.num_classes
        self.output_stride: int = model.output_stride
        self.atrous_rates = model.atrous_rates
        self.name: str = model.name

    def _logits(self, x: Tensor) -> Tensor:
        return self.aspp(self.backbone(x))

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        """Eval: fused logits; train: ``[scale-1 logits, *extra-scale logits, fused]`` (see class doc)."""
        check_input(x)
        logits = self._logits(x)
        size = logits.shape[-2:]
        pyramid = []
        for s in self.msc_scales:
            xs = F.interpolate(x, size=_scaled_input_size(x, s), mode="bilinear", align_corners=True)
            pyramid.append(self._logits(xs))
        fused = logits
        for out in pyramid:
            fused = torch.maximum(fused, F.interpolate(out, size=size, mode="bilinear", align_corners=True))
        if self.training:
            return [logits, *pyramid, fused]
        return fused

    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the paper trains at 10x (weights) / 20x (biases) lr: ResNet ASPP, VGG fc8."""
        return self.aspp.classifier_parameters()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, msc_scales={self.msc_scales}"
