"""The project's own weight files: safetensors with JSON metadata.

A weights file is a plain safetensors file whose string-to-string header metadata holds
JSON-encoded values under these keys (all optional except ``model`` and ``num_classes``,
which ``save_weights`` fills from the model when it can):

``model``          the ``build_model`` name, e.g. ``"deeplab_v2_resnet101"``
``num_classes``    int
``class_names``    list of str, one per class
``palette``        list of ``[r, g, b]``, one per class
``normalization``  the input normalisation spec, e.g. ``{"mode": "caffe_bgr", "mean": [...]}``
``model_kwargs``   ``{"output_stride": 8, "atrous_rates": [6, 12, 18, 24], "msc_scales": null}``
``crf``            ``DenseCRF`` keyword arguments
``input_scale``    positive number: the factor images are resized by for the network
anything else      free-form (``source``, ``miou``, ``dataset``...), JSON-encoded too

``save_state_dict`` and ``read_metadata`` check the values of these keys, so that a damaged or
foreign header is one error naming the file and the key, not a failure deep inside a command.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deeplab.fileio import atomic_path

__all__ = [
    "save_weights",
    "save_state_dict",
    "read_metadata",
    "read_safetensors",
    "half_state_dict",
    "int8_state_dict",
    "dequantize_state_dict",
    "METADATA_KEYS",
    "INT8_SCALE_SUFFIX",
]

METADATA_KEYS = (
    "model",
    "num_classes",
    "class_names",
    "palette",
    "normalization",
    "model_kwargs",
    "crf",
    "input_scale",
)
# safetensors' own convention: tools such as transformers read this key.
_FORMAT_KEY = "format"


def _encode_metadata(metadata: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise TypeError(f"metadata keys must be strings, got {key!r}")
        if key == _FORMAT_KEY:
            continue
        try:
            out[key] = json.dumps(value, sort_keys=True)
        except TypeError as e:
            raise TypeError(f"metadata[{key!r}] is not JSON-serialisable: {e}") from None
    out[_FORMAT_KEY] = "pt"
    return out


def _decode_metadata(raw: Mapping[str, str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (raw or {}).items():
        if key == _FORMAT_KEY:
            continue
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # written by another tool: keep the raw string
    return out


def _model_metadata(model: nn.Module) -> dict[str, Any]:
    """What the model itself can tell: zoo name, class count and build options."""
    meta: dict[str, Any] = {}
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int):
        meta["num_classes"] = num_classes
    name = getattr(model, "name", None)
    if isinstance(name, str) and name:
        meta["model"] = name
    from deeplab.models.zoo import model_build_kwargs  # the one list of what rebuilds a model

    kwargs = model_build_kwargs(model)
    if kwargs:
        meta["model_kwargs"] = kwargs
    return meta


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


# DenseCRF's keyword arguments and its own rules for them (a test holds the two together):
# importing deeplab.crf here would load numba (~0.3 s) to read a file header.
_CRF_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "bi_w": (_is_number, "a finite number"),
    "bi_xy_std": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "bi_rgb_std": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "pos_w": (_is_number, "a finite number"),
    "pos_xy_std": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "iterations": (lambda v: _is_count(v, 0), "an int >= 0"),
    "clip": (lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    "cache_positional": (lambda v: isinstance(v, bool), "true or false"),
    "lattice_fp16": (lambda v: isinstance(v, bool), "true or false"),
}
_MODEL_KWARGS = ("output_stride", "atrous_rates", "msc_scales", "resnet_layout", "multi_grid", "decoder_convs")


def _check_object(value: Any, key: str, valid: Sequence[str], what: str) -> None:
    """``value`` (metadata ``key``) must be a JSON object whose keys are among ``valid``."""
    if not isinstance(value, Mapping):
        raise ValueError(f"metadata {key} must be an object of {what}, got {value!r}")
    unknown = sorted(set(value) - set(valid))
    if unknown:
        raise ValueError(f"metadata {key} has unknown key(s) {unknown}; valid: {', '.join(valid)}")


def _check_crf(crf: Any) -> None:
    _check_object(crf, "crf", list(_CRF_RULES), 'DenseCRF arguments, e.g. {"bi_w": 4}')
    for key, value in crf.items():
        valid, what = _CRF_RULES[key]
        if not valid(value):
            raise ValueError(f"metadata crf.{key} must be {what}, got {value!r}")


def _check_normalization(norm: Any) -> None:
    from deeplab.data.transforms import check_normalization  # the one normalisation spec check

    try:
        check_normalization(norm)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata normalization: {e}; e.g. "
                         '{"mode": "caffe_bgr", "mean": [104.008, 116.669, 122.675]}') from None


def _check_model_kwargs(kwargs: Any) -> None:
    _check_object(kwargs, "model_kwargs", _MODEL_KWARGS, 'build_model arguments, e.g. {"output_stride": 8}')
    # null means the model's default (output stride 8, its own rates, single scale).
    stride, rates, scales, layout, grid, decoder = (kwargs.get(k) for k in _MODEL_KWARGS)
    if stride is not None and not _is_count(stride, 1):
        raise ValueError(f"metadata model_kwargs.output_stride must be an int such as 8, got {stride!r}")
    if rates is not None and not (isinstance(rates, (list, tuple)) and rates and all(_is_count(r, 1) for r in rates)):
        raise ValueError(f"metadata model_kwargs.atrous_rates must be a list of positive ints such as "
                         f"[6, 12, 18, 24], got {rates!r}")
    if scales is not None and not (isinstance(scales, (list, tuple)) and all(_is_number(x) and x > 0 for x in scales)):
        raise ValueError(f"metadata model_kwargs.msc_scales must be null or a list of positive numbers such as "
                         f"[0.5, 0.75], got {scales!r}")
    if layout is not None and layout not in ("caffe", "torchvision"):
        raise ValueError(f"metadata model_kwargs.resnet_layout must be 'caffe' or 'torchvision', got {layout!r}")
    if grid is not None and not (isinstance(grid, (list, tuple)) and grid and all(_is_count(r, 1) for r in grid)):
        raise ValueError(f"metadata model_kwargs.multi_grid must be a list of positive ints such as [1, 2, 4], "
                         f"got {grid!r}")
    if decoder is not None and decoder not in (1, 2):
        raise ValueError(f"metadata model_kwargs.decoder_convs must be 1 or 2, got {decoder!r}")


def _validate_metadata(meta: Mapping[str, Any]) -> None:
    """Check the keys the package reads (see the module docstring); ValueError("metadata KEY ...")."""
    name = meta.get("model")
    if name is not None and not (isinstance(name, str) and name):
        raise ValueError(f"metadata model must be a model name such as 'deeplab_v2_resnet101', got {name!r}")
    n = meta.get("num_classes")
    if n is not None and not _is_count(n, 1):
        raise ValueError(f"metadata num_classes must be a positive int, got {n!r}")
    for key in ("class_names", "palette"):
        value = meta.get(key)
        if value is None:
            continue
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"metadata {key} must be a list, got {type(value).__name__}")
        if n is not None and len(value) != n:
            raise ValueError(f"metadata {key} has {len(value)} entries but num_classes is {n}")
    names = meta.get("class_names")
    if names is not None and not all(isinstance(x, str) for x in names):
        raise ValueError(f"metadata class_names must be strings, got {names!r}")
    scale = meta.get("input_scale")
    if scale is not None and not (_is_number(scale) and scale > 0):
        raise ValueError(f"metadata input_scale must be a positive number, got {scale!r}")
    palette = meta.get("palette")
    if palette is not None:
        for rgb in palette:
            if not (isinstance(rgb, (list, tuple)) and len(rgb) == 3
                    and all(_is_count(c, 0) and c <= 255 for c in rgb)):
                raise ValueError(f"metadata palette entries must be [r, g, b] ints in 0..255, got {rgb!r}")
    if meta.get("normalization") is not None:
        _check_normalization(meta["normalization"])
    if meta.get("model_kwargs") is not None:
        _check_model_kwargs(meta["model_kwargs"])
    if meta.get("crf") is not None:
        _check_crf(meta["crf"])


def _to_plain(value: Any) -> Any:
    """numpy arrays / tuples -> lists so that JSON accepts palettes and kwargs."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a state dict and metadata to a safetensors file atomically (temp file + rename).

    Args:
        state_dict: tensor name -> tensor (moved to the CPU, made contiguous; tensors sharing
            storage are copied, as safetensors requires).
        path: destination; its parent folder must exist.
        metadata: JSON-serialisable values (see the module docstring for the known keys); the
            ``int8_weights`` key is set from the tensors (present iff they hold int8 scales).
    """
    from safetensors.torch import save_file

    meta = {k: _to_plain(v) for k, v in (metadata or {}).items()}
    _validate_metadata(meta)
    # The int8 note describes these tensors, not the model: derived here, never copied from a source file.
    meta.pop(INT8_METADATA_KEY, None)
    if any(k.endswith(INT8_SCALE_SUFFIX) for k in state_dict):
        meta.update(INT8_METADATA)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] is a {type(value).__name__}, not a tensor")
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen:
            t = t.clone()
        elif ptr != -1:
            seen.add(ptr)
        tensors[key] = t
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist")
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=_encode_metadata(meta))
    return path


_FP16_MAX = 65504.0


def half_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float16 weights for a file half the size; batch-norm statistics stay float32.

    Caffe-mode inputs are unscaled (BGR minus the mean, values up to ~150), so the stem's BN
    running variance of a model trained from scratch reaches ~4e7, far beyond float16's 65504:
    cast, it would become inf and silently ruin the model. The statistics are a few KB, and any
    other tensor with a value beyond float16's range is kept float32 too. Loading casts back
    to the model's dtype.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if (not value.is_floating_point() or key.endswith(("running_mean", "running_var"))
                or (value.numel() and float(value.abs().max()) >= _FP16_MAX)):
            out[key] = value
            continue
        half = value.half()
        if not bool(torch.isfinite(half).all()):
            raise ValueError(f"{key}: not finite after the float16 cast")
        out[key] = half
    return out


# int8 storage is written here because no library among the dependencies defines a file layout
# for it: torch.ao's quantized tensors cannot go into safetensors, which stores plain int8 arrays.
INT8_SCALE_SUFFIX = "::int8_scale"
INT8_METADATA_KEY = "int8_weights"  # how the file is stored, for readers other than deeplab
INT8_METADATA = {INT8_METADATA_KEY: {"scale_suffix": INT8_SCALE_SUFFIX,
                                     "scheme": "symmetric per output channel: w = q * scale[out], scale = max|w| / 127"}}


def int8_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """int8 convolution weights, a quarter of float32's bytes (half of float16's); the rest as
    :func:`half_state_dict`.

    Every floating tensor of two or more dimensions (convolution and classifier kernels: all
    but a few KB of a DeepLab) becomes int8 with one float32 scale per output channel, stored
    under ``<name>::int8_scale``; the rounding error of a weight is at most half its channel's
    scale, ``max|w| / 254``. Per-channel scales keep a small kernel's resolution: one scale per
    tensor would follow the layer's largest kernel (in the default model a layer's largest and
    smallest kernels differ by 1.5x to 3.9x in max|w|). :func:`dequantize_state_dict` (called
    by every reader of the project's files) restores float32 tensors, so a model never sees int8.
    """
    out = half_state_dict(state_dict)
    for key, value in state_dict.items():
        if not value.is_floating_point() or value.dim() < 2 or key.endswith(("running_mean", "running_var")):
            continue
        w = value.detach().to("cpu", torch.float32).reshape(value.shape[0], -1)
        absmax = w.abs().amax(dim=1)
        scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
        out[key] = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).reshape(value.shape)
        out[key + INT8_SCALE_SUFFIX] = scale
    return out


def dequantize_state_dict(tensors: Mapping[str, torch.Tensor], source: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Undo :func:`int8_state_dict`: float32 ``q * scale``; other tensors are returned as they are.

    Args:
        tensors: the tensors of a file.
        source: the file, named in the error when an int8 tensor and its scale do not match.
    """
    scales = {k.removesuffix(INT8_SCALE_SUFFIX): v for k, v in tensors.items() if k.endswith(INT8_SCALE_SUFFIX)}
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.endswith(INT8_SCALE_SUFFIX):
            owner = key.removesuffix(INT8_SCALE_SUFFIX)
            if owner not in tensors:
                raise ValueError(f"{source}: scale {key} has no tensor {owner}; the file is damaged: re-export it")
            continue
        scale = scales.get(key)
        if scale is None:
            if value.dtype == torch.int8:
                raise ValueError(f"{source}: {key} is int8 but the file has no {key}{INT8_SCALE_SUFFIX}; "
                                 "the file is damaged or was not written by deeplab: re-export it")
            out[key] = value
            continue
        if value.dtype != torch.int8 or scale.dim() != 1 or value.dim() < 1 or scale.numel() != value.shape[0]:
            raise ValueError(f"{source}: {key} ({value.dtype}, {tuple(value.shape)}) does not fit its scale "
                             f"{tuple(scale.shape)}; the file is damaged: re-export it")
        flat = value.reshape(value.shape[0], -1).to(torch.float32) * scale.to(torch.float32)[:, None]
        out[key] = flat.reshape(value.shape)
    return out


def save_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any] | None = None,
    *,
    half: bool = False,
    int8: bool = False,
) -> Path:
    """Save a model's weights as safetensors with the project's metadata.

    ``num_classes`` (and ``model``, when the model carries its zoo name) are filled from the
    model unless ``metadata`` gives them; a ``num_classes`` that disagrees with the model is
    an error.

    Args:
        model: the network (``build_model`` output, with or without the MSC wrapper).
        path: destination ``.safetensors`` file, written atomically.
        metadata: extra keys, e.g. ``{"model": "deeplab_v2_resnet101", "class_names": [...],
            "palette": [[0, 0, 0], ...], "normalization": {...}, "model_kwargs": {...}}``.
        half: store float16 weights (see :func:`half_state_dict`).
        int8: store int8 convolution weights, the rest as ``half`` (see :func:`int8_state_dict`).

    Returns:
        The path written.
    """
    meta: dict[str, Any] = _model_metadata(model)
    given = dict(metadata or {})
    if "num_classes" in given and "num_classes" in meta and given["num_classes"] != meta["num_classes"]:
        raise ValueError(
            f"metadata num_classes={given['num_classes']} but the model has {meta['num_classes']} classes"
        )
    meta.update(given)
    state = model.state_dict()
    if int8:
        state = int8_state_dict(state)
    elif half:
        state = half_state_dict(state)
    return save_state_dict(state, path, meta)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the decoded, checked metadata of a safetensors weights file (no tensors are read).

    Other formats (``.pth``, ``.caffemodel``) carry no metadata: an empty dict is returned.
    A value the package could not use (e.g. an unknown ``crf`` key, a ``normalization`` that is
    not an object, a ``num_classes`` that is not a positive int) raises ValueError naming the
    file and the key.

    Args:
        path: the weights file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = _decode_metadata(f.metadata())
    except Exception as e:  # safetensors raises its own SafetensorError for a bad header
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    # Checked once here, so that segment, eval, convert and export all refuse a bad value with
    # the file's name instead of failing deep inside (DenseCRF, normalisation, build_model).
    try:
        _validate_metadata(meta)
    except ValueError as e:
        raise ValueError(
            f"{path}: {e}. The file's metadata is damaged or was written by another tool: correct or "
            "remove that entry of its safetensors header, or re-export the weights from their source "
            "(deeplab convert, deeplab train)"
        ) from None
    return meta


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return ``(state_dict, metadata)`` of a safetensors file, tensors on the CPU.

    Args:
        path: the ``.safetensors`` file.
    """
    from safetensors.torch import load_file

    path = Path(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    return dequantize_state_dict(tensors, path), read_metadata(path)
