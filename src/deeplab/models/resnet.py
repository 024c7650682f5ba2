"""Atrous ResNet backbones in two layouts: the official DeepLab v2 Caffe release and torchvision's.

``layout="caffe"`` (DeepLab v2's default): the stride of a bottleneck block sits on its first 1x1
convolution (``branch2a``), not on the 3x3; the stem max pool is 3x3, stride 2, pad 1 with ceil
rounding (321 -> 41 and 513 -> 65 at output stride 8).

``layout="torchvision"`` ("ResNet v1.5"; DeepLab v3 / v3+'s default): the stride sits on the 3x3
of a bottleneck and the stem max pool rounds down, as in torchvision, timm and
VainF/DeepLabV3Plus-Pytorch, whose weights therefore load into it (an input of size n gives
``ceil(n / output_stride)`` features). When a stage's stride becomes dilation, the first 3x3 of
its first block keeps the previous dilation, as torchvision's ``replace_stride_with_dilation``
does (it reads the input grid, like the strided convolution it replaces).

Both: convolutions have no bias and batch-norm uses eps 1e-5. Dilations come from
:func:`~deeplab.models.layers.atrous_schedule`; ``multi_grid`` (DeepLab v3) multiplies the
dilation of the last stage's units by the given unit rates. The basic blocks of ResNet-18/34
are the same in both layouts (the stride sits on the first 3x3); only the stem pool differs.

State-dict keys of a backbone (prefix ``backbone.`` inside a model) and their Caffe names
(``{s}`` = stage 2..5, ``{b}`` = block letter ``a``, ``b``, ``c`` or ``a``, ``b1``, ``b2``... for
ResNet-101's res3 / res4; a Caffe BatchNorm + Scale pair maps onto one ``bn*``: BatchNorm
holds ``running_mean`` / ``running_var``, Scale holds ``weight`` / ``bias``)::

    stem.conv1.weight                     conv1                      (64, 3, 7, 7), stride 2, no bias
    stem.bn1.{weight,bias}                scale_conv1
    stem.bn1.{running_mean,running_var}   bn_conv1
    layer{s-1}.{i}.conv1.weight           res{s}{b}_branch2a         1x1 reduce, carries the block stride
    layer{s-1}.{i}.bn1.*                  bn{s}{b}_branch2a / scale{s}{b}_branch2a
    layer{s-1}.{i}.conv2.weight           res{s}{b}_branch2b         3x3, dilation from the output stride
    layer{s-1}.{i}.bn2.*                  bn{s}{b}_branch2b / scale{s}{b}_branch2b
    layer{s-1}.{i}.conv3.weight           res{s}{b}_branch2c         1x1 expand (x4)
    layer{s-1}.{i}.bn3.*                  bn{s}{b}_branch2c / scale{s}{b}_branch2c
    layer{s-1}.0.downsample.0.weight      res{s}a_branch1            1x1 projection shortcut (stride)
    layer{s-1}.0.downsample.1.*           bn{s}a_branch1 / scale{s}a_branch1

``layer1..layer4`` are the paper's conv2_x..conv5_x (Caffe ``res2..res5``); ``{i}`` counts the
blocks from 0 (``a`` = 0, ``b``/``b1`` = 1, ...). The basic-block ResNet-18/34 (no Caffe
release; light CPU backbones) use ``conv1``/``bn1`` (3x3, carries the stride, as in the
original ResNet paper), ``conv2``/``bn2`` (3x3) and the same ``downsample.0/1``.
"""

from __future__ import annotations

from torch import Tensor, nn

from deeplab.models.layers import atrous_schedule

__all__ = ["Bottleneck", "BasicBlock", "ResNet", "RESNET_LAYOUTS", "resnet18", "resnet34", "resnet50", "resnet101"]

#: Where a ResNet puts its strides: the DeepLab v2 Caffe release or torchvision ("v1.5").
RESNET_LAYOUTS = ("caffe", "torchvision")

_BN_EPS = 1e-5  # the Caffe ResNet-101 of DeepLab v2 uses eps 1e-5 (also PyTorch's default)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS)


