"""Segmenting single images: loading a model with its metadata, overlays, ``deeplab.segment``.

:func:`load_bundle` turns a weights file (or the packaged default model) into a prepared model
together with what inference needs from the file's metadata: class names, palette,
normalisation and CRF parameters. :func:`segment` is the one-call Python API mirroring
``deeplab segment``; :func:`overlay` draws the image blended with the class colours and a legend.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from deeplab.engine.inference import (
    DEFAULT_MAX_PIXELS,
    Precision,
    finish_prediction,
    model_align_corners,
    predict_logits,
    prepare_model,
    upsample_logits,
)
from deeplab.models.inference import resolve_precision

__all__ = ["ModelBundle", "class_pixels", "load_bundle", "overlay", "segment", "DEFAULT_NORMALIZATION"]

#: The paper's input normalisation (Caffe: BGR minus the ImageNet mean, no division).
DEFAULT_NORMALIZATION = {"mode": "caffe_bgr", "mean": [104.008, 116.669, 122.675]}


@dataclass
class ModelBundle:
    """A prepared (eval-mode, inference-optimised) model and its metadata.

    Attributes:
        model: the prepared model.
        name: ``build_model`` name (or the module's class name).
        class_names: one name per class.
        palette: uint8 (num_classes, 3) RGB colours.
        normalization: the input normalisation spec.
        crf_params: ``DenseCRF`` keyword arguments stored with the weights ({} for the defaults).
        input_scale: the factor the image is resized by for the network (the weights'
            ``input_scale``, 1 when absent).
        precision: what the model computes in, ``"bf16"`` or ``"fp32"`` (``"auto"`` resolved).
        device: where the model runs.
        metadata: the weights file's full metadata ({} without a file).
    """

    model: nn.Module
    name: str
    class_names: tuple[str, ...]
    palette: np.ndarray
    normalization: dict
    crf_params: dict = field(default_factory=dict)
    input_scale: float = 1.0
    precision: Literal["bf16", "fp32"] = "fp32"
    device: str = "cpu"
    metadata: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def scale_for(self, input_scale: float | None) -> float:
        """The input scale to run at: ``input_scale`` when given, else the weights' own."""
        return self.input_scale if input_scale is None else input_scale


def _default_palette(num_classes: int) -> np.ndarray:
    from deeplab.data.palettes import voc_palette

    return voc_palette(max(num_classes, 1))[:num_classes].astype(np.uint8)


def check_device(device: str | torch.device) -> str:
    """Validate a device string; a clear error when CUDA is asked for but absent."""
    dev = str(device)
    if dev not in ("cpu",) and not dev.startswith("cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {dev!r}")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {dev!r} asked for but CUDA is not available here: use --device cpu")
    return dev


def bundle_from_model(
    model: nn.Module,
    metadata: dict | None = None,
    *,
    precision: Precision = "auto",
    device: str = "cpu",
    optimize: bool = True,
) -> ModelBundle:
    """Wrap an in-memory model (and optional metadata) into a prepared :class:`ModelBundle`
    (``precision="auto"``: bf16 where ``device`` computes it natively, else fp32)."""
    meta = dict(metadata or {})
    num_classes = int(getattr(model, "num_classes", meta.get("num_classes", 0)) or 0)
    if num_classes <= 0:
        raise ValueError("cannot tell the model's number of classes: give it a num_classes attribute")
    names = tuple(meta.get("class_names") or (f"class_{i}" for i in range(num_classes)))
    if len(names) != num_classes:
        raise ValueError(f"metadata lists {len(names)} class names for {num_classes} classes")
    palette = meta.get("palette")
    palette = (
        np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
        if palette is not None
        else _default_palette(num_classes)
    )
    if len(palette) < num_classes:
        palette = np.concatenate([palette, _default_palette(num_classes)[len(palette) :]])
    device = check_device(device)
    precision = resolve_precision(precision, device)
    prepared = prepare_model(model, precision=precision, device=device) if optimize else model
    return ModelBundle(
        model=prepared,
        name=str(meta.get("model", type(model).__name__)),
        class_names=names,
        palette=palette[:num_classes],
        normalization=dict(meta.get("normalization") or DEFAULT_NORMALIZATION),
        crf_params=dict(meta.get("crf") or {}),
        input_scale=float(meta.get("input_scale") or 1.0),
        precision=precision,
        device=device,
        metadata=meta,
    )


def load_bundle(
    weights: str | os.PathLike | None = None,
    *,
    model_name: str | None = None,
    precision: Precision = "auto",
    device: str = "cpu",
) -> ModelBundle:
    """Build the model of a weights file, load it and prepare it for inference.

    Args:
        weights: a ``.safetensors`` file from ``deeplab train`` / ``deeplab convert``; None for
            the packaged default model (``deeplab.weights.default_weights_path()``).
        model_name: expected ``build_model`` name; an error if the file says otherwise.
        precision: ``"auto"`` (bf16 where ``device`` computes it natively, else fp32),
            ``"bf16"`` or ``"fp32"``.
        device: ``"cpu"`` or ``"cuda"``.

    Raises:
        FileNotFoundError: no such weights file (or no packaged default model).
        ValueError: the file holds another model than ``model_name``, or is not valid.
    """
    from deeplab.weights import build_from_weights, read_metadata, resolve_weights

    device = check_device(device)
    path = resolve_weights(weights)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found: check the path given to --weights")
    meta = read_metadata(path)
    if model_name is not None and meta.get("model") not in (None, model_name):
        raise ValueError(
            f"{path} holds a {meta.get('model')!r} model, not {model_name!r}: drop --model or "
            "pass the matching weights"
        )
    overrides = {"model": model_name} if model_name is not None and not meta.get("model") else {}
    model, meta = build_from_weights(path, **overrides)
    return bundle_from_model(model, meta, precision=precision, device=device)


# --------------------------------------------------------------------------- overlays


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def class_pixels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixels of each class 0..num_classes-1 in a label map (other values, e.g. 255, not counted):
    the per-class shares of segment's summary, the service's JSON and the video CSV."""
    return np.bincount(np.asarray(labels).ravel(), minlength=num_classes)[:num_classes]


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    palette: np.ndarray,
    class_names: Sequence[str] | None = None,
    *,
    alpha: float = 0.5,
    legend: bool = True,
    legend_classes: Sequence[int] | None = None,
) -> np.ndarray:
    """The image blended with its label colours, with a legend of the classes present.

    Args:
        image: uint8 (H,W,3) RGB.
        labels: (H,W) class indices (values outside the palette, e.g. 255, are left unblended).
        palette: uint8 (N,3) RGB colours.
        class_names: names for the legend (None: no legend).
        alpha: weight of the colours (0: image only, 1: colours only).
        legend: draw the legend box in the top-left corner.
        legend_classes: the classes the legend lists, in order (None: those present in
            ``labels``). A video passes the classes seen so far, so that its legend does not
            jump from frame to frame.

    Returns:
        uint8 (H,W,3) RGB.
    """
    from PIL import Image, ImageDraw

    image = np.asarray(image, dtype=np.uint8)
    labels = np.asarray(labels)
    palette = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    valid = labels < len(palette)
    colours = palette[np.where(valid, labels, 0)].astype(np.float32)
    out = image.astype(np.float32)
    blend = (1 - alpha) * out + alpha * colours
    out = np.where(valid[..., None], blend, out).round().clip(0, 255).astype(np.uint8)
    if not legend or class_names is None:
        return out
    if legend_classes is None:
        present = [int(c) for c in np.unique(labels[valid])]
    else:
        present = [int(c) for c in legend_classes if 0 <= int(c) < len(palette)]
    if not present:
        return out
    h, w = out.shape[:2]
    size = max(10, min(h, w) // 30)
    font = _font(size)
    pil = Image.fromarray(out)
    draw = ImageDraw.Draw(pil, "RGBA")
    pad = max(2, size // 4)
    texts = [str(class_names[c]) if c < len(class_names) else str(c) for c in present]
    widths = [draw.textlength(t, font=font) for t in texts]
    box_w = int(pad * 3 + size + max(widths))
    box_h = int(pad + len(present) * (size + pad))
    draw.rectangle([0, 0, box_w, box_h], fill=(0, 0, 0, 150))
    for k, (c, text) in enumerate(zip(present, texts)):
        y = pad + k * (size + pad)
        draw.rectangle([pad, y, pad + size, y + size], fill=tuple(int(v) for v in palette[c]),
                       outline=(255, 255, 255))
        draw.text((pad * 2 + size, y), text, fill=(255, 255, 255), font=font)
    return np.asarray(pil)


def save_jpeg(path: str | os.PathLike, image: np.ndarray, quality: int = 90) -> None:
    """Write an RGB uint8 image as JPEG atomically (temp file + ``os.replace``)."""
    from PIL import Image

    from deeplab.fileio import atomic_open

    with atomic_open(path) as fh:
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(fh, format="JPEG", quality=quality)


# --------------------------------------------------------------------------- the Python API

_CACHE: dict[tuple, ModelBundle] = {}


def _cached_bundle(weights: str | os.PathLike | None, model_name: str | None,
                   precision: Precision, device: str) -> ModelBundle:
    from deeplab.weights import resolve_weights

    path = resolve_weights(weights)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"weights file {path} not found") from None
    # Not the mtime alone: cp -p, rsync -t and unzip restore it, and coarse file systems give
    # two saves one mtime. An atomic replace changes the inode; ctime cannot be set by users.
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    key = (str(path.resolve()), stamp, model_name, precision, str(device))
    if key not in _CACHE:
        _CACHE.clear()  # keep one model: they are large
        _CACHE[key] = load_bundle(path, model_name=model_name, precision=precision, device=device)
    return _CACHE[key]


def _as_image(image: Any) -> np.ndarray:
    from PIL import Image

    from deeplab.data.io import pil_to_rgb, read_image

    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if isinstance(image, Image.Image):
        # read_image's conversion: 16-bit scaled, mode F refused (convert("RGB") clips both).
        return pil_to_rgb(image)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H,W,3) RGB image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {arr.dtype}: convert it to 0..255 uint8")
    return np.ascontiguousarray(arr[..., :3])


def segment(
    image: Any,
    model: nn.Module | str | None = None,
    weights: str | os.PathLike | None = None,
    crf: bool | dict = False,
    msc_scales: Sequence[float] | None = None,
    precision: Precision = "auto",
    device: str = "cpu",
    *,
    flip: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    input_scale: float | None = None,
    msc_fusion: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Segment one image; mirrors ``deeplab segment``.

    Args:
        image: a path, a PIL image or a uint8 (H,W,3) RGB array (grayscale (H,W) accepted).
        model: None (the model of ``weights``, or the packaged default model), a model name (it
            must match the one stored in ``weights``) or an ``nn.Module`` (then ``weights``,
            if given, only supplies the metadata: normalisation, classes).
        weights: a ``.safetensors`` weights file, or a packaged model's short name
            (``"camvid-v2"``); None for the default model.
        crf: refine with the fully connected CRF: True (the parameters stored with the weights,
            else ``DenseCRF``'s defaults) or a dict of ``DenseCRF`` keyword arguments.
        msc_scales: extra input scales fused with scale 1, e.g. ``(0.5, 0.75)``.
        precision: ``"auto"`` (default: bf16 where ``device`` computes it natively, else
            fp32), ``"bf16"`` or ``"fp32"``.
        device: ``"cpu"`` or ``"cuda"``.
        flip: also average with the mirrored image.
        max_pixels: larger images are downscaled for the network (the output stays full size).
        input_scale: resize the image by this factor for the network; None: the weights'
            ``input_scale`` (1 when they have none).
        msc_fusion: ``"max"`` or ``"mean"`` over the scales; None: the model's own (v1 / v2:
            max, v3 / v3+: mean).

    Returns:
        ``(labels, probs)``: uint8 (H,W) class indices (int32 above 256 classes) and float32
        (C,H,W) probabilities (after the CRF when ``crf`` is on).
    """
    img = _as_image(image)
    if isinstance(model, nn.Module):
        meta: dict = {}
        if weights is not None:
            from deeplab.weights import read_metadata

            meta = read_metadata(weights)
        bundle = bundle_from_model(model, meta, precision=precision, device=device)
    else:
        bundle = _cached_bundle(weights, model, precision, device)
    logits = predict_logits(
        bundle.model,
        img,
        normalization=bundle.normalization,
        msc_scales=msc_scales,
        flip=flip,
        precision=bundle.precision,
        max_pixels=max_pixels,
        input_scale=bundle.scale_for(input_scale),
        msc_fusion=msc_fusion,
    )
    size = img.shape[:2]
    align_corners = model_align_corners(bundle.model)
    if crf:
        from deeplab.crf import DenseCRF

        params = dict(bundle.crf_params)
        if isinstance(crf, dict):
            params.update(crf)
        crf_fn = DenseCRF(**params)
        # finish_prediction's rounding, so the labels equal `deeplab segment --crf`'s.
        _, probs16 = finish_prediction(logits, img, want_probs=True, align_corners=align_corners)
        probs = torch.as_tensor(crf_fn(img, probs16.float()))
        labels = probs.argmax(0).numpy()
    else:
        probs = torch.softmax(upsample_logits(logits, size, align_corners=align_corners), dim=1)[0].cpu()
        # From the returned probabilities, so labels == probs.argmax(0) even where exp rounds
        # two nearly tied logits to one probability (max(0).indices: argmax's rule, faster).
        labels = probs.max(0).indices.numpy()
    labels = labels.astype(np.uint8 if bundle.num_classes <= 256 else np.int32)
    return labels, probs.numpy()

