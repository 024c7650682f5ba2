"""Joint image + mask transforms: ``(image, mask) -> (image, mask)``.

Geometric transforms work on numpy arrays: ``image`` uint8 (H, W, 3) RGB and ``mask`` uint8
(H, W) class indices (255 = ignore). Every random draw (scale, crop offset, flip) is made once
and applied to both, and masks are only ever resampled by nearest neighbour, so no label value is
invented. The last step, :class:`Normalize` (or :class:`ToTensor`), produces torch tensors.

Randomness: each random transform takes an optional ``torch.Generator``. Without one it draws
from torch's default generator, which ``torch.utils.data.DataLoader`` seeds per worker from the
loader's own generator, so a seeded loader (``deeplab.data.loader.build_dataloader(seed=...)``)
gives reproducible augmentations.

The paper's training pipeline (``build_train_transforms``): RandomScale(0.5, 1.5) ->
PadToSize(321, image padded with the mean pixel, mask with 255) -> RandomCrop(321) ->
RandomHorizontalFlip -> Normalize("caffe_bgr").
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "CAFFE_BGR_MEAN",
    "CAFFE_NORMALIZATION",
    "IMAGENET_NORMALIZATION",
    "Compose",
    "RandomScale",
    "Resize",
    "PadToSize",
    "Pad",
    "RandomCrop",
    "RandomHorizontalFlip",
    "ColorJitter",
    "ToTensor",
    "Normalize",
    "normalize_image",
    "denormalize_image",
    "check_normalization",
    "mean_pixel_rgb",
    "build_train_transforms",
    "build_eval_transforms",
]

#: Caffe DeepLab's per-channel mean in B, G, R order (subtracted, no division).
CAFFE_BGR_MEAN = (104.008, 116.669, 122.675)
CAFFE_NORMALIZATION: dict[str, Any] = {"mode": "caffe_bgr", "mean": list(CAFFE_BGR_MEAN)}
IMAGENET_NORMALIZATION: dict[str, Any] = {
    "mode": "rgb",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}

Pair = tuple[Any, Any]


def _pair(size: int | Sequence[int], what: str) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"{what} must be a positive int or (height, width), got {size}")
    return size  # type: ignore[return-value]


def _check_pair(image: np.ndarray, mask: np.ndarray | None, who: str) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3:
        raise TypeError(
            f"{who} reads a numpy image (H, W, C); got {type(image).__name__} "
            f"{getattr(image, 'shape', '')} (put ToTensor/Normalize last)"
        )
    if mask is not None and mask.shape != image.shape[:2]:
        raise ValueError(f"{who}: image {image.shape[:2]} and mask {mask.shape} sizes differ")


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


class Compose:
    """Apply joint transforms in order.

    Reads / Writes: whatever the first transform reads / the last one writes.
    """

    def __init__(self, transforms: Sequence[Callable[[Any, Any], Pair]]):
        self.transforms = list(transforms)

    def __call__(self, image: Any, mask: Any) -> Pair:
        for t in self.transforms:
            image, mask = t(image, mask)
        return image, mask

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(t) for t in self.transforms)
        return f"Compose([\n  {inner}\n])"


def _resize_image(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    h, w = size_hw
    if image.dtype == np.uint8:
        if image.shape[2] == 3:
            return np.asarray(Image.fromarray(image, mode="RGB").resize((w, h), Image.BILINEAR))
        # Other channel counts one channel at a time (mode L, the same filter and rounding as
        # RGB): as RGBA, Pillow would premultiply the colours by a 4th channel (NIR, depth...).
        planes = [
            np.asarray(Image.fromarray(np.ascontiguousarray(image[:, :, c])).resize((w, h), Image.BILINEAR))
            for c in range(image.shape[2])
        ]
        return np.stack(planes, axis=2)
    # Float: torch's bilinear (half-pixel centres, as Pillow's).
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    out = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    return out.numpy().astype(image.dtype, copy=False)


def _resize_mask(mask: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    h, w = size_hw
    return np.asarray(Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8)).resize((w, h), Image.NEAREST))


class RandomScale:
    """Rescale image and mask by one random factor drawn uniformly from ``scale_range``.

    Reads: image (H, W, C) numpy (uint8: Pillow bilinear, channel by channel unless RGB, so a
    4th channel is never taken for alpha; float: torch bilinear), mask (H, W) uint8 or ``None``.
    Pillow widens its bilinear filter when shrinking (antialiased, unlike Caffe's cv2.resize),
    so downscaled images are slightly smoother; both use pixel centres, so image and mask stay
    aligned. Writes: image and mask of size round(H*s) x round(W*s); the mask by
    nearest neighbour only.

    Args:
        scale_range: (low, high), the paper uses (0.5, 1.5).
        generator: optional ``torch.Generator`` for the draw.
    """

    def __init__(self, scale_range: Sequence[float] = (0.5, 1.5), *, generator: torch.Generator | None = None):
        low, high = (float(v) for v in scale_range)
        if not 0 < low <= high:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {tuple(scale_range)}")
        self.scale_range = (low, high)
        self.generator = generator

    def __call__(self, image: np.ndarray, mask: np.ndarray | None) -> Pair:
        _check_pair(image, mask, "RandomScale")
        s = _uniform(*self.scale_range, self.generator)
        h, w = image.shape[:2]
        size = (max(1, int(round(h * s))), max(1, int(round(w * s))))
        if size == (h, w):
            return image, mask
        return _resize_image(image, size), (None if mask is None else _resize_mask(mask, size))

    def __repr__(self) -> str:
        return f"RandomScale(scale_range={self.scale_range})"


class Resize:
    """Resize image and mask to a fixed size (deterministic).

    Reads: image (H, W, C) numpy, mask (H, W) or ``None``. Writes: both at ``size``; the mask by
    nearest neighbour.

    Args:
        size: int or (height, width).
    """

    def __init__(self, size: int | Sequence[int]):
        self.size = _pair(size, "size")

    def __call__(self, image: np.ndarray, mask: np.ndarray | None) -> Pair:
        _check_pair(image, mask, "Resize")
        if image.shape[:2] == self.size:
            return image, mask
        return _resize_image(image, self.size), (None if mask is None else _resize_mask(mask, self.size))

    def __repr__(self) -> str:
        return f"Resize(size={self.size})"


class PadToSize:
    """Pad bottom and right up to at least ``size`` (as Caffe DeepLab does before cropping).

    Reads: image (H, W, C) numpy in its own units (uint8 before normalisation), mask (H, W).
    Writes: image and mask of size (max(H, h), max(W, w)); new image pixels are ``image_fill``
    (the mean pixel, so they become 0 after mean subtraction), new mask pixels ``ignore_index``.

    Args:
        size: int or (height, width).
        image_fill: one value per channel, in the image's units; default the RGB mean pixel of
            Caffe's BGR mean, (122.675, 116.669, 104.008), rounded for uint8 images.
        ignore_index: mask fill (255).
    """

    def __init__(
        self,
        size: int | Sequence[int],
        *,
        image_fill: Sequence[float] = CAFFE_BGR_MEAN[::-1],
        ignore_index: int = 255,
    ):
        self.size = _pair(size, "size")
        self.image_fill = tuple(float(v) for v in image_fill)
        self.ignore_index = int(ignore_index)

    def __call__(self, image: np.ndarray, mask: np.ndarray | None) -> Pair:
        _check_pair(image, mask, "PadToSize")
        h, w, c = image.shape
        th, tw = max(h, self.size[0]), max(w, self.size[1])
        if (th, tw) == (h, w):
            return image, mask
        if len(self.image_fill) not in (1, c):
            raise ValueError(f"image_fill has {len(self.image_fill)} values for a {c}-channel image")
        fill = np.asarray(self.image_fill, dtype=np.float64)
        if np.issubdtype(image.dtype, np.integer):
            fill = np.round(fill)
        out = np.empty((th, tw, c), dtype=image.dtype)
        out[...] = fill.astype(image.dtype)
        out[:h, :w] = image
        if mask is not None:
            m = np.full((th, tw), self.ignore_index, dtype=mask.dtype)
            m[:h, :w] = mask
            mask = m
        return out, mask

    def __repr__(self) -> str:
        return f"PadToSize(size={self.size}, image_fill={self.image_fill}, ignore_index={self.ignore_index})"


Pad = PadToSize


class RandomCrop:
    """Crop a random ``size`` window, the same for image and mask.

    Reads: image (H, W, C) numpy with H >= h and W >= w (put :class:`PadToSize` first), mask.
    Writes: image (h, w, C) and mask (h, w) views of the inputs.

    Args:
        size: int or (height, width); 321 in the paper.
        generator: optional ``torch.Generator`` for the offsets.
        focus_classes: not in the paper: class ids (thin or rare ones) that crops seek out.
        focus_prob: probability that a crop is centred on a focus class: one of the focus
            classes present in the mask is drawn, then one of its pixels, and the window is
            placed at random among those that contain it (uniform crop when none is present).
            0 (the default) draws exactly the paper's uniform crops.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        *,
        generator: torch.Generator | None = None,
        focus_classes: Sequence[int] = (),
        focus_prob: float = 0.0,
    ):
        self.size = _pair(size, "size")
        self.generator = generator
        if not 0.0 <= focus_prob <= 1.0:
            raise ValueError(f"focus_prob must be in [0, 1], got {focus_prob}")
        self.focus_classes = tuple(int(c) for c in focus_classes)
        self.focus_prob = float(focus_prob) if self.focus_classes else 0.0

    def _draw(self, n: int) -> int:
        return int(torch.randint(0, n, (), generator=self.generator))

    def _focus(self, mask: np.ndarray | None) -> tuple[int, int] | None:
        """A pixel (y, x) of a focus class, or None (no coin won, no mask, no focus class in it)."""
        if self.focus_prob == 0.0 or mask is None:
            return None
        if float(torch.rand((), generator=self.generator)) >= self.focus_prob:
            return None
        present = [c for c in self.focus_classes if (mask == c).any()]
        if not present:
            return None
        ys, xs = np.nonzero(mask == present[self._draw(len(present))])
        k = self._draw(len(ys))
        return int(ys[k]), int(xs[k])

    def __call__(self, image: np.ndarray, mask: np.ndarray | None) -> Pair:
        _check_pair(image, mask, "RandomCrop")
        h, w = image.shape[:2]
        ch, cw = self.size
        if h < ch or w < cw:
            raise ValueError(
                f"RandomCrop{self.size}: image is {h}x{w}, smaller than the crop; put "
                f"PadToSize({ch}, {cw}) before it"
            )
        focus = self._focus(mask)
        if focus is None:
            top = self._draw(h - ch + 1)
            left = self._draw(w - cw + 1)
        else:
            # Windows containing (y, x): top in [y - ch + 1, y], clipped to the image.
            y, x = focus
            lo_t, hi_t = max(0, y - ch + 1), min(y, h - ch)
            lo_l, hi_l = max(0, x - cw + 1), min(x, w - cw)
            top = lo_t + self._draw(hi_t - lo_t + 1)
            left = lo_l + self._draw(hi_l - lo_l + 1)
        image = image[top : top + ch, left : left + cw]
        if mask is not None:
            mask = mask[top : top + ch, left : left + cw]
        return image, mask

    def __repr__(self) -> str:
        if self.focus_prob:
            return f"RandomCrop(size={self.size}, focus_classes={self.focus_classes}, focus_prob={self.focus_prob})"
        return f"RandomCrop(size={self.size})"


