"""Load weights of any supported format into a model, and build a model from a weights file.

Formats, chosen by the file name's suffix:

- ``.safetensors``: the project's own files (:mod:`deeplab.weights.safetensors_io`).
- ``.pth`` / ``.pt`` / ``.pth.tar`` / ``.ckpt``: PyTorch state dicts, read with
  ``torch.load(weights_only=True)`` (a file holding pickled code or objects is refused), in the
  project's layout, kazuto1011/deeplab-pytorch's, torchvision's segmentation models',
  VainF/DeepLabV3Plus-Pytorch's or an ImageNet classification ResNet's (torchvision, timm);
  common containers (``{"state_dict": ...}``, ``{"model_state": ...}``) and ``module.``
  prefixes (DataParallel / DDP) are unwrapped. Foreign files carry no metadata:
  :func:`build_from_weights` reads the network from their keys, with the output stride of the
  project they come from (torchvision: 8, VainF: 16) unless told otherwise.
- ``.caffemodel``: the official Caffe releases (:mod:`deeplab.weights.caffe`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deeplab.weights.mapping import (
    FOREIGN_LAYOUTS,
    WeightsMismatchError,
    caffe_to_state_dict,
    detect_foreign_layout,
    foreign_to_project,
    is_kazuto_layout,
    kazuto_to_project,
    model_key_prefix,
)
from deeplab.weights.safetensors_io import read_metadata, read_safetensors

__all__ = ["LoadResult", "load_weights", "apply_state_dict", "infer_num_classes", "read_state_dict", "build_from_weights",
           "weights_format", "foreign_model_options", "foreign_metadata_defaults", "layout_warning", "KNOWN_LAYOUTS"]

_TORCH_SUFFIXES = (".pth", ".pt", ".pth.tar", ".ckpt", ".bin")
_LAYOUT_NAMES = {
    "torchvision": "torchvision segmentation (deeplabv3_resnet50/101)",
    "vainf_v3": "VainF/DeepLabV3Plus-Pytorch deeplabv3",
    "vainf_v3plus": "VainF/DeepLabV3Plus-Pytorch deeplabv3plus",
    "imagenet": "ImageNet classification ResNet (torchvision / timm)",
}
#: What load_weights and convert understand, for error messages.
KNOWN_LAYOUTS = ("the project's (.safetensors, .pth)", "Caffe (.caffemodel)", "kazuto1011/deeplab-pytorch",
                 *(_LAYOUT_NAMES[k] for k in FOREIGN_LAYOUTS))
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "weights", "net")
_SHOW = 5  # how many keys of each kind an error names


@dataclass
class LoadResult:
    """What ``load_weights`` did: keys the file lacked, keys it had that the model does not,
    how many tensors it copied (BN batch counters not counted), the file's metadata
    (safetensors only) and its detected layout."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped_shape: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    layout: str = "deeplab"
    loaded: int = 0
    notes: list[str] = field(default_factory=list)  # what a foreign file lost on purpose, layout warnings


def weights_format(path: str | os.PathLike[str]) -> str:
    """Return ``"safetensors"``, ``"torch"`` or ``"caffe"`` from the file name, or raise ValueError."""
    name = Path(path).name.lower()
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith(".caffemodel"):
        return "caffe"
    if name.endswith(_TORCH_SUFFIXES):
        return "torch"
    raise ValueError(
        f"{path}: unknown weights format; expected .safetensors, .pth/.pt (PyTorch state dict) "
        "or .caffemodel"
    )


