"""Name mappings from foreign weight layouts onto the project's state-dict keys.

Foreign layouts understood:

- **Caffe** (the official DeepLab releases): layer names such as ``conv1`` / ``bn_conv1`` /
  ``scale_conv1``, ``res4b22_branch2a``, ``fc1_voc12_c0`` (ResNet-101) and ``conv5_3``, ``fc6``,
  ``fc8_voc12`` / ``fc6_1``, ``fc8_voc12_4`` (VGG-16 LargeFOV / ASPP). Caffe splits batch-norm in
  two layers: ``BatchNorm`` holds ``(mean * f, var * f, f)`` (a moving-average scale factor
  ``f``; Caffe divides by it, and uses 0 when ``f`` is 0) and the following ``Scale`` holds
  ``gamma`` and ``beta``; both fold into one ``BatchNorm2d``. The multi-scale (MSC) training
  nets of DeepLab v2 repeat every layer for the 0.5 / 0.75 inputs with a ``res05`` / ``res075``
  name part and shared weights; those copies are dropped.
- **kazuto1011/deeplab-pytorch** ``DeepLabV2_ResNet101_MSC`` state dicts: ``base.layer1.conv1.conv.weight``,
  ``base.layer2.block1.reduce.bn.running_mean``, ``...conv3x3...``, ``...increase...``,
  ``...shortcut...`` (``proj`` in early versions), ``base.aspp.c0.weight`` (``aspp.stages.c0``
  in early versions; ``scale.`` instead of ``base.`` in early MSC wrappers).
- **torchvision** segmentation checkpoints (``deeplabv3_resnet101_coco-586e9e4e.pth``):
  ``backbone.conv1.weight``, ``backbone.layer4.2.conv3.weight``, ``classifier.0.convs.4.1.weight``
  (the ASPP), ``classifier.1`` / ``.2`` / ``.4`` (the 3x3, its BN, the classifier) and an
  auxiliary FCN head ``aux_classifier.*``, which is dropped.
- **VainF/DeepLabV3Plus-Pytorch** checkpoints: v3 ``classifier.classifier.0.convs.*`` (then as
  torchvision's), v3+ ``classifier.aspp.*``, ``classifier.project.*`` (the decoder's 1x1) and
  ``classifier.classifier.*`` (the decoder's 3x3(s), then the classifier).
- **ImageNet classification ResNets** of torchvision and timm: ``conv1.weight``, ``bn1.*``,
  ``layer1.0.conv1.weight`` ... and ``fc.*``, which is dropped: a backbone initialisation.

The project's own keys (see :mod:`deeplab.models.resnet`, :mod:`deeplab.models.vgg`,
:mod:`deeplab.models.aspp`) start at ``backbone.`` / ``aspp.``; a wrapper such as the MSC module
may put a prefix before them, which :func:`model_key_prefix` finds.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from deeplab.weights.caffe import CaffeLayer

__all__ = [
    "WeightsMismatchError",
    "model_key_prefix",
    "strip_prefix",
    "is_kazuto_layout",
    "kazuto_to_project",
    "caffe_to_state_dict",
    "CaffeImport",
    "ForeignImport",
    "detect_foreign_layout",
    "foreign_to_project",
    "FOREIGN_LAYOUTS",
]


class WeightsMismatchError(ValueError):
    """A weights file does not fit the model (missing / unexpected keys, other shapes)."""


_CORE_ROOTS = ("backbone.", "aspp.")


def model_key_prefix(keys) -> str:
    """Return what stands before ``backbone.`` in a model's state-dict keys ('' for a bare model).

    Args:
        keys: state-dict keys of a model (or of a file in the project's layout).
    """
    for key in keys:
        for root in _CORE_ROOTS:
            if key.startswith(root):
                return ""
            i = key.find("." + root)
            if i >= 0:
                return key[: i + 1]
    return ""


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` from every key that has it (others are kept unchanged)."""
    if not prefix:
        return dict(state)
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# kazuto1011/deeplab-pytorch

_KAZUTO_WRAPPERS = ("base.", "scale.")
_KAZUTO_UNITS = {"reduce": "1", "conv3x3": "2", "increase": "3"}
_KAZUTO_BLOCK = re.compile(
    r"^layer(?P<stage>[2-5])\.block(?P<block>\d+)\.(?P<unit>reduce|conv3x3|increase|shortcut|proj)"
    r"\.(?P<part>conv|bn)\.(?P<param>\w+)$"
)
_KAZUTO_STEM = re.compile(r"^layer1\.conv1\.(?P<part>conv|bn)\.(?P<param>\w+)$")
_KAZUTO_ASPP = re.compile(r"^aspp\.(?:stages\.)?c(?P<i>\d+)\.(?P<param>weight|bias)$")


def _strip_kazuto_wrapper(key: str) -> str:
    for w in _KAZUTO_WRAPPERS:
        if key.startswith(w):
            return key[len(w):]
    return key


def is_kazuto_layout(keys) -> bool:
    """True when the keys look like kazuto1011/deeplab-pytorch's DeepLab v2 (``layer2.block1.reduce...``)."""
    for key in keys:
        k = _strip_kazuto_wrapper(key)
        if _KAZUTO_BLOCK.match(k) or _KAZUTO_STEM.match(k):
            return True
    return False


def kazuto_to_project(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a kazuto1011 ``DeepLabV2_ResNet101_MSC`` state dict to the project's keys.

    ``layer1`` is the stem (``conv1`` + ``pool``), ``layer2..layer5`` are Caffe's res2..res5
    (the project's ``layer1..layer4``), ``blockN`` counts from 1, and a ``_ConvBnReLU`` unit holds
    ``.conv`` and ``.bn``.

    Returns:
        ``(renamed, unknown)``: the renamed tensors (project keys without any wrapper prefix)
        and the original keys that matched no rule.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        k = _strip_kazuto_wrapper(key)
        m = _KAZUTO_BLOCK.match(k)
        if m:
            stage = int(m["stage"]) - 1
            block = int(m["block"]) - 1
            param = m["param"]
            if m["unit"] in ("shortcut", "proj"):
                idx = "0" if m["part"] == "conv" else "1"
                out[f"backbone.layer{stage}.{block}.downsample.{idx}.{param}"] = value
            else:
                j = _KAZUTO_UNITS[m["unit"]]
                name = f"conv{j}" if m["part"] == "conv" else f"bn{j}"
                out[f"backbone.layer{stage}.{block}.{name}.{param}"] = value
            continue
        m = _KAZUTO_STEM.match(k)
        if m:
            name = "conv1" if m["part"] == "conv" else "bn1"
            out[f"backbone.stem.{name}.{m['param']}"] = value
            continue
        m = _KAZUTO_ASPP.match(k)
        if m:
            out[f"aspp.branches.{m['i']}.{m['param']}"] = value
            continue
        unknown.append(key)
    return out, unknown


# ---------------------------------------------------------------------------------------------
# torchvision, VainF/DeepLabV3Plus-Pytorch and ImageNet classification ResNets

#: The foreign PyTorch layouts besides kazuto1011's, as :func:`detect_foreign_layout` names them.
FOREIGN_LAYOUTS = ("torchvision", "vainf_v3", "vainf_v3plus", "imagenet")

# The ResNet stem: torchvision's conv1 / bn1 sit in the project's ``stem`` module.
_STEM = (("conv1.", "stem.conv1."), ("bn1.", "stem.bn1."))
# (foreign prefix, project prefix) after the backbone; the first match wins.
_HEADS: dict[str, tuple[tuple[str, str], ...]] = {
    "torchvision": (("classifier.0.", "aspp."), ("classifier.1.", "head.0."), ("classifier.2.", "head.1."),
                    ("classifier.4.", "classifier.")),
    "vainf_v3": (("classifier.classifier.0.", "aspp."), ("classifier.classifier.1.", "head.0."),
                 ("classifier.classifier.2.", "head.1."), ("classifier.classifier.4.", "classifier.")),
    "vainf_v3plus": (("classifier.aspp.", "aspp."), ("classifier.project.", "decoder.reduce.")),
}
_DROPPED = {"torchvision": ("aux_classifier.",), "imagenet": ("fc.",)}


@dataclass
class ForeignImport:
    """A foreign state dict renamed to the project's keys, and what was left out."""

    state_dict: dict[str, torch.Tensor]
    layout: str
    dropped: list[str] = field(default_factory=list)  # keys left out on purpose (aux head, fc)
    unknown: list[str] = field(default_factory=list)  # keys that match no rule

    @property
    def note(self) -> str:
        """One sentence on the dropped keys ('' when none)."""
        if not self.dropped:
            return ""
        what = "the auxiliary FCN head" if self.layout == "torchvision" else "the ImageNet classifier"
        roots = sorted({k.split(".")[0] for k in self.dropped})
        return f"dropped {what} ({len(self.dropped)} tensors: {', '.join(r + '.*' for r in roots)})"


def detect_foreign_layout(keys) -> str | None:
    """Name the layout of a torchvision / VainF / ImageNet ResNet state dict, or None.

    Args:
        keys: the state dict's keys (after any ``module.`` prefix was removed).
    """
    keys = list(keys)
    if "backbone.conv1.weight" in keys:
        if any(k.startswith("classifier.aspp.") for k in keys):
            return "vainf_v3plus"
        if any(k.startswith("classifier.classifier.0.convs.") for k in keys):
            return "vainf_v3"
        if any(k.startswith("classifier.0.convs.") for k in keys):
            return "torchvision"
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "imagenet"
    return None


def _decoder_refine_map(keys: list[str]) -> dict[str, str]:
    """VainF's v3+ ``classifier.classifier.{i}``: the 3x3 (conv, BN, ReLU) units, then the classifier
    last (index 3 with one 3x3, 6 with two)."""
    indices = sorted({int(m[1]) for k in keys if (m := re.match(r"^classifier\.classifier\.(\d+)\.", k))})
    if not indices:
        return {}
    last = indices[-1]
    out = {f"classifier.classifier.{last}.": "classifier."}
    for i in indices[:-1]:
        out[f"classifier.classifier.{i}."] = f"decoder.refine.{i}."
    return out


def foreign_to_project(state: Mapping[str, torch.Tensor], layout: str) -> ForeignImport:
    """Rename a state dict of ``layout`` (see :data:`FOREIGN_LAYOUTS`) to the project's keys.

    Returns:
        A :class:`ForeignImport`: the renamed tensors (project keys without a wrapper prefix),
        the keys dropped on purpose and the keys that match no rule.
    """
    if layout not in FOREIGN_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: one of {FOREIGN_LAYOUTS}")
    backbone = "" if layout == "imagenet" else "backbone."
    rules = [(backbone + a, "backbone." + b) for a, b in _STEM]
    rules.append((backbone + "layer", "backbone.layer"))
    rules += list(_HEADS.get(layout, ()))
    if layout == "vainf_v3plus":
        rules += list(_decoder_refine_map(list(state)).items())
    result = ForeignImport(state_dict={}, layout=layout)
    for key, value in state.items():
        if key.startswith(_DROPPED.get(layout, ())):
            result.dropped.append(key)
            continue
        for old, new in rules:
            if key.startswith(old):
                result.state_dict[new + key[len(old):]] = value
                break
        else:
            result.unknown.append(key)
    return result


# ---------------------------------------------------------------------------------------------
# Caffe

_MSC_COPY = re.compile(r"(^|_)res0\d+(?=_|$)")


def _canonical_caffe_name(name: str) -> tuple[str, bool]:
    """Drop the MSC branch marker (``res05`` / ``res075``); return (name, was_a_copy).

    Regular ResNet names only use res2..res5, so ``res0`` marks a multi-scale copy.
    """
    if "res0" not in name:
        return name, False
    return _MSC_COPY.sub("", name).strip("_"), True


@dataclass
class _Unit:
    """One module of the model and the Caffe layer(s) that feed it."""

    prefix: str  # model module path, without the wrapper prefix
    kind: str  # "conv" or "bn"
    candidates: tuple[str, ...] = ()  # Caffe layer names (conv / BatchNorm), first found wins
    pattern: re.Pattern[str] | None = None  # for classifier names that vary by data set
    scale_candidates: tuple[str, ...] = ()  # bn: the Scale layer names


@dataclass
class CaffeImport:
    """Result of mapping a caffemodel onto a model: tensors plus what did not map."""

    state_dict: dict[str, torch.Tensor]
    missing_units: list[str] = field(default_factory=list)  # model modules with no Caffe layer
    unused_layers: list[str] = field(default_factory=list)  # Caffe layers with blobs, not used
    notes: list[str] = field(default_factory=list)
    # "Caffe <layer>.blobs[i] (shape) -> <key> (shape)": tensors kept with the file's shape
    shape_mismatches: list[str] = field(default_factory=list)


def _resnet_block_names(n_blocks: int) -> list[tuple[str, ...]]:
    """Caffe block suffixes for a stage: ResNet-50 uses letters (a..f); ResNet-101/152 use
    ``a, b1, b2, ...`` in stages with more than three blocks. Both are offered."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = []
    for i in range(n_blocks):
        names = []
        if i < len(letters):
            names.append(letters[i])
        if i >= 1:
            names.append(f"b{i}")
        out.append(tuple(names))
    return out


_RESNET_CONV = re.compile(r"^backbone\.layer(?P<stage>\d)\.(?P<block>\d+)\.(?P<unit>conv[123]|bn[123]|downsample\.[01])$")
_VGG_CONV = re.compile(r"^backbone\.(?P<name>conv\d_\d)$")
_ASPP_RESNET = re.compile(r"^aspp\.branches\.(?P<i>\d+)$")
_ASPP_VGG = re.compile(r"^aspp\.branches\.(?P<i>\d+)\.(?P<fc>fc[678])$")


def _units_for(model_modules: Mapping[str, nn.Module]) -> list[_Unit]:
    """The Caffe counterpart of every parametrised module of a DeepLab model (project layout)."""
    names = set(model_modules)
    blocks_per_stage: dict[int, int] = {}
    aspp_branches = 0
    for name in names:
        m = re.match(r"^backbone\.layer(\d)\.(\d+)$", name)
        if m:
            s, b = int(m[1]), int(m[2])
            blocks_per_stage[s] = max(blocks_per_stage.get(s, 0), b + 1)
        m = re.match(r"^aspp\.branches\.(\d+)$", name)
        if m:
            aspp_branches = max(aspp_branches, int(m[1]) + 1)
    units: list[_Unit] = []
    for name in sorted(names):
        module = model_modules[name]
        is_conv = isinstance(module, nn.Conv2d)
        is_bn = hasattr(module, "running_mean") and hasattr(module, "running_var")
        if not (is_conv or is_bn):
            continue
        if name == "backbone.stem.conv1":
            units.append(_Unit(name, "conv", ("conv1",)))
        elif name == "backbone.stem.bn1":
            units.append(_Unit(name, "bn", ("bn_conv1",), scale_candidates=("scale_conv1",)))
        elif m := _RESNET_CONV.match(name):
            caffe_stage = int(m["stage"]) + 1
            block_names = _resnet_block_names(blocks_per_stage[int(m["stage"])])[int(m["block"])]
            unit = m["unit"]
            if unit.startswith("downsample"):
                branch = "1"
                kind = "conv" if unit.endswith("0") else "bn"
            else:
                branch = "2" + "abc"[int(unit[-1]) - 1]
                kind = "conv" if unit.startswith("conv") else "bn"
            stems = [f"{caffe_stage}{b}_branch{branch}" for b in block_names]
            if kind == "conv":
                units.append(_Unit(name, "conv", tuple(f"res{s}" for s in stems)))
            else:
                units.append(_Unit(name, "bn", tuple(f"bn{s}" for s in stems),
                                   scale_candidates=tuple(f"scale{s}" for s in stems)))
        elif m := _VGG_CONV.match(name):
            units.append(_Unit(name, "conv", (m["name"],)))
        elif m := _ASPP_RESNET.match(name):
            # fc1_voc12_c0, fc1_coco_c0, ...: the data set part varies with the release.
            units.append(_Unit(name, "conv", pattern=re.compile(rf"^fc1(_[a-z][a-z0-9]*)?_c{m['i']}$")))
        elif m := _ASPP_VGG.match(name):
            i, fc = int(m["i"]), m["fc"]
            if aspp_branches == 1:  # LargeFOV: fc6, fc7, fc8_voc12
                if fc == "fc8":
                    units.append(_Unit(name, "conv", pattern=re.compile(r"^fc8(_[a-z][a-z0-9]*)?$")))
                else:
                    units.append(_Unit(name, "conv", (fc,)))
            else:  # ASPP: fc6_1..fc6_4, fc7_1.., fc8_voc12_1..
                if fc == "fc8":
                    units.append(_Unit(name, "conv", pattern=re.compile(rf"^fc8(_[a-z][a-z0-9]*)?_{i + 1}$")))
                else:
                    units.append(_Unit(name, "conv", (f"{fc}_{i + 1}",)))
        else:
            raise WeightsMismatchError(
                f"no Caffe counterpart is known for the model's module {name!r}: Caffe weights exist "
                "for deeplab_v2_resnet101 / _resnet50, deeplab_v1_largefov_vgg16 and deeplab_v2_vgg16"
            )
    return units


def _fit(blob: np.ndarray, shape: torch.Size) -> np.ndarray | None:
    """Return ``blob`` reshaped to ``shape`` when only leading/trailing 1-axes differ (legacy
    4-D Caffe shapes such as (1, 1, 1, C) for a bias), else None."""
    if tuple(blob.shape) == tuple(shape):
        return blob
    squeezed_blob = [d for d in blob.shape if d != 1]
    squeezed_shape = [d for d in shape if d != 1]
    if squeezed_blob == squeezed_shape and blob.size == int(np.prod(shape)):
        return blob.reshape(tuple(shape))
    return None


def _shape_error(layer: str, blob_index: int, blob_shape, key: str, shape) -> str:
    return f"Caffe {layer}.blobs[{blob_index}] {tuple(blob_shape)} -> {key} {tuple(shape)}"


def caffe_to_state_dict(layers: list[CaffeLayer], model: nn.Module, *, source: str = "caffemodel",
                        check_geometry: bool = True) -> CaffeImport:
    """Map the layers of a caffemodel onto ``model``'s state-dict keys.

    Blob shapes are compared with the model's (legacy 4-D shapes such as ``(1, 1, 1, C)`` are
    reshaped); a blob that does not fit is returned with its own shape and listed in
    ``shape_mismatches``, for the loader to report or skip. When the model runs at output
    stride 8 like the Caffe nets, every convolution's stride, padding and dilation is compared
    with the Caffe layer's.

    Args:
        layers: from :func:`deeplab.weights.caffe.read_caffemodel`.
        model: a DeepLab model in the project's layout (optionally wrapped, e.g. by MSC).
        source: the file name, for messages.
        check_geometry: compare strides / dilations / padding (when the file records them).

    Returns:
        A :class:`CaffeImport`: the tensors (keys with the model's prefix), the model modules
        that found no Caffe layer and the Caffe layers that fed nothing.

    Raises:
        WeightsMismatchError: convolution geometry or blob counts disagree, or a layer name is
            ambiguous.
    """
    model_state = model.state_dict()
    prefix = model_key_prefix(model_state)
    modules = {name[len(prefix):]: m for name, m in model.named_modules() if name.startswith(prefix)}
    modules = {k: v for k, v in modules.items() if k.startswith(_CORE_ROOTS)}

    # Caffe layers by canonical name; MSC copies must repeat the scale-1 weights.
    by_name: dict[str, CaffeLayer] = {}
    notes: list[str] = []
    copies: list[tuple[str, CaffeLayer]] = []
    for layer in layers:
        if not layer.blobs:
            continue
        canonical, is_copy = _canonical_caffe_name(layer.name)
        if is_copy:
            copies.append((canonical, layer))
            continue
        if canonical in by_name:
            raise WeightsMismatchError(f"{source}: two layers named {canonical!r} with weights")
        by_name[canonical] = layer
    for canonical, layer in copies:
        if canonical not in by_name:
            by_name[canonical] = layer  # only the copy exists: use it
            continue
        base = by_name[canonical]
        same = len(base.blobs) == len(layer.blobs) and all(
            a.shape == b.shape and np.array_equal(a, b) for a, b in zip(base.blobs, layer.blobs)
        )
        if not same:
            notes.append(f"multi-scale copy {layer.name!r} differs from {canonical!r}; kept {canonical!r}")

    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    mismatches: list[str] = []  # blob counts: the layer is of another kind
    shape_mismatches: list[str] = []
    geometry: list[str] = []

    def find(unit: _Unit) -> str | None:
        if unit.pattern is not None:
            found = [n for n in by_name if unit.pattern.match(n)]
            if len(found) > 1:
                raise WeightsMismatchError(
                    f"{source}: several Caffe layers {sorted(found)} fit the model's {unit.prefix}: "
                    "is the file for another variant (LargeFOV vs ASPP)?"
                )
            return found[0] if found else None
        for c in unit.candidates:
            if c in by_name:
                return c
        return None

    def put(key: str, blob: np.ndarray, layer_name: str, index: int) -> None:
        target = model_state[prefix + key]
        fitted = _fit(blob, target.shape)
        if fitted is None:
            # Kept with the file's shape: the loader reports it (strict) or skips it (partial
            # loads, e.g. a classifier for another class count).
            shape_mismatches.append(_shape_error(layer_name, index, blob.shape, prefix + key, target.shape))
            fitted = blob
        out[prefix + key] = torch.from_numpy(np.ascontiguousarray(fitted, dtype=np.float32)).to(target.dtype)

    for unit in _units_for(modules):
        name = find(unit)
        if name is None:
            missing.append(unit.prefix)
            continue
        layer = by_name[name]
        used.add(name)
        module = modules[unit.prefix]
        if unit.kind == "conv":
            has_bias = getattr(module, "bias", None) is not None
            expected = 2 if has_bias else 1
            if len(layer.blobs) != expected:
                mismatches.append(
                    f"Caffe {name} has {len(layer.blobs)} blobs, {unit.prefix} needs {expected} "
                    f"({'weight, bias' if has_bias else 'weight'})"
                )
                continue
            put(f"{unit.prefix}.weight", layer.blobs[0], name, 0)
            if has_bias:
                put(f"{unit.prefix}.bias", layer.blobs[1], name, 1)
            if check_geometry and layer.conv is not None and getattr(model, "output_stride", 8) == 8:
                g = layer.conv
                ours = (tuple(module.stride), tuple(module.padding), tuple(module.dilation))
                theirs_dil = g.dilation if g.dilation is not None else tuple(module.dilation)
                theirs = (tuple(g.stride), tuple(g.pad), tuple(theirs_dil))
                if ours != theirs:
                    geometry.append(
                        f"{name}: Caffe stride/pad/dilation {theirs} vs {unit.prefix} {ours}"
                    )
        else:
            if len(layer.blobs) != 3:
                mismatches.append(f"Caffe {name} ({layer.type}) has {len(layer.blobs)} blobs, a BatchNorm has 3")
                continue
            mean, var, factor = layer.blobs
            f = float(factor.reshape(-1)[0]) if factor.size else 1.0
            # Caffe's BatchNormLayer: scale = (f == 0 ? 0 : 1 / f); mean = blobs[0] * scale ...
            inv = 0.0 if f == 0 else 1.0 / f
            put(f"{unit.prefix}.running_mean", (mean.astype(np.float64) * inv).astype(np.float32), name, 0)
            put(f"{unit.prefix}.running_var", (var.astype(np.float64) * inv).astype(np.float32), name, 1)
            nbt = prefix + f"{unit.prefix}.num_batches_tracked"
            if nbt in model_state:
                out[nbt] = torch.zeros_like(model_state[nbt])
            scale_name = next((c for c in unit.scale_candidates if c in by_name), None)
            if scale_name is None:
                missing.append(f"{unit.prefix} (Scale layer {unit.scale_candidates[0]})")
                continue
            used.add(scale_name)
            scale = by_name[scale_name]
            if len(scale.blobs) != 2:
                mismatches.append(f"Caffe {scale_name} has {len(scale.blobs)} blobs, a Scale with bias has 2")
                continue
            put(f"{unit.prefix}.weight", scale.blobs[0], scale_name, 0)
            put(f"{unit.prefix}.bias", scale.blobs[1], scale_name, 1)

    # The ResNet of the Caffe release strides on the first 1x1 (branch2a), never on the 3x3
    # (branch2b); a file that does is a torchvision-style network and computes something else.
    for name, layer in by_name.items():
        if re.match(r"^res\d\w*_branch2b$", name) and layer.conv is not None and layer.conv.stride != (1, 1):
            geometry.append(f"{name}: stride {layer.conv.stride} on the 3x3 (this is not the DeepLab Caffe layout)")

    if mismatches:
        raise WeightsMismatchError(f"{source} does not fit the model: " + "; ".join(mismatches[:4]))
    if geometry:
        raise WeightsMismatchError(
            f"{source}: convolution geometry differs from the model: " + "; ".join(geometry[:4])
        )
    unused = [n for n in by_name if n not in used]  # file order: the first ones say most
    for note in notes:
        warnings.warn(f"{source}: {note}", stacklevel=2)
    return CaffeImport(state_dict=out, missing_units=missing, unused_layers=unused, notes=notes,
                       shape_mismatches=shape_mismatches)