class RandomHorizontalFlip:
    """Mirror image and mask left-right together with probability ``p``.

    Reads: image (H, W, C) numpy, mask (H, W). Writes: the same shapes (views when flipped).
    """

    def __init__(self, p: float = 0.5, *, generator: torch.Generator | None = None):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = float(p)
        self.generator = generator

    def __call__(self, image: np.ndarray, mask: np.ndarray | None) -> Pair:
        _check_pair(image, mask, "RandomHorizontalFlip")
        if float(torch.rand((), generator=self.generator)) < self.p:
            image = image[:, ::-1]
            if mask is not None:
                mask = mask[:, ::-1]
        return image, mask

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class ColorJitter:
    """Random brightness, contrast and saturation of the image (not in the paper).

    Each factor is drawn uniformly from ``[1 - strength, 1 + strength]`` and applied with
    Pillow's ``ImageEnhance`` (brightness blends with black, contrast with the mean grey,
    saturation with the grey image), in that order. The mask is untouched.

    Reads: image (H, W, 3) uint8, mask (H, W). Writes: image (H, W, 3) uint8, the same mask.
    """

    def __init__(self, strength: float = 0.3, *, generator: torch.Generator | None = None):
        if not 0.0 <= strength < 1.0:
            raise ValueError(f"strength must be in [0, 1), got {strength}")
        self.strength = float(strength)
        self.generator = generator

    def __call__(self, image: np.ndarray, mask: np.ndarray | None) -> Pair:
        _check_pair(image, mask, "ColorJitter")
        if self.strength == 0.0:
            return image, mask
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"ColorJitter expects a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}")
        from PIL import ImageEnhance

        pil = Image.fromarray(np.ascontiguousarray(image))
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            factor = _uniform(1.0 - self.strength, 1.0 + self.strength, self.generator)
            pil = enhancer(pil).enhance(factor)
        return np.asarray(pil), mask

    def __repr__(self) -> str:
        return f"ColorJitter(strength={self.strength})"