def _unwrap_container(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):  # not reachable with weights_only=True, kept for clarity
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = dict(obj)
    else:
        for key in _CONTAINER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                state = dict(inner)
                break
        else:
            non_tensor = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)][:_SHOW]
            raise ValueError(
                f"{path}: not a state dict: top-level keys {list(obj)[:8]} "
                f"(non-tensor entries: {non_tensor}); expected tensors or one of {list(_CONTAINER_KEYS)}"
            )
    # DataParallel / DistributedDataParallel wrap every key in "module.".
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (weights_only refusal), zip errors, EOF...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise ValueError(
                f"{path}: refused to unpickle: the file holds Python objects other than tensors "
                f"({msg}). Only plain state dicts are loaded (torch.load(weights_only=True)); "
                "re-save it with torch.save(model.state_dict(), ...) in a trusted environment"
            ) from None
        raise ValueError(f"{path}: not a readable PyTorch file ({msg})") from None
    return _unwrap_container(obj, path)


def read_state_dict(path: str | os.PathLike[str], model: nn.Module | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Read a weights file into the project's key layout (keys with ``model``'s wrapper prefix).

    Args:
        path: ``.safetensors``, ``.pth``/``.pt`` or ``.caffemodel``.
        model: needed for Caffe files (their layout depends on the network) and used to add a
            wrapper prefix (e.g. MSC) to the keys; optional otherwise.

    Returns:
        ``(state_dict, metadata, layout)`` with layout one of ``deeplab``, ``kazuto1011``,
        ``caffe``, ``torchvision``, ``vainf_v3``, ``vainf_v3plus``, ``imagenet``. For a foreign
        file whose tensors were dropped on purpose (torchvision's auxiliary head, an ImageNet
        ``fc``) the metadata holds ``import_note``, a sentence saying so.
    """
    path = Path(path)
    fmt = weights_format(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    target_prefix = model_key_prefix(model.state_dict()) if model is not None else ""
    if fmt == "caffe":
        if model is None:
            raise ValueError(f"{path}: a caffemodel can only be read for a given model (its layout depends on it)")
        from deeplab.weights.caffe import read_caffemodel

        return caffe_to_state_dict(read_caffemodel(path), model, source=str(path)).state_dict, {}, "caffe"
    if fmt == "safetensors":
        state, metadata = read_safetensors(path)
    else:
        state, metadata = _torch_load(path), {}
    layout = "deeplab"
    foreign = detect_foreign_layout(state)
    if foreign is not None:
        imported = foreign_to_project(state, foreign)
        if imported.unknown:
            raise WeightsMismatchError(
                f"{path}: looks like a {_LAYOUT_NAMES[foreign]} file, but {len(imported.unknown)} key(s) match "
                f"no rule, first: {imported.unknown[:_SHOW]}"
            )
        state, layout = imported.state_dict, foreign
        if imported.note:
            metadata = {**metadata, "import_note": imported.note}
    elif is_kazuto_layout(state):
        state, unknown = kazuto_to_project(state)
        if unknown:
            raise WeightsMismatchError(
                f"{path}: looks like a kazuto1011/deeplab-pytorch DeepLab v2 file, but {len(unknown)} key(s) "
                f"match no rule, first: {unknown[:_SHOW]} (another kazuto1011 model, e.g. DeepLab v3?)"
            )
        layout = "kazuto1011"
    else:
        file_prefix = model_key_prefix(state)
        if file_prefix:
            state = {(k[len(file_prefix):] if k.startswith(file_prefix) else k): v for k, v in state.items()}
    if target_prefix:
        state = {target_prefix + k: v for k, v in state.items()}
    return state, metadata, layout


def infer_num_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    """The class count of a project-layout state dict (its first classifier's output channels)."""
    for key, value in state.items():
        if key.endswith(("aspp.branches.0.weight", "aspp.branches.0.fc8.weight")) or \
                key == "classifier.weight" or key.endswith(".classifier.weight"):
            return int(value.shape[0])
    return None


def foreign_model_options(state: Mapping[str, torch.Tensor], layout: str) -> dict[str, Any]:
    """The :func:`~deeplab.models.build_model` name and options a renamed foreign state dict holds.

    ``model`` (from the head and the blocks per stage), ``num_classes`` (the classifier's
    outputs; absent for an ImageNet backbone), ``output_stride`` (torchvision's published
    models run at 8, VainF's at 16) and ``decoder_convs`` (v3+). Raises ValueError when the
    backbone is not a ResNet-18/34/50/101.
    """
    blocks = tuple(
        len({k.split(".")[2] for k in state if k.startswith(f"backbone.layer{i}.")}) for i in range(1, 5)
    )
    bottleneck = any(k.startswith("backbone.layer1.0.conv3.") for k in state)
    depths = {((2, 2, 2, 2), False): "18", ((3, 4, 6, 3), False): "34", ((3, 4, 6, 3), True): "50",
              ((3, 4, 23, 3), True): "101"}
    depth = depths.get((blocks, bottleneck))
    if depth is None:
        raise ValueError(f"a ResNet with {blocks} blocks per stage ({'bottleneck' if bottleneck else 'basic'} "
                         "blocks) is not one of ResNet-18/34/50/101")
    options: dict[str, Any] = {}
    if layout == "imagenet":
        options["backbone"] = f"resnet{depth}"
        return options
    plus = layout == "vainf_v3plus"
    options["model"] = f"deeplab_v3{'plus' if plus else ''}_resnet{depth}"
    n = infer_num_classes(state)
    if n is not None:
        options["num_classes"] = n
    options["output_stride"] = 8 if layout == "torchvision" else 16
    if plus:
        options["decoder_convs"] = len({k.split(".")[2] for k in state if k.startswith("decoder.refine.")
                                        and k.endswith(".weight") and state[k].ndim == 4})
    return options


def _describe(path: Path, layout: str, missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    parts = [f"{path} ({layout} layout) does not fit the model"]
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es), first: " + "; ".join(shapes[:_SHOW]))
    if missing:
        parts.append(f"{len(missing)} missing key(s), first: {missing[:_SHOW]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), first: {unexpected[:_SHOW]}")
    cause = "the file is for another network or variant; pick the model it was saved from"
    if layout != "checkpoint":  # a training checkpoint is the project's own: no other layout to offer
        cause += " (layouts read: " + "; ".join(KNOWN_LAYOUTS) + ")"
    head = ("aspp.", "classifier.", "head.", "decoder.")
    if shapes and all(any(h in s for h in (*head, "fc8")) for s in shapes) and not missing and not unexpected:
        cause = (
            "only the classifier differs: the file has another class count; build the model with "
            "the file's num_classes, or load with strict=False (deeplab convert --partial) to keep "
            "the backbone only"
        )
    elif missing and not unexpected and not shapes and all(any(h in k for h in head) for k in missing):
        cause = (
            "the file has no classifier (an initialisation file); load with strict=False "
            "(deeplab convert --partial) to fine-tune"
        )
    parts.append("likely cause: " + cause)
    return ". ".join(parts)


def apply_state_dict(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str,
    layout: str = "deeplab",
    strict: bool = True,
    extra_unexpected: list[str] | None = None,
) -> LoadResult:
    """Copy ``state`` (project keys, with the model's wrapper prefix) into ``model``.

    The checks of :func:`load_weights`; used directly by tools that read a file themselves.

    Args:
        model: the network.
        state: tensors by key.
        source: the file name, for messages.
        layout: the file's layout, for messages.
        strict: see :func:`load_weights`.
        extra_unexpected: more unexpected entries to report (e.g. unused Caffe layers).
    """
    expected = model.state_dict()
    shapes: list[str] = []
    fitting: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        if key not in expected:
            if key.endswith("num_batches_tracked"):
                continue  # a BN counter the model's layer does not keep
            unexpected.append(key)
        elif tuple(value.shape) != tuple(expected[key].shape):
            shapes.append(f"{key}: file {tuple(value.shape)} vs model {tuple(expected[key].shape)}")
        else:
            fitting[key] = value
    unexpected += list(extra_unexpected or [])
    missing = []
    for key in expected:
        if key in state:
            continue
        if key.endswith("num_batches_tracked"):
            # Old checkpoints and Caffe files have no counter; it carries no weights.
            fitting[key] = expected[key]
            continue
        missing.append(key)
    loaded = [k for k in fitting if not k.endswith("num_batches_tracked")]
    if (strict and (missing or unexpected or shapes)) or not loaded:
        raise WeightsMismatchError(_describe(Path(source), layout, missing, unexpected, shapes))
    model.load_state_dict(fitting, strict=False)
    return LoadResult(
        missing=missing,
        unexpected=unexpected,
        skipped_shape=[s.split(":")[0] for s in shapes],
        layout=layout,
        loaded=len(loaded),
    )


def load_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    strict: bool = True,
) -> LoadResult:
    """Load a weights file into ``model`` (in place), whatever its format.

    Args:
        model: the network, built with the same name / class count as the file.
        path: ``.safetensors``, ``.pth``/``.pt`` (project or kazuto1011 layout) or ``.caffemodel``.
        strict: every model tensor must come from the file and every file tensor must have a
            place in the model, with the same shape. With ``strict=False`` the tensors that fit
            are loaded and the rest (e.g. a classifier with another class count) keep their
            current values; the result lists what was skipped.

    Returns:
        A :class:`LoadResult` (missing / unexpected / shape-skipped keys, metadata).

    Raises:
        WeightsMismatchError: (strict) the file does not fit; the message names the first
            mismatching keys and shapes and the likely cause.
        ValueError: the file cannot be read (truncated, not a weights file, pickled objects).
    """
    path = Path(path)
    if weights_format(path) == "caffe":
        from deeplab.weights.caffe import read_caffemodel

        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        imported = caffe_to_state_dict(read_caffemodel(path), model, source=str(path))
        # Caffe layers with weights that fed nothing count as unexpected keys.
        return apply_state_dict(model, imported.state_dict, source=str(path), layout="caffe", strict=strict,
                                extra_unexpected=[f"caffe:{name}" for name in imported.unused_layers])
    state, metadata, layout = read_state_dict(path, model)
    result = apply_state_dict(model, state, source=str(path), layout=layout, strict=strict)
    note = metadata.pop("import_note", None)
    if note:
        result.notes.append(note)
    warning = layout_warning(model, layout)
    if warning:
        warnings.warn(f"{path}: {warning}", stacklevel=2)
        result.notes.append(warning)
    result.metadata = metadata
    return result


