"""The DeepLab network: a backbone followed by an ASPP head, logits at the network's stride."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["DeepLab", "MIN_INPUT_SIZE", "check_input"]

#: Smallest input height/width every model accepts. Padding keeps every 3x3 convolution and the
#: ceil-mode pools at >= 1 output pixel, so any size from 1 up works (odd or even); the logits
#: are ceil(size / 8)-ish (exactly: the Caffe ceil formula per layer, e.g. 321 -> 41, 513 -> 65).
MIN_INPUT_SIZE = 1


def check_input(x: Tensor, *, min_size: int = MIN_INPUT_SIZE) -> None:
    """Raise ``ValueError`` unless ``x`` is a float batch ``(B, 3, H, W)`` with ``H, W >= min_size``."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return  # shapes are symbolic while exporting; they were checked on the eager model
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor of shape (B, 3, H, W), got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(
            f"expected a normalised image batch of shape (B, 3, H, W), got {tuple(x.shape)}; "
            "add a batch dimension with x[None] and put channels first (x.permute(2, 0, 1))"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"expected a floating-point image batch, got dtype {x.dtype}; normalise it first "
            "(deeplab.data.transforms.normalize_image)"
        )
    h, w = x.shape[-2:]
    if h < min_size or w < min_size:
        raise ValueError(
            f"input size {h}x{w} is too small: any height and width >= {min_size} work "
            "(odd or even; the paper uses 321x321 crops and 513x513 test images)"
        )


class DeepLab(nn.Module):
    """DeepLab v1/v2: ``aspp(backbone(x))``, logits at the network's resolution (no upsampling).

    Build it with :func:`deeplab.models.build_model`.

    Args:
        backbone: returns its last feature map; has ``out_channels`` and ``output_stride``.
        aspp: the head (ASPP or LargeFOV); has ``classifier_parameters()``.
        num_classes: number of output channels.
        atrous_rates: the rates at output stride 8 (as requested; the head applies them scaled).
        name: the model name in :func:`deeplab.models.list_models`.

    Attributes:
        output_stride: input size / logits size (for sizes divisible by it).
        num_classes: number of classes.
    """

    def __init__(self, backbone: nn.Module, aspp: nn.Module, *, num_classes: int,
                 atrous_rates: tuple[int, ...], name: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.aspp = aspp
        self.num_classes = num_classes
        self.output_stride: int = backbone.output_stride
        self.atrous_rates = atrous_rates
        self.name = name
        self.msc_scales: tuple[float, ...] | None = None

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``(B, num_classes, h, w)`` for a normalised batch ``x`` ``(B, 3, H, W)``."""
        check_input(x)
        return self.aspp(self.backbone(x))

    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the paper trains at 10x (weights) / 20x (biases) lr: ResNet ASPP, VGG fc8."""
        return self.aspp.classifier_parameters()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_classes={self.num_classes}, output_stride={self.output_stride}, " \
               f"atrous_rates={self.atrous_rates}"
