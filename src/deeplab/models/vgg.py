"""The atrous VGG-16 backbone of DeepLab-LargeFOV (v1) and DeepLab-ASPP-VGG (v2).

The official layout is not torchvision's VGG-16: every max pool is 3x3 with pad 1 and Caffe's
ceil rounding (pool1-3 stride 2, pool4-5 stride 1) and conv5_1-3 have dilation 2 (pad 2), so a
321x321 crop gives 41x41 logits and a 513x513 image 65x65. Convolutions have biases, no
batch-norm.

Output stride: only 8. The stride-1 pool4 and pool5 of the official network are plain
(undilated) 3x3 max pools at stride 8; a stride-16 network with the same weights would need a
*dilated* pool5 to compute the same function, which the Caffe network does not have, and the
published weights were trained at stride 8. Other strides are rejected instead of silently
computing a different function.

State-dict keys of the backbone (prefix ``backbone.`` inside a model) and their Caffe names::

    conv1_1.weight / .bias  ...  conv1_2    conv1_1 ... conv1_2    (64)
    conv2_1 ... conv2_2                     conv2_1 ... conv2_2    (128)
    conv3_1 ... conv3_3                     conv3_1 ... conv3_3    (256)
    conv4_1 ... conv4_3                     conv4_1 ... conv4_3    (512)
    conv5_1 ... conv5_3                     conv5_1 ... conv5_3    (512, dilation 2)

The pools (``pool1``..``pool5``) have no parameters. The heads (fc6/fc7/fc8) live in
:mod:`deeplab.models.aspp` under ``aspp.branches.{i}.fc6/fc7/fc8``.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["VGG16", "vgg16", "VGG_OUTPUT_STRIDES"]

#: The only output stride the official VGG-16 DeepLab supports (see the module docstring).
VGG_OUTPUT_STRIDES = (8,)

# (stage, number of convolutions, channels, dilation, pool stride)
_STAGES = ((1, 2, 64, 1, 2), (2, 2, 128, 1, 2), (3, 3, 256, 1, 2), (4, 3, 512, 1, 1), (5, 3, 512, 2, 1))


class VGG16(nn.Module):
    """Atrous VGG-16 (conv1_1 .. pool5), output stride 8; ``forward`` returns pool5 (512 channels).

    Args:
        output_stride: must be 8 (the official network); anything else raises ``ValueError``.
    """

    def __init__(self, *, output_stride: int = 8) -> None:
        super().__init__()
        if output_stride not in VGG_OUTPUT_STRIDES:
            raise ValueError(
                f"output_stride={output_stride!r} is not supported by the VGG-16 DeepLab models: only 8. "
                "Their stride-1 pool4/pool5 are undilated 3x3 max pools, so no other stride computes "
                "the same function with the same weights; use a ResNet model (output_stride 8, 16 or 32) "
                "for other strides"
            )
        self.output_stride = output_stride
        self.out_channels = 512
        self.feature_info: list[tuple[str, int, int]] = []
        in_channels, stride = 3, 1
        self._order: list[str] = []
        for stage, n_convs, channels, dilation, pool_stride in _STAGES:
            for i in range(1, n_convs + 1):
                name = f"conv{stage}_{i}"
                self.add_module(name, nn.Conv2d(in_channels, channels, 3, padding=dilation, dilation=dilation))
                self._order.append(name)
                in_channels = channels
            # Caffe rounds pooling sizes up; with 3x3/pad 1 that gives 321 -> 161 -> 81 -> 41.
            self.add_module(f"pool{stage}", nn.MaxPool2d(3, stride=pool_stride, padding=1, ceil_mode=True))
            self._order.append(f"pool{stage}")
            stride *= pool_stride
            self.feature_info.append((f"pool{stage}", channels, stride))
        self.relu = nn.ReLU(inplace=True)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        for name in self._order:
            x = getattr(self, name)(x)
            if name.startswith("conv"):
                x = self.relu(x)
        return x


def vgg16(*, output_stride: int = 8) -> VGG16:
    """Atrous VGG-16 backbone of the official DeepLab (only ``output_stride=8``)."""
    return VGG16(output_stride=output_stride)