def _mask_to_tensor(mask: np.ndarray | None) -> torch.Tensor | None:
    if mask is None:
        return None
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))


class ToTensor:
    """Convert to tensors without changing values.

    Reads: image (H, W, C) numpy, mask (H, W). Writes: image (C, H, W) tensor of the same dtype
    (uint8 stays uint8, no scaling), mask (H, W) int64 tensor (what cross-entropy expects).
    """

    def __call__(self, image: np.ndarray, mask: np.ndarray | None) -> Pair:
        _check_pair(image, mask, "ToTensor")
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()
        return img, _mask_to_tensor(mask)

    def __repr__(self) -> str:
        return "ToTensor()"


def check_normalization(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a normalisation spec and return it as a plain dict with float lists.

    Args:
        spec: ``{"mode": "caffe_bgr", "mean": [b, g, r]}`` (subtract, no division; mean in
            0..255 BGR order) or ``{"mode": "rgb", "mean": [r, g, b], "std": [r, g, b]}``
            (``(x / 255 - mean) / std``).
    """
    if not isinstance(spec, Mapping):
        raise TypeError(f"normalization spec must be a dict, got {type(spec).__name__}")
    mode = spec.get("mode")
    allowed = {"caffe_bgr": {"mode", "mean"}, "rgb": {"mode", "mean", "std"}}
    if mode not in allowed:
        raise ValueError(f"normalization mode must be 'caffe_bgr' or 'rgb', got {mode!r}")
    unknown = set(spec) - allowed[mode]
    if unknown:
        raise ValueError(f"unknown normalization keys {sorted(unknown)} for mode {mode!r}; allowed {sorted(allowed[mode])}")
    out: dict[str, Any] = {"mode": mode}
    for key in sorted(allowed[mode] - {"mode"}):
        if key not in spec:
            raise ValueError(f"normalization mode {mode!r} needs {key!r}")
        given = spec[key]
        try:
            raw = list(given)
        except TypeError:  # a bare number
            raw = [given]
        # Real, finite numbers only: a string or NaN here would give a silently wrong input.
        if len(raw) != 3 or not all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                                    and math.isfinite(v) for v in raw):
            raise ValueError(f"normalization {key!r} needs 3 finite numbers, got {given!r}")
        vals = [float(v) for v in raw]
        if key == "std" and min(vals) <= 0:
            raise ValueError(f"normalization std must be positive, got {vals}")
        out[key] = vals
    return out


def mean_pixel_rgb(spec: Mapping[str, Any]) -> tuple[float, float, float]:
    """The RGB pixel (0..255 units) that a normalisation spec maps to zero: the padding colour."""
    spec = check_normalization(spec)
    if spec["mode"] == "caffe_bgr":
        b, g, r = spec["mean"]
        return (r, g, b)
    return tuple(255.0 * m for m in spec["mean"])  # type: ignore[return-value]


def normalize_image(image: np.ndarray | torch.Tensor, spec: Mapping[str, Any]) -> torch.Tensor:
    """Turn uint8 RGB pixels into the network's input.

    Args:
        image: (H, W, 3) or a batch (B, H, W, 3), RGB, numpy array or tensor, uint8 (or float in
            0..255 units).
        spec: normalisation spec (see :func:`check_normalization`).

    Returns:
        float32 tensor (3, H, W) or (B, 3, H, W): ``caffe_bgr``: channels reversed to BGR, mean
        subtracted, no division; ``rgb``: ``(x / 255 - mean) / std``.
    """
    spec = check_normalization(spec)
    t = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(image))
    if t.ndim not in (3, 4) or t.shape[-1] != 3:
        raise ValueError(f"normalize_image reads (H, W, 3) or (B, H, W, 3) RGB, got shape {tuple(t.shape)}")
    t = t.to(torch.float32).movedim(-1, -3)
    mean = torch.tensor(spec["mean"], dtype=torch.float32).view(3, 1, 1)
    if spec["mode"] == "caffe_bgr":
        t = t.flip(-3) - mean
    else:
        std = torch.tensor(spec["std"], dtype=torch.float32).view(3, 1, 1)
        t = (t / 255.0 - mean) / std
    return t.contiguous()


def denormalize_image(tensor: torch.Tensor, spec: Mapping[str, Any]) -> np.ndarray:
    """Inverse of :func:`normalize_image`: (3, H, W) or (B, 3, H, W) -> uint8 (..., H, W, 3) RGB."""
    spec = check_normalization(spec)
    t = tensor.detach().to("cpu", torch.float32)
    mean = torch.tensor(spec["mean"], dtype=torch.float32).view(3, 1, 1)
    if spec["mode"] == "caffe_bgr":
        t = (t + mean).flip(-3)
    else:
        std = torch.tensor(spec["std"], dtype=torch.float32).view(3, 1, 1)
        t = (t * std + mean) * 255.0
    return t.round().clamp(0, 255).to(torch.uint8).movedim(-3, -1).numpy()


class Normalize:
    """Normalise the image and convert both to tensors (the last step of a pipeline).

    Reads: image (H, W, 3) uint8 RGB numpy, mask (H, W) or ``None``. Writes: image float32
    tensor (3, H, W) (see :func:`normalize_image`), mask int64 tensor (H, W).

    Args:
        mode: ``"caffe_bgr"`` (BGR minus ``mean``, no division) or ``"rgb"`` (``(x/255 - mean)/std``).
        mean: per-channel mean; default Caffe's (104.008, 116.669, 122.675) for caffe_bgr.
        std: per-channel std (``rgb`` only).
    """

    def __init__(self, mode: str = "caffe_bgr", mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        spec: dict[str, Any] = {"mode": mode}
        if mode == "caffe_bgr":
            spec["mean"] = list(CAFFE_BGR_MEAN if mean is None else mean)
            if std is not None:
                raise ValueError("Normalize(mode='caffe_bgr') takes no std (Caffe does not divide)")
        else:
            if mean is None or std is None:
                raise ValueError(f"Normalize(mode={mode!r}) needs mean and std")
            spec["mean"], spec["std"] = list(mean), list(std)
        self.spec = check_normalization(spec)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Normalize:
        """Build from a spec dict such as ``{"mode": "caffe_bgr", "mean": [...]}``."""
        spec = check_normalization(spec)
        return cls(spec["mode"], spec["mean"], spec.get("std"))

    def __call__(self, image: np.ndarray, mask: np.ndarray | None) -> Pair:
        _check_pair(image, mask, "Normalize")
        return normalize_image(image, self.spec), _mask_to_tensor(mask)

    def __repr__(self) -> str:
        return f"Normalize({self.spec})"


def build_train_transforms(
    *,
    crop_size: int | Sequence[int] = 321,
    scale_range: Sequence[float] | None = (0.5, 1.5),
    flip: bool = True,
    normalization: Mapping[str, Any] = CAFFE_NORMALIZATION,
    ignore_index: int = 255,
    generator: torch.Generator | None = None,
    focus_classes: Sequence[int] = (),
    focus_prob: float = 0.0,
    color_jitter: float = 0.0,
) -> Compose:
    """The paper's training augmentation.

    Args:
        crop_size: crop (321 for VOC in the paper).
        scale_range: random scale range, ``None`` to disable.
        flip: random horizontal flip.
        normalization: spec; its mean pixel is the image padding colour.
        ignore_index: mask padding value.
        generator: optional shared ``torch.Generator`` (default: torch's per-worker RNG).
        focus_classes / focus_prob: class-focused crops (see :class:`RandomCrop`; not in the paper).
        color_jitter: :class:`ColorJitter` strength, 0 for none (not in the paper).

    Returns:
        Compose: [ColorJitter] -> RandomScale -> PadToSize -> RandomCrop ->
        [RandomHorizontalFlip] -> Normalize.
    """
    steps: list[Callable[[Any, Any], Pair]] = []
    if color_jitter:
        # First, so that the padding added next keeps the mean colour (zero after normalisation).
        steps.append(ColorJitter(color_jitter, generator=generator))
    if scale_range is not None:
        steps.append(RandomScale(scale_range, generator=generator))
    steps.append(PadToSize(crop_size, image_fill=mean_pixel_rgb(normalization), ignore_index=ignore_index))
    steps.append(RandomCrop(crop_size, generator=generator, focus_classes=focus_classes, focus_prob=focus_prob))
    if flip:
        steps.append(RandomHorizontalFlip(0.5, generator=generator))
    steps.append(Normalize.from_spec(normalization))
    return Compose(steps)


def build_eval_transforms(
    *,
    normalization: Mapping[str, Any] = CAFFE_NORMALIZATION,
    pad_to: int | Sequence[int] | None = None,
    ignore_index: int = 255,
) -> Compose:
    """Evaluation pipeline: the full image, optionally padded (Caffe tests on a 513 padded crop).

    Args:
        normalization: spec.
        pad_to: pad bottom/right to this size (mean pixel / ``ignore_index``), ``None`` for none.
        ignore_index: mask padding value.
    """
    steps: list[Callable[[Any, Any], Pair]] = []
    if pad_to is not None:
        steps.append(PadToSize(pad_to, image_fill=mean_pixel_rgb(normalization), ignore_index=ignore_index))
    steps.append(Normalize.from_spec(normalization))
    return Compose(steps)
