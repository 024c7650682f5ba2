"""Full-resolution inference: normalisation, MSC max fusion, flipping, sliding windows, softmax.

The paper's test protocol: the network sees the whole image and its stride-8 logits are
upsampled bilinearly to the image size before the argmax (or the CRF). Choices made here:

- **Bilinear upsampling with ``align_corners=True``** for v1 / v2, as Caffe's ``Interp`` layer
  of the official test net (and the project's MSC wrapper, :mod:`deeplab.models.msc`): the
  corner logits sit on the corner pixels. For the official 513x513 input (65x65 logits) this
  is the exact stride-8 grid; for other sizes it is within a stride of it, as is PyTorch's
  ``align_corners=False`` (kazuto1011/deeplab-pytorch's choice) with an offset of half a
  stride. v3 / v3+ models say ``align_corners = False``, torchvision's and VainF's choice,
  which their weights were trained with: every resize here follows the model's attribute.
- **Softmax in fp32**: the network may run in bf16 (``precision="auto"``, the default, picks it
  where it is native: about 3x faster on CPUs with AVX512-BF16; fp32 on AVX2 CPUs) but logits
  are cast to fp32 before upsampling and softmax, so the probabilities handed to the CRF are
  not quantised to bf16's 8 bits.
- **MSC**: for v1 / v2 exactly :class:`deeplab.models.DeepLabMSC`'s fusion: the input resized
  to Caffe's ``floor((H-1)*s)+1`` (bilinear, corners aligned), every output resized to the
  scale-1 logits' size and fused by a pixel-wise max. A model already built with
  ``msc_scales`` fuses by itself and is not wrapped twice. v3 / v3+ (``msc_fusion = "mean"``)
  average the scales instead, as their papers do; ``msc_fusion`` overrides the model's choice.
- **Flip**: logits of the mirrored image are flipped back and averaged with the plain ones.
- **Sliding window** (large images such as Cityscapes): square windows of ``sliding_window``
  pixels overlapping by ``overlap`` (1/3 by default), the image padded at the bottom/right with
  the mean (zero after normalisation) up to a window; the windows' upsampled logits are
  averaged where they overlap.
- **Input scale** (not in the paper): the network may see the image resized by a constant
  factor, ``input_scale``, its logits resized back to the image. A model trained on upscaled
  crops (thin objects such as CamVid's poles span more stride-8 cells) is run at the scale it
  was trained at; the weights' metadata says which (``input_scale``).
- **Size cap**: an image of more than ``max_pixels`` is downscaled for the network (with a
  notice) and its logits upsampled back to the full size, so the output is always full size.
  The cap applies to the network's input, after ``input_scale``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deeplab.models.inference import Precision, resolve_precision
from deeplab.runtime import image_batch  # numpy only: the same input checks as the runtime

__all__ = [
    "ALIGN_CORNERS",
    "MSC_FUSIONS",
    "model_align_corners",
    "model_msc_fusion",
    "DEFAULT_MAX_PIXELS",
    "InferenceNotice",
    "labels_from_logits",
    "predict_logits",
    "predict_probs",
    "prepare_model",
    "upsample_logits",
]

#: How v1 / v2 models upsample (Caffe's Interp); a model's ``align_corners`` attribute overrides it.
ALIGN_CORNERS = True
#: Multi-scale fusions: the v2 paper's pixel-wise max, the v3 / v3+ papers' mean.
MSC_FUSIONS = ("max", "mean")


def model_align_corners(model: nn.Module) -> bool:
    """How ``model``'s logits are upsampled: its ``align_corners`` attribute, else Caffe's (True)."""
    return bool(getattr(model, "align_corners", ALIGN_CORNERS))


def model_msc_fusion(model: nn.Module) -> str:
    """How ``model``'s multi-scale testing fuses: its ``msc_fusion`` attribute, else the max (v2)."""
    return str(getattr(model, "msc_fusion", "max"))
#: Largest image (in pixels) the network sees in one piece; larger ones are downscaled first.
DEFAULT_MAX_PIXELS = 6_000_000


class InferenceNotice(UserWarning):
    """Something the user should know about an inference (e.g. a downscaled large image)."""