def layout_warning(model: nn.Module, layout: str) -> str | None:
    """The warning for a torchvision-layout file (``layout``) loaded into a Caffe-layout bottleneck
    ResNet: the weights load, but the network computes another function. None when it fits."""
    if layout not in FOREIGN_LAYOUTS:
        return None
    backbone = getattr(getattr(model, "model", model), "backbone", None)
    if getattr(backbone, "layout", None) != "caffe":
        return None
    if not any(k.endswith("layer1.0.conv3.weight") for k in model.state_dict()):
        return None  # basic blocks put the stride on the same 3x3 in both layouts
    return ("the file is in torchvision's ResNet layout (stride on the 3x3 of a bottleneck) but the model is in "
            "the Caffe layout (stride on the first 1x1): the strides sit elsewhere and the network computes "
            "another function; build the model with resnet_layout='torchvision'")


_OVERRIDES = ("model", "num_classes", "output_stride", "atrous_rates", "msc_scales", "resnet_layout", "multi_grid",
              "decoder_convs")
_BUILD_KWARGS = _OVERRIDES[2:]


def foreign_metadata_defaults(num_classes: int | None) -> dict[str, Any]:
    """What torchvision's and VainF's files leave unsaid: ImageNet RGB normalisation, and the
    VOC (21) or Cityscapes (19) class names and palette they were trained with."""
    from deeplab.data.datasets.cityscapes import CITYSCAPES_CLASSES
    from deeplab.data.datasets.voc import VOC_CLASSES
    from deeplab.data.palettes import CITYSCAPES_PALETTE, voc_palette
    from deeplab.data.transforms import IMAGENET_NORMALIZATION

    out: dict[str, Any] = {"normalization": dict(IMAGENET_NORMALIZATION)}
    if num_classes == len(VOC_CLASSES):
        out.update(class_names=list(VOC_CLASSES), palette=voc_palette(num_classes).tolist())
    elif num_classes == len(CITYSCAPES_CLASSES):
        out.update(class_names=list(CITYSCAPES_CLASSES), palette=CITYSCAPES_PALETTE[:num_classes].tolist())
    return out


