"""Weights: the project's safetensors files, PyTorch and Caffe imports, the packaged default.

- :func:`save_weights` / :func:`load_weights` / :func:`read_metadata` / :func:`build_from_weights`
- :func:`read_caffemodel` reads the official DeepLab ``.caffemodel`` files (no Caffe needed).
- :func:`default_weights_path` is the packaged default model.

Imports stay light: torch and numpy only (never ``engine`` or ``cli``).
"""

from __future__ import annotations

from deeplab.weights.caffe import CaffeLayer, CaffeModelError, read_caffemodel, write_caffemodel
from deeplab.weights.default import PACKAGED_WEIGHTS, default_weights_path, packaged_weights_path, resolve_weights
from deeplab.weights.loading import (
    LoadResult,
    apply_state_dict,
    build_from_weights,
    load_weights,
    read_state_dict,
    weights_format,
)
from deeplab.weights.mapping import WeightsMismatchError
from deeplab.weights.onnx_export import export_onnx
from deeplab.weights.safetensors_io import (
    half_state_dict,
    int8_state_dict,
    read_metadata,
    save_state_dict,
    save_weights,
)

__all__ = [
    "save_weights",
    "save_state_dict",
    "half_state_dict",
    "int8_state_dict",
    "load_weights",
    "read_metadata",
    "build_from_weights",
    "read_state_dict",
    "apply_state_dict",
    "export_onnx",
    "weights_format",
    "LoadResult",
    "WeightsMismatchError",
    "read_caffemodel",
    "write_caffemodel",
    "CaffeLayer",
    "CaffeModelError",
    "default_weights_path",
    "packaged_weights_path",
    "PACKAGED_WEIGHTS",
    "resolve_weights",
]