def prepare_model(
    model: nn.Module,
    *,
    precision: Precision = "auto",
    device: str | torch.device = "cpu",
    channels_last: bool = True,
) -> nn.Module:
    """Return the model ready for :func:`predict_probs`: an eval-mode, inference-optimised copy.

    Args:
        model: a model from ``deeplab.models.build_model`` (or any module mapping a normalised
            (B,3,H,W) batch to logits).
        precision: ``"auto"`` (the default: bf16 where ``device`` computes it natively, else
            fp32; see :func:`deeplab.models.resolve_precision`), ``"bf16"`` or ``"fp32"``.
        device: where to run (``"cpu"`` or ``"cuda"``).
        channels_last: use the channels-last memory layout (faster convolutions on CPU).
    """
    from deeplab.models.inference import optimize_resolved

    # Resolved for the device the copy runs on, not the one the model is on now.
    model = optimize_resolved(model, resolve_precision(precision, device), channels_last=channels_last)
    return model.to(device)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _builtin_msc(model: nn.Module) -> tuple[float, ...] | None:
    scales = getattr(model, "msc_scales", None)
    return tuple(float(s) for s in scales) if scales else None


def _to_batch(image: np.ndarray | torch.Tensor | Sequence[np.ndarray]) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = image_batch(image)
    if not image.flags.writeable:  # torch.from_numpy warns on read-only arrays (e.g. from PIL)
        image = image.copy()
    return image


def _normalize_batch(images: np.ndarray, normalization: dict) -> torch.Tensor:
    from deeplab.data.transforms import normalize_image

    return normalize_image(images, normalization)


# Upsampled logits above this size are reduced one class at a time by labels_from_logits.
_FULL_UPSAMPLE_BYTES = 1 << 28


def upsample_logits(logits: torch.Tensor, size: tuple[int, int], *,
                    align_corners: bool = ALIGN_CORNERS) -> torch.Tensor:
    """Bilinear upsampling of (B,C,h,w) logits to ``size`` in fp32 (by default corners aligned, as
    Caffe; pass :func:`model_align_corners` of the model that made them)."""
    # NCHW whatever the model's memory format: PyTorch then interpolates each class plane on
    # its own (except for tiny outputs), so labels_from_logits' per-class path rounds the same.
    logits = logits.float().contiguous()
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=align_corners)


def labels_from_logits(logits: torch.Tensor, size: tuple[int, int], *,
                       align_corners: bool = ALIGN_CORNERS) -> torch.Tensor:
    """Argmax labels (B,H,W) int64 of ``logits`` upsampled to ``size``.

    The same labels as ``upsample_logits(logits, size).argmax(1)``, ties included (first
    class). Above 256 MiB of upsampled logits (very large images), one class at a time with
    a running max instead of a (B,C,H,W) array.
    """
    b, c = logits.shape[:2]
    h, w = size
    # PyTorch's CPU kernel vectorises over channels for outputs with H + W <= 128 (and for
    # C == 3 on one thread), which rounds a one-class slice differently from the whole tensor;
    # otherwise (and on CUDA) each plane is interpolated on its own, so the per-class path
    # gives the same values. With <= 3 classes it would save little memory anyway.
    if b * c * h * w * 4 <= _FULL_UPSAMPLE_BYTES or h + w <= 128 or c <= 3:
        # max(dim).indices, not argmax(dim): same first-max rule, ~10x faster over dim 1 on CPU.
        return upsample_logits(logits, size, align_corners=align_corners).max(1).indices
    best = labels = None
    for k in range(c):
        up = upsample_logits(logits[:, k : k + 1], size, align_corners=align_corners)[:, 0]
        if best is None:
            best, labels = up, torch.zeros(up.shape, dtype=torch.int64, device=up.device)
            continue
        better = up > best
        best = torch.where(better, up, best)
        labels[better] = k
    assert labels is not None
    return labels


def _forward_fused(
    model: nn.Module, x: torch.Tensor, msc_scales: tuple[float, ...], flip: bool, fusion: str = "max"
) -> torch.Tensor:
    """Logits (fp32, at the scale-1 logits' size) with MSC fusion (max or mean) and flip averaging."""
    from deeplab.models.msc import scaled_size

    align_corners = model_align_corners(model)

    def one(inp: torch.Tensor) -> torch.Tensor:
        out = model(inp).float()
        if not msc_scales:
            return out
        size = out.shape[-2:]
        for s in msc_scales:
            h, w = inp.shape[-2:]
            xs = F.interpolate(
                inp,
                size=(scaled_size(h, s), scaled_size(w, s)),
                mode="bilinear",
                align_corners=align_corners,
            )
            ys = F.interpolate(
                model(xs).float(), size=size, mode="bilinear", align_corners=align_corners
            )
            out = torch.maximum(out, ys) if fusion == "max" else out + ys
        return out if fusion == "max" else out / (1 + len(msc_scales))

    logits = one(x)
    if flip:
        logits = 0.5 * (logits + one(x.flip(-1)).flip(-1))
    return logits


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    starts.append(length - window)
    return starts