def build_from_weights(path: str | os.PathLike[str], **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a weights file describes and load the weights (strictly).

    The name, class count and model keyword arguments come from the file's metadata
    (safetensors) or, for torchvision and VainF/DeepLabV3Plus-Pytorch checkpoints, from their
    keys (output stride: torchvision's 8, VainF's 16); ``overrides`` replace them, and are
    required for other files without metadata (``.pth``, ``.caffemodel``): ``model`` and
    ``num_classes``.

    Args:
        path: the weights file.
        **overrides: only ``model``, ``num_classes`` and :func:`~deeplab.models.build_model`'s
            ``output_stride``, ``atrous_rates``, ``msc_scales``, ``resnet_layout``,
            ``multi_grid`` and ``decoder_convs`` are accepted (another name raises TypeError).
            ``output_stride`` and ``msc_scales`` change how the same weights are run;
            the others must keep the trained network's meaning.

    Returns:
        ``(model, metadata)``: the model in eval mode and the file's metadata, with the
        resolved ``model``, ``num_classes`` and ``model_kwargs``.
    """
    unknown = sorted(set(overrides) - set(_OVERRIDES))
    if unknown:
        raise TypeError(f"build_from_weights() got unknown option(s) {unknown}; valid: {list(_OVERRIDES)}")
    from deeplab.models import build_model

    path = Path(path)
    metadata = dict(read_metadata(path))
    saved_kwargs = dict(metadata.get("model_kwargs") or {})  # checked by read_metadata
    if not metadata.get("model") and weights_format(path) == "torch" and path.is_file():
        state, _, layout = read_state_dict(path)
        if layout in FOREIGN_LAYOUTS and layout != "imagenet":
            try:
                found = foreign_model_options(state, layout)
            except ValueError as e:
                raise WeightsMismatchError(f"{path}: {e}") from None
            metadata.update(model=found.pop("model"), num_classes=found.pop("num_classes", None))
            saved_kwargs.update(found)
            metadata.update(foreign_metadata_defaults(metadata["num_classes"]))
            metadata["source"] = {"file": path.name, "layout": layout}
    name = overrides.get("model") or metadata.get("model")
    num_classes = overrides.get("num_classes") or metadata.get("num_classes")
    if not name or not num_classes:
        # Mostly met through the CLI (segment, eval, export), so the fix is given as a command first.
        raise ValueError(
            f"{path}: the file does not say which model it holds (no 'model' / 'num_classes' metadata): "
            f"convert it once to a file that does: deeplab convert {path} {path.with_suffix('.safetensors').name} "
            "--model NAME [--num-classes N] (deeplab models --names lists the names); "
            "from Python, pass build_from_weights(path, model=..., num_classes=...)"
        )
    kwargs: dict[str, Any] = {}
    for key in _BUILD_KWARGS:
        value = overrides.get(key, saved_kwargs.get(key))
        if value is not None:
            kwargs[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    try:
        model = build_model(name, num_classes=int(num_classes), **kwargs)
    except ValueError as e:  # e.g. an unknown model name or a stride the model lacks
        raise ValueError(f"{path}: {e}") from None
    load_weights(model, path, strict=True)
    model.eval()
    metadata.update(model=name, num_classes=int(num_classes), model_kwargs={
        k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()
    })
    return model, metadata