class Bottleneck(nn.Module):
    """Bottleneck 1x1 -> 3x3 (dilation) -> 1x1 (x4), plus the shortcut.

    Args:
        in_channels: channels of the block input.
        planes: channels of the 1x1 reduce and the 3x3 (the output has ``4 * planes``).
        stride: stride of the block (and of the projection shortcut).
        dilation: dilation (and padding) of the 3x3 convolution.
        previous_dilation: dilation of the 3x3 when it carries the stride (torchvision layout).
        stride_on_3x3: False: the stride sits on the first 1x1 (Caffe); True: on the 3x3
            (torchvision, "ResNet v1.5"), whose dilation is then ``previous_dilation``.
    """

    expansion = 4
    #: (conv, batch-norm) pairs in the order they run; used by BN folding.
    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(self, in_channels: int, planes: int, *, stride: int = 1, dilation: int = 1,
                 previous_dilation: int = 1, stride_on_3x3: bool = False) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        # Caffe: the stride sits before the 3x3, which always takes the stage's new dilation.
        d2 = previous_dilation if stride_on_3x3 else dilation
        self.conv1 = nn.Conv2d(in_channels, planes, 1, stride=1 if stride_on_3x3 else stride, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride if stride_on_3x3 else 1, padding=d2,
                               dilation=d2, bias=False)
        self.bn2 = _bn(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = _bn(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), _bn(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class BasicBlock(nn.Module):
    """Basic block 3x3 (stride) -> 3x3, plus the shortcut (ResNet-18/34).

    The stride sits on the first 3x3, so when a stage's stride is replaced by dilation the first
    3x3 of its first block keeps the *previous* dilation (it reads the input grid, like the
    strided convolution it replaces); every later 3x3 takes the new one. That keeps the atrous
    identity exact.

    Args:
        in_channels: channels of the block input.
        planes: channels of both 3x3 convolutions and of the output.
        stride: stride of the first 3x3 and of the projection shortcut.
        dilation: dilation of the second 3x3 (and of the first one in later blocks).
        previous_dilation: dilation of the first 3x3.
    """

    expansion = 1
    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"))

    def __init__(self, in_channels: int, planes: int, *, stride: int = 1, dilation: int = 1,
                 previous_dilation: int = 1, stride_on_3x3: bool = True) -> None:
        super().__init__()
        del stride_on_3x3  # a basic block has no 1x1: the stride always sits on the first 3x3
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=previous_dilation,
                               dilation=previous_dilation, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = _bn(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, planes, 1, stride=stride, bias=False), _bn(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class _Stem(nn.Module):
    """conv1 7x7/2 (no bias) -> BN -> ReLU -> max pool 3x3/2 pad 1 (Caffe ``pool1``: ceil mode)."""

    conv_bn_pairs = (("conv1", "bn1"),)

    def __init__(self, *, ceil_mode: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = _bn(64)
        self.relu = nn.ReLU(inplace=True)
        # Caffe rounds pooling output sizes up: ceil_mode=True is what makes 321 -> 41 at stride 8;
        # torchvision rounds down.
        self.pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=ceil_mode)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.relu(self.bn1(self.conv1(x))))


class ResNet(nn.Module):
    """Atrous ResNet backbone; ``forward(x)`` returns the last feature map (conv5_x).

    Args:
        block: :class:`Bottleneck` (ResNet-50/101) or :class:`BasicBlock` (ResNet-18/34).
        blocks_per_stage: number of blocks of ``layer1..layer4``, e.g. ``(3, 4, 23, 3)``.
        output_stride: 8, 16 or 32; the removed strides become dilation (see ``atrous_schedule``).
        layout: ``"caffe"`` (DeepLab v2 release) or ``"torchvision"`` (see the module docstring).
        multi_grid: DeepLab v3's unit rates of the last stage (one per block, e.g. ``(1, 2, 4)``):
            the 3x3 of block i of ``layer4`` gets the stage's dilation times ``multi_grid[i]``
            (the first block included, as in the v3 paper). None: plain dilation.

    Attributes:
        out_channels: channels of the returned feature map (2048 or 512).
        output_stride: input size / feature size (for sizes divisible by it).
        feature_info: ``[(name, channels, stride)]`` of the stem and of every stage.
    """

    def __init__(self, block: type[Bottleneck] | type[BasicBlock], blocks_per_stage: tuple[int, int, int, int],
                 *, output_stride: int = 8, layout: str = "caffe",
                 multi_grid: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if layout not in RESNET_LAYOUTS:
            raise ValueError(f"layout={layout!r} is not a ResNet layout: use one of {RESNET_LAYOUTS}")
        if multi_grid is not None:
            multi_grid = tuple(multi_grid)
            if len(multi_grid) != blocks_per_stage[3] or any(
                    isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in multi_grid):
                raise ValueError(
                    f"multi_grid={multi_grid!r} must give one positive int unit rate per block of the last "
                    f"stage ({blocks_per_stage[3]} blocks), e.g. (1, 2, 4) as in the DeepLab v3 paper"
                )
        schedule = atrous_schedule(output_stride)
        self.output_stride = output_stride
        self.layout = layout
        self.multi_grid = multi_grid
        self.stem = _Stem(ceil_mode=layout == "caffe")
        in_channels, previous_dilation, stride_so_far = 64, 1, 4
        self.feature_info: list[tuple[str, int, int]] = [("stem", 64, 4)]
        for index, ((stride, dilation), n_blocks, planes) in enumerate(
            zip(schedule, blocks_per_stage, (64, 128, 256, 512)), start=1
        ):
            blocks = []
            for i in range(n_blocks):
                first_dilation = previous_dilation if i == 0 else dilation
                block_dilation = dilation
                if index == 4 and multi_grid is not None:
                    block_dilation = first_dilation = dilation * multi_grid[i]
                blocks.append(block(
                    in_channels, planes,
                    stride=stride if i == 0 else 1,
                    dilation=block_dilation,
                    previous_dilation=first_dilation,
                    stride_on_3x3=layout == "torchvision",
                ))
                in_channels = planes * block.expansion
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
            previous_dilation = dilation
            stride_so_far *= stride
            self.feature_info.append((f"layer{index}", in_channels, stride_so_far))
        self.out_channels = in_channels
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)[1]

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(conv2_x features at stride 4, last feature map)``: the v3+ decoder needs both."""
        low_level = self.layer1(self.stem(x))
        return low_level, self.layer4(self.layer3(self.layer2(low_level)))


def resnet18(*, output_stride: int = 8, layout: str = "caffe", multi_grid: tuple[int, ...] | None = None) -> ResNet:
    """Basic-block ResNet-18 backbone (512 channels out); see :class:`ResNet` for the options."""
    return ResNet(BasicBlock, (2, 2, 2, 2), output_stride=output_stride, layout=layout,
                  multi_grid=multi_grid)


def resnet34(*, output_stride: int = 8, layout: str = "caffe", multi_grid: tuple[int, ...] | None = None) -> ResNet:
    """Basic-block ResNet-34 backbone (512 channels out); see :class:`ResNet` for the options."""
    return ResNet(BasicBlock, (3, 4, 6, 3), output_stride=output_stride, layout=layout,
                  multi_grid=multi_grid)


def resnet50(*, output_stride: int = 8, layout: str = "caffe", multi_grid: tuple[int, ...] | None = None) -> ResNet:
    """Bottleneck ResNet-50 backbone (2048 channels out); see :class:`ResNet` for the options."""
    return ResNet(Bottleneck, (3, 4, 6, 3), output_stride=output_stride, layout=layout,
                  multi_grid=multi_grid)


def resnet101(*, output_stride: int = 8, layout: str = "caffe", multi_grid: tuple[int, ...] | None = None) -> ResNet:
    """Bottleneck ResNet-101 backbone (2048 channels out; Caffe layout: DeepLab v2's); see :class:`ResNet`."""
    return ResNet(Bottleneck, (3, 4, 23, 3), output_stride=output_stride, layout=layout,
                  multi_grid=multi_grid)