def _sliding_logits(
    model: nn.Module,
    x: torch.Tensor,
    window: int,
    overlap: float,
    msc_scales: tuple[float, ...],
    flip: bool,
    fusion: str,
) -> torch.Tensor:
    b, _, h, w = x.shape
    ph, pw = max(h, window), max(w, window)
    if (ph, pw) != (h, w):
        # Zero after normalisation == padding the raw image with the mean (the paper's padding).
        x = F.pad(x, (0, pw - w, 0, ph - h), value=0.0)
    stride = max(1, int(math.ceil(window * (1.0 - overlap))))
    acc: torch.Tensor | None = None
    count = torch.zeros((1, 1, ph, pw), dtype=torch.float32, device=x.device)
    for top in _window_starts(ph, window, stride):
        for left in _window_starts(pw, window, stride):
            crop = x[:, :, top : top + window, left : left + window]
            out = upsample_logits(_forward_fused(model, crop, msc_scales, flip, fusion), crop.shape[-2:],
                                  align_corners=model_align_corners(model))
            if acc is None:
                acc = torch.zeros((b, out.shape[1], ph, pw), dtype=torch.float32, device=x.device)
            acc[:, :, top : top + window, left : left + window] += out
            count[:, :, top : top + window, left : left + window] += 1
    assert acc is not None
    return (acc / count)[:, :, :h, :w]


def predict_logits(
    model: nn.Module,
    image: np.ndarray | torch.Tensor | Sequence[np.ndarray],
    *,
    normalization: dict,
    msc_scales: Sequence[float] | None = None,
    flip: bool = False,
    precision: Precision = "auto",
    sliding_window: int | None = None,
    overlap: float = 1 / 3,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    notice: Callable[[str], None] | None = None,
    input_scale: float = 1.0,
    msc_fusion: str | None = None,
) -> torch.Tensor:
    """Fused fp32 logits at the working resolution (not yet upsampled to the image size).

    Same arguments as :func:`predict_probs`. The working resolution is the network's output
    stride (whole-image inference) or the full image (sliding windows), of the image resized by
    ``input_scale`` and possibly downscaled by the size cap. Use :func:`upsample_logits` or
    :func:`labels_from_logits` to get to the image size.
    """
    from deeplab.models import autocast

    precision = resolve_precision(precision, _model_device(model))
    if model.training:
        raise ValueError("the model is in training mode: call prepare_model(model) or model.eval()")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if sliding_window is not None and sliding_window < 16:
        raise ValueError(f"sliding_window must be at least 16 pixels, got {sliding_window}")
    fusion = model_msc_fusion(model) if msc_fusion is None else msc_fusion
    if fusion not in MSC_FUSIONS:
        raise ValueError(f"msc_fusion={msc_fusion!r}: use one of {MSC_FUSIONS} (None: the model's own)")
    scales = tuple(float(s) for s in (msc_scales or ()))
    if any(s <= 0 for s in scales):
        raise ValueError(f"msc_scales must be positive, got {scales}")
    if not input_scale > 0:
        raise ValueError(f"input_scale must be positive, got {input_scale}")
    if max_pixels is not None and not max_pixels >= 1:
        raise ValueError(
            f"max_pixels must be a positive number of pixels (or None: no cap), got {max_pixels}"
        )
    builtin = _builtin_msc(model)
    if builtin is not None and scales:
        if set(scales) - {1.0} != set(builtin) - {1.0}:
            raise ValueError(
                f"the model already fuses scales {builtin}; msc_scales={scales} would apply "
                "MSC twice: leave msc_scales out or build the model without it"
            )
        scales = ()  # the model fuses by itself
    scales = tuple(s for s in scales if s != 1.0)

    batch = _to_batch(image)
    device = _model_device(model)
    x = _normalize_batch(batch, normalization).to(device)
    h, w = x.shape[-2:]
    nh, nw = max(1, round(h * input_scale)), max(1, round(w * input_scale))
    if max_pixels is not None and nh * nw > max_pixels:
        f = math.sqrt(max_pixels / (nh * nw))
        nh, nw = max(1, int(nh * f)), max(1, int(nw * f))
        msg = (
            f"image of {w}x{h} pixels is above the inference cap of {max_pixels} pixels"
            f"{f' at input scale {input_scale:g}' if input_scale != 1.0 else ''}: "
            f"running the network at {nw}x{nh} and upsampling the result"
        )
        if notice is None:
            warnings.warn(msg, InferenceNotice, stacklevel=2)
        else:
            notice(msg)
    if (nh, nw) != (h, w):
        # Bilinear at pixel centres, as Pillow's resize of the training crops (RandomScale).
        x = F.interpolate(
            x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=nh * nw < h * w
        )
    if _is_channels_last(model):
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(device, precision):
        if sliding_window is not None and max(x.shape[-2:]) > sliding_window:
            return _sliding_logits(model, x, sliding_window, overlap, scales, flip, fusion)
        return _forward_fused(model, x, scales, flip, fusion)


