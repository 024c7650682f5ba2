"""Atrous spatial pyramid pooling (ASPP) heads: parallel atrous branches, summed.

``atrous_rates`` here are the rates actually applied (already scaled to the network's output
stride by :func:`deeplab.models.layers.scale_atrous_rates`).

State-dict keys (prefix ``aspp.`` inside a model) and their Caffe names:

ResNet (:class:`ASPP`, DeepLab v2 ResNet-101)::

    branches.{i}.weight / .bias        fc1_voc12_c{i}     3x3, dilation rate_i, backbone -> classes

VGG-16 (:class:`VGGASPP`; DeepLab-LargeFOV is the single-branch case)::

    branches.{i}.fc6.weight / .bias    fc6_{i+1} (LargeFOV: fc6)   3x3, dilation rate_i, 512 -> 1024
    branches.{i}.fc7.weight / .bias    fc7_{i+1} (LargeFOV: fc7)   1x1, 1024 -> 1024
    branches.{i}.fc8.weight / .bias    fc8_voc12_{i+1} (LargeFOV: fc8_voc12)   1x1, 1024 -> classes
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import Tensor, nn

__all__ = ["ASPP", "VGGASPP", "VGGBranch"]


class ASPP(nn.Module):
    """DeepLab v2 ResNet ASPP: one 3x3 atrous classifier per rate (with bias), outputs summed.

    Args:
        in_channels: channels of the backbone feature map (2048 for ResNet-50/101).
        num_classes: output channels.
        atrous_rates: the dilation of each branch at the network's output stride.
    """

    def __init__(self, in_channels: int, num_classes: int, atrous_rates: Sequence[int]) -> None:
        super().__init__()
        self.atrous_rates = tuple(atrous_rates)
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True) for r in self.atrous_rates
        )
        for conv in self.branches:
            # The official release initialises the classifiers with N(0, 0.01) and zero bias.
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out

    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        """All parameters: the ASPP convolutions are the classifiers (10x / 20x lr in the paper)."""
        return self.parameters()


class VGGBranch(nn.Module):
    """fc6 (3x3, dilation ``rate``, 1024) -> ReLU -> dropout -> fc7 (1x1, 1024) -> ReLU -> dropout -> fc8.

    Args:
        in_channels: 512 (pool5 of VGG-16).
        num_classes: output channels of fc8.
        rate: dilation (and padding) of fc6.
        hidden_channels: channels of fc6 and fc7 (1024 in the paper's LargeFOV and ASPP).
        dropout: dropout probability after fc6 and fc7 (Caffe ``Dropout``: element-wise).
    """

    def __init__(self, in_channels: int, num_classes: int, rate: int, *, hidden_channels: int = 1024,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.fc6 = nn.Conv2d(in_channels, hidden_channels, 3, padding=rate, dilation=rate)
        self.fc7 = nn.Conv2d(hidden_channels, hidden_channels, 1)
        self.fc8 = nn.Conv2d(hidden_channels, num_classes, 1)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        for conv in (self.fc6, self.fc7):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        # fc8 is the freshly initialised classifier in the official set-up: N(0, 0.01), zero bias.
        nn.init.normal_(self.fc8.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.fc8.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dropout(self.relu(self.fc6(x)))
        x = self.dropout(self.relu(self.fc7(x)))
        return self.fc8(x)


class VGGASPP(nn.Module):
    """VGG-16 ASPP: one fc6-fc7-fc8 branch per rate, outputs summed (LargeFOV: one branch, rate 12).

    Args:
        in_channels: 512 (pool5 of VGG-16).
        num_classes: output channels.
        atrous_rates: fc6 dilation of each branch.
        pool5a: apply the 3x3/1 average pool ``pool5a`` of the official DeepLab-LargeFOV prototxt
            before fc6 (it has no parameters; the v2 ASPP prototxt has none).
    """

    def __init__(self, in_channels: int, num_classes: int, atrous_rates: Sequence[int], *,
                 pool5a: bool = False) -> None:
        super().__init__()
        self.atrous_rates = tuple(atrous_rates)
        # Caffe's AVE pooling divides by the window size including padding: count_include_pad=True.
        self.pool5a = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=True) if pool5a else None
        self.branches = nn.ModuleList(VGGBranch(in_channels, num_classes, r) for r in self.atrous_rates)

    def forward(self, x: Tensor) -> Tensor:
        if self.pool5a is not None:
            x = self.pool5a(x)
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out

    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        """The fc8 parameters: the layers the paper trains at 10x (weights) / 20x (biases) lr."""
        for branch in self.branches:
            yield from branch.fc8.parameters()

