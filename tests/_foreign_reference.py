"""Independent re-implementations of the foreign networks whose weights the project loads.

Written here from the layer definitions of torchvision (``models/resnet.py``,
``models/segmentation/deeplabv3.py``, ``fcn.py``) and VainF/DeepLabV3Plus-Pytorch
(``network/_deeplab.py``, ``network/backbone/resnet.py``): module names, order, bias, BN eps,
padding, ``align_corners=False`` and the order of concatenation as they have them, so that
their ``state_dict()`` keys are the files' keys and their outputs are the reference the
project's models must reproduce. Nothing here imports the project.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class TVBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        # torchvision "v1.5": the stride sits on the 3x3.
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class TVBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
        super().__init__()
        if dilation > 1:
            raise NotImplementedError("torchvision: Dilation > 1 not supported in BasicBlock")
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TVResNet(nn.Module):
    """torchvision's ResNet with ``replace_stride_with_dilation`` (and its ``fc``)."""

    def __init__(self, block, layers, replace_stride_with_dilation=(False, False, False), num_classes=1000):
        super().__init__()
        self.inplanes, self.dilation = 64, 1
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2, replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], 2, replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], 2, replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, previous_dilation)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        return OrderedDict(low_level=low, out=self.layer4(self.layer3(self.layer2(low))))


def tv_resnet(depth: int, replace_stride_with_dilation=(False, False, False)) -> TVResNet:
    spec = {18: (TVBasicBlock, (2, 2, 2, 2)), 34: (TVBasicBlock, (3, 4, 6, 3)),
            50: (TVBottleneck, (3, 4, 6, 3)), 101: (TVBottleneck, (3, 4, 23, 3))}[depth]
    return TVResNet(*spec, replace_stride_with_dilation=replace_stride_with_dilation)


class _Backbone(nn.Module):
    """IntermediateLayerGetter: the ResNet's modules up to layer4, under the same names."""

    def __init__(self, resnet: TVResNet):
        super().__init__()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.add_module(name, getattr(resnet, name))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        l3 = self.layer3(self.layer2(low))
        return OrderedDict(low_level=low, aux=l3, out=self.layer4(l3))


class ASPPPooling(nn.Sequential):
    def __init__(self, in_channels, out_channels):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())

    def forward(self, x):
        size = x.shape[-2:]
        for mod in self:
            x = mod(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    def __init__(self, in_channels, atrous_rates, dropout=0.5):
        super().__init__()
        out = 256
        modules = [nn.Sequential(nn.Conv2d(in_channels, out, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU())]
        for rate in atrous_rates:
            modules.append(nn.Sequential(nn.Conv2d(in_channels, out, 3, padding=rate, dilation=rate, bias=False),
                                         nn.BatchNorm2d(out), nn.ReLU()))
        modules.append(ASPPPooling(in_channels, out))
        self.convs = nn.ModuleList(modules)
        self.project = nn.Sequential(nn.Conv2d(len(self.convs) * out, out, 1, bias=False), nn.BatchNorm2d(out),
                                     nn.ReLU(), nn.Dropout(dropout))

    def forward(self, x):
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


def deeplab_head(in_channels, num_classes, rates=(12, 24, 36), dropout=0.5):
    """torchvision's DeepLabHead (VainF's DeepLabHead.classifier is the same Sequential)."""
    return nn.Sequential(ASPP(in_channels, rates, dropout), nn.Conv2d(256, 256, 3, padding=1, bias=False),
                         nn.BatchNorm2d(256), nn.ReLU(), nn.Conv2d(256, num_classes, 1))


def fcn_head(in_channels, num_classes):
    inter = in_channels // 4
    return nn.Sequential(nn.Conv2d(in_channels, inter, 3, padding=1, bias=False), nn.BatchNorm2d(inter), nn.ReLU(),
                         nn.Dropout(0.1), nn.Conv2d(inter, num_classes, 1))


class TorchvisionDeepLabV3(nn.Module):
    """torchvision.models.segmentation.deeplabv3_resnet50/101 (output stride 8, aux head on layer3)."""

    def __init__(self, depth=50, num_classes=21, aux=True):
        super().__init__()
        self.backbone = _Backbone(tv_resnet(depth, (False, True, True)))
        self.classifier = deeplab_head(2048, num_classes)
        self.aux_classifier = fcn_head(1024, num_classes) if aux else None

    def logits(self, x):
        return self.classifier(self.backbone(x)["out"])

    def forward(self, x):
        out = F.interpolate(self.logits(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return OrderedDict(out=out)


class _VainFHeadV3(nn.Module):
    def __init__(self, in_channels, num_classes, rates):
        super().__init__()
        self.classifier = deeplab_head(in_channels, num_classes, rates, dropout=0.1)

    def forward(self, feature):
        return self.classifier(feature["out"])


class _VainFHeadV3Plus(nn.Module):
    def __init__(self, in_channels, low_level_channels, num_classes, rates):
        super().__init__()
        self.project = nn.Sequential(nn.Conv2d(low_level_channels, 48, 1, bias=False), nn.BatchNorm2d(48),
                                     nn.ReLU(inplace=True))
        self.aspp = ASPP(in_channels, rates, dropout=0.1)
        self.classifier = nn.Sequential(nn.Conv2d(304, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256),
                                        nn.ReLU(inplace=True), nn.Conv2d(256, num_classes, 1))

    def forward(self, feature):
        low = self.project(feature["low_level"])
        out = self.aspp(feature["out"])
        out = F.interpolate(out, size=low.shape[2:], mode="bilinear", align_corners=False)
        return self.classifier(torch.cat([low, out], dim=1))


class VainFDeepLab(nn.Module):
    """VainF's deeplabv3_resnetXX / deeplabv3plus_resnetXX (``modeling._segm_resnet``)."""

    def __init__(self, depth=50, num_classes=21, output_stride=16, plus=False):
        super().__init__()
        dilate = (False, False, True) if output_stride == 16 else (False, True, True)
        rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
        self.backbone = _Backbone(tv_resnet(depth, dilate))
        self.classifier = (_VainFHeadV3Plus(2048, 256, num_classes, rates) if plus
                           else _VainFHeadV3(2048, num_classes, rates))

    def logits(self, x):
        return self.classifier(self.backbone(x))

    def forward(self, x):
        return F.interpolate(self.logits(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics / affine parameters and conv weights of a sane scale (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()
