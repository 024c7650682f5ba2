"""ONNX export of a DeepLab network (fp32, eager weights, the legacy TorchScript exporter).

The exported graph takes the *normalised* image batch ``image`` ``(B, 3, H, W)`` float32 and
returns ``logits`` ``(B, C, h, w)`` at the network's output stride, as ``model(x)`` does; the
weights' metadata (model name, classes, normalisation...) is copied into the ONNX model's
``metadata_props`` as JSON strings so that a consumer knows how to feed it.

The exporter is ``torch.onnx.export(..., dynamo=False)``: the torch.export-based one needs the
``onnxscript`` package, which this project does not depend on.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deeplab.fileio import atomic_path

__all__ = ["check_opset", "export_onnx", "onnx_metadata", "supported_opsets"]

# What deeplab.runtime needs to pre- and post-process as deeplab segment does.
_KEEP = ("model", "num_classes", "class_names", "palette", "normalization", "model_kwargs", "crf", "input_scale")


def onnx_metadata(model: nn.Module, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The ``metadata_props`` of an exported graph: the weights' metadata a consumer needs, and
    how the logits are upsampled (``output_stride``, ``logits_stride``, ``align_corners``)."""
    props = {k: metadata[k] for k in _KEEP if k in metadata}
    props["output_stride"] = model.output_stride
    props["logits_stride"] = getattr(model, "logits_stride", model.output_stride)
    props["align_corners"] = bool(getattr(model, "align_corners", True))  # v1 / v2: Caffe's Interp
    return props


def supported_opsets() -> range:
    """The ONNX opsets torch's exporter accepts (it warns above the TorchScript exporter's own
    maximum, 20 in torch 2.13, but writes a valid graph)."""
    try:  # torch keeps the range in a private module
        from torch.onnx import _constants

        return range(_constants.ONNX_MIN_OPSET, _constants.ONNX_MAX_OPSET + 1)
    except (ImportError, AttributeError):
        return range(7, 21)


def check_opset(opset: int, name: str = "opset") -> None:
    """ValueError naming the working range if torch's exporter lacks ``opset`` (``name``: how
    the caller calls it, e.g. ``--opset``)."""
    opsets = supported_opsets()
    if opset not in opsets:
        raise ValueError(f"{name} {opset} is not supported by this torch's ONNX exporter: use {opsets[0]} to "
                         f"{opsets[-1]} (17 is the default)")


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    height: int = 513,
    width: int = 513,
    opset: int = 17,
    dynamic: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Export ``model`` (eval mode, fp32) to an ONNX file, checked with ``onnx.checker``.

    Args:
        model: a single-scale DeepLab network (``build_model(..., msc_scales=None)``).
        path: destination ``.onnx`` file, written atomically.
        height: height of the example input (the fixed input size unless ``dynamic``).
        width: width of the example input.
        opset: ONNX opset version, one of :func:`supported_opsets`.
        dynamic: make batch, height and width dynamic axes.
        metadata: stored in the ONNX ``metadata_props`` (values JSON-encoded).

    Returns:
        The path written.
    """
    import onnx

    if height < 1 or width < 1:
        raise ValueError(f"export size must be positive, got {height}x{width}")
    check_opset(opset)
    if getattr(model, "msc_scales", None):
        raise ValueError(
            "export the single-scale network: build it without msc_scales (multi-scale fusion "
            "is done by the caller, on the exported model's outputs)"
        )
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist")
    model = model.eval().float()
    example = torch.zeros(1, 3, height, width)
    dynamic_axes = None
    if dynamic:
        dynamic_axes = {
            "image": {0: "batch", 2: "height", 3: "width"},
            "logits": {0: "batch", 2: "logits_height", 3: "logits_width"},
        }
    with atomic_path(path) as tmp:
        with warnings.catch_warnings(), torch.no_grad():
            # The legacy exporter announces its deprecation on every call.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (example,),
                tmp,
                dynamo=False,
                input_names=["image"],
                output_names=["logits"],
                opset_version=opset,
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        proto = onnx.load(tmp)
        for key, value in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key = str(key)
            entry.value = json.dumps(value, sort_keys=True)
        proto.producer_name = "deeplab"
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, tmp)
    return path