def _is_channels_last(model: nn.Module) -> bool:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.weight.is_contiguous(memory_format=torch.channels_last) and m.weight.ndim == 4
    return False


def predict_probs(
    model: nn.Module,
    image: np.ndarray | torch.Tensor | Sequence[np.ndarray],
    *,
    normalization: dict,
    msc_scales: Sequence[float] | None = None,
    flip: bool = False,
    precision: Precision = "auto",
    sliding_window: int | None = None,
    overlap: float = 1 / 3,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    notice: Callable[[str], None] | None = None,
    input_scale: float = 1.0,
    msc_fusion: str | None = None,
) -> torch.Tensor:
    """Softmax probabilities (B,C,H,W) fp32 at the full image size, on the model's device.

    Args:
        model: an eval-mode model (see :func:`prepare_model`) returning (B,C,h,w) logits.
        image: uint8 RGB (H,W,3), a (B,H,W,3) batch or a list of same-size images.
        normalization: the model's normalisation spec (``{"mode": "caffe_bgr", "mean": [...]}``
            or ``{"mode": "rgb", "mean": [...], "std": [...]}``).
        msc_scales: extra input scales (e.g. ``(0.5, 0.75)``) fused with scale 1.
        flip: also run the mirrored image and average the logits.
        precision: ``"auto"`` (default: bf16 where the model's device computes it natively),
            ``"bf16"`` or ``"fp32"`` (autocast for a model not from :func:`prepare_model`).
        sliding_window: window size in pixels for large images (None: the whole image at once).
        overlap: fraction of a window shared with its neighbour.
        max_pixels: images above this many pixels are downscaled for the network (None: no cap).
        notice: called with a message when the cap applies (default: ``warnings.warn``).
        input_scale: the network sees the image resized by this factor (the weights'
            ``input_scale``: the scale the model was trained at); the output stays full size.
        msc_fusion: ``"max"`` (v1 / v2 paper) or ``"mean"`` (v3 / v3+ papers) over the scales;
            None: the model's own (:func:`model_msc_fusion`).
    """
    batch = _to_batch(image)
    logits = predict_logits(
        model,
        batch,
        normalization=normalization,
        msc_scales=msc_scales,
        flip=flip,
        precision=precision,
        sliding_window=sliding_window,
        overlap=overlap,
        max_pixels=max_pixels,
        notice=notice,
        input_scale=input_scale,
        msc_fusion=msc_fusion,
    )
    size = tuple(batch.shape[1:3])
    return torch.softmax(upsample_logits(logits, size, align_corners=model_align_corners(model)), dim=1)


def finish_prediction(
    logits: torch.Tensor,
    image: np.ndarray,
    *,
    crf: Callable[[np.ndarray, torch.Tensor], torch.Tensor] | None = None,
    want_probs: bool = False,
    align_corners: bool = ALIGN_CORNERS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Labels (and probabilities) of one image from its (1,C,h,w) working-resolution logits.

    The one place where ``deeplab eval`` and ``deeplab segment`` turn logits into labels, so
    that both give the same pixels. Without the CRF the labels are the argmax of the upsampled
    logits (:func:`labels_from_logits`: no (C,H,W) array). Probabilities are rounded to
    float16, the precision ``--save-probs`` stores, *before* the CRF sees them: the CRF result
    is then the same as ``deeplab crf`` applied to the saved files, pixel for pixel.

    Args:
        logits: (1,C,h,w) logits from :func:`predict_logits`.
        image: the uint8 (H,W,3) RGB image (its size is the output size; the CRF reads it).
        crf: a ``deeplab.crf.DenseCRF`` (or any ``(image, probs) -> probs``), or None.
        want_probs: also return the probabilities.
        align_corners: how the logits are upsampled (:func:`model_align_corners` of the model).

    Returns:
        ``(labels, probs)``: int64 (H,W) labels on the CPU; float16 (C,H,W) softmax
        probabilities (before the CRF) on the CPU, or None when neither asked for nor needed.
    """
    size = tuple(image.shape[:2])
    if crf is None and not want_probs:
        return labels_from_logits(logits, size, align_corners=align_corners)[0].cpu(), None
    up = upsample_logits(logits, size, align_corners=align_corners)
    probs = torch.softmax(up, dim=1)[0].to(torch.float16).cpu()
    if crf is None:
        # labels_from_logits' values, without upsampling a second time.
        return up[0].max(0).indices.cpu(), probs
    refined = crf(image, probs.float())
    return torch.as_tensor(refined).argmax(0).cpu(), probs
