"""DeepLab v3 (arXiv 1706.05587) and v3+ (arXiv 1802.02611): ASPP with batch-norm and image
pooling, and the v3+ encoder-decoder.

The layers follow torchvision's ``DeepLabHead`` and VainF/DeepLabV3Plus-Pytorch's
``DeepLabHeadV3Plus`` one for one (no bias before a batch-norm, BN eps 1e-5, bilinear
upsampling with ``align_corners=False``, concatenation order), so that their weights load
(:mod:`deeplab.weights.mapping`) and compute the same function.

State-dict keys (the backbone is :mod:`deeplab.models.resnet`'s, under ``backbone.``)::

    aspp.convs.0.{0,1}          1x1 conv (no bias), BN                       (ReLU)
    aspp.convs.{1,2,3}.{0,1}    3x3 conv of rate r_i (no bias), BN           (ReLU)
    aspp.convs.4.{1,2}          image pooling: (global average pool) 1x1 conv, BN (ReLU, upsampled)
    aspp.project.{0,1}          1x1 conv 5*256 -> 256 (no bias), BN          (ReLU, dropout)
    head.{0,1}                  v3: 3x3 conv 256 -> 256 (no bias), BN        (ReLU)
    decoder.reduce.{0,1}        v3+: 1x1 conv of the stride-4 features -> 48, BN   (ReLU)
    decoder.refine.{0,1[,3,4]}  v3+: 3x3 conv (48 + 256) -> 256, BN (ReLU) [, 3x3 256 -> 256, BN (ReLU)]
    classifier.{weight,bias}    1x1 conv 256 -> classes

torchvision names the same tensors ``classifier.0.*`` (ASPP), ``classifier.1/2`` (the 3x3 and
its BN) and ``classifier.4`` (the classifier); VainF names them ``classifier.aspp.*``,
``classifier.project.*`` (the decoder's 1x1) and ``classifier.classifier.*``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deeplab.models.deeplab import check_input

__all__ = ["ASPPv3", "DeepLabV3", "V3PlusDecoder", "ASPP_V3_RATES", "DECODER_CONVS"]

#: The v3 ASPP rates at output stride 8 (6, 12, 18 at output stride 16, where the papers train).
ASPP_V3_RATES = (12, 24, 36)
#: v3+ decoder depths: 2 3x3 convolutions in the paper, 1 in VainF/DeepLabV3Plus-Pytorch.
DECODER_CONVS = (1, 2)
_CHANNELS = 256  # every ASPP branch, the projection and the decoder (v3 / v3+ papers)
_LOW_LEVEL_CHANNELS = 48  # the v3+ decoder's reduction of the stride-4 features


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> list[nn.Module]:
    padding = 0 if kernel_size == 1 else dilation
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class _ImagePooling(nn.Sequential):
    """Global average pool -> 1x1 conv -> BN -> ReLU, upsampled back to the feature map's size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(in_channels, out_channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        # Upsampling a 1x1 map is a broadcast; F.interpolate keeps torchvision's graph (and ONNX's).
        return F.interpolate(super().forward(x), size=size, mode="bilinear", align_corners=False)


class ASPPv3(nn.Module):
    """DeepLab v3 ASPP: a 1x1 branch, one 3x3 branch per rate and image pooling, each 256
    channels with BN and ReLU, concatenated and projected by a 1x1 to 256 (BN, ReLU, dropout).

    Args:
        in_channels: channels of the backbone feature map (2048 for ResNet-50/101, 512 for 18/34).
        atrous_rates: dilation of each 3x3 branch at the network's output stride (three in the paper).
        dropout: after the projection (torchvision 0.5, VainF 0.1; inactive in eval mode).
    """

    def __init__(self, in_channels: int, atrous_rates: Sequence[int], *, dropout: float = 0.1) -> None:
        super().__init__()
        self.atrous_rates = tuple(atrous_rates)
        branches: list[nn.Module] = [nn.Sequential(*_conv_bn_relu(in_channels, _CHANNELS, 1))]
        branches += [nn.Sequential(*_conv_bn_relu(in_channels, _CHANNELS, 3, r)) for r in self.atrous_rates]
        branches.append(_ImagePooling(in_channels, _CHANNELS))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(*_conv_bn_relu(len(branches) * _CHANNELS, _CHANNELS, 1), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class V3PlusDecoder(nn.Module):
    """The v3+ decoder: stride-4 features reduced to 48 channels (1x1, BN, ReLU), concatenated
    after the encoder output upsampled bilinearly to their size, refined by 3x3 convolutions of
    256 (BN, ReLU).

    Args:
        low_level_channels: channels of the stride-4 features (conv2_x: 256, or 64 for ResNet-18/34).
        num_convs: 3x3 convolutions of the refinement: 2 (the paper) or 1 (VainF's checkpoints).
    """

    def __init__(self, low_level_channels: int, *, num_convs: int = 2) -> None:
        super().__init__()
        if num_convs not in DECODER_CONVS:
            raise ValueError(f"decoder_convs={num_convs!r}: use 2 (the v3+ paper) or 1 (VainF's checkpoints)")
        self.num_convs = num_convs
        self.reduce = nn.Sequential(*_conv_bn_relu(low_level_channels, _LOW_LEVEL_CHANNELS, 1))
        layers = _conv_bn_relu(_LOW_LEVEL_CHANNELS + _CHANNELS, _CHANNELS, 3)
        if num_convs == 2:
            layers += _conv_bn_relu(_CHANNELS, _CHANNELS, 3)
        self.refine = nn.Sequential(*layers)

    def forward(self, low_level: Tensor, encoder: Tensor) -> Tensor:
        low_level = self.reduce(low_level)
        encoder = F.interpolate(encoder, size=low_level.shape[-2:], mode="bilinear", align_corners=False)
        # VainF's order: the low-level features first.
        return self.refine(torch.cat([low_level, encoder], dim=1))


class DeepLabV3(nn.Module):
    """DeepLab v3 (``decoder_convs=None``) or v3+: logits at the network's resolution.

    v3: ``classifier(head(aspp(backbone(x))))`` at the output stride; v3+: the decoder joins
    the ASPP output and the backbone's stride-4 features, logits at stride 4. No upsampling to
    the image: :mod:`deeplab.engine.inference` does it (``align_corners`` says how). Build it
    with :func:`deeplab.models.build_model`.

    Args:
        backbone: a :class:`deeplab.models.resnet.ResNet` (``forward_features`` gives both maps).
        num_classes: output channels.
        atrous_rates: the ASPP rates at output stride 8 (as requested; applied scaled).
        scaled_rates: the rates at the backbone's output stride (what the ASPP applies).
        name: the model name in :func:`deeplab.models.list_models`.
        decoder_convs: None for v3; 1 or 2 for v3+ (the decoder's 3x3 convolutions).
        dropout: after the ASPP projection.

    Attributes:
        output_stride: the encoder's output stride (8 or 16); v3+ logits are at stride 4.
        logits_stride: input size / logits size (v3: the output stride; v3+: 4).
        align_corners: False: upsample the logits as torchvision and VainF do.
        msc_fusion: ``"mean"``: multi-scale testing averages the scales (v2 takes the max).
    """

    align_corners = False
    msc_fusion = "mean"

    def __init__(self, backbone: nn.Module, *, num_classes: int, atrous_rates: tuple[int, ...],
                 scaled_rates: tuple[int, ...], name: str, decoder_convs: int | None = None,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.backbone = backbone
        self.aspp = ASPPv3(backbone.out_channels, scaled_rates, dropout=dropout)
        if decoder_convs is None:
            self.head = nn.Sequential(*_conv_bn_relu(_CHANNELS, _CHANNELS, 3))
            self.decoder = None
        else:
            low_level_channels = dict((n, c) for n, c, _ in backbone.feature_info)["layer1"]
            self.head = None
            self.decoder = V3PlusDecoder(low_level_channels, num_convs=decoder_convs)
        self.classifier = nn.Conv2d(_CHANNELS, num_classes, 1)
        self.num_classes = num_classes
        self.output_stride: int = backbone.output_stride
        self.logits_stride: int = 4 if decoder_convs else backbone.output_stride
        self.atrous_rates = atrous_rates
        self.decoder_convs = decoder_convs
        self.name = name
        self.msc_scales: tuple[float, ...] | None = None
        for module in (self.aspp, self.head, self.decoder, self.classifier):
            for m in module.modules() if module is not None else ():
                # VainF's initialisation of the new layers (torchvision keeps PyTorch's defaults).
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``(B, num_classes, h, w)`` for a normalised batch ``x`` ``(B, 3, H, W)``."""
        check_input(x)
        low_level, features = self.backbone.forward_features(x)
        out = self.aspp(features)
        out = self.head(out) if self.decoder is None else self.decoder(low_level, out)
        return self.classifier(out)

    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        """The layers on top of the backbone (ASPP, head or decoder, classifier): the new layers
        of a fine-tune; the v3 / v3+ papers train them at the backbone's rate (multiplier 1)."""
        for module in (self.aspp, self.head, self.decoder, self.classifier):
            if module is not None:
                yield from module.parameters()

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, num_classes={self.num_classes}, output_stride={self.output_stride}, "
                f"atrous_rates={self.atrous_rates}, decoder_convs={self.decoder_convs}")
