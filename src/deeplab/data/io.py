"""Reading images and label masks safely, and writing palette label PNGs.

Every reader returns plain numpy arrays: images as uint8 (H, W, 3) RGB, masks as uint8 (H, W)
class indices. Anything wrong with a file (missing, unreadable, truncated, too large, a colour
mask where indices are expected) raises :class:`ImageReadError`, a ``ValueError`` whose message
names the file and says how to fix it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from deeplab.fileio import atomic_open

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageReadError",
    "ImageNotFoundError",
    "pil_to_rgb",
    "read_image",
    "read_mask",
    "read_mat_mask",
    "write_label_png",
    "colour_mask_to_labels",
]

#: Default cap on width x height, checked from the header before any pixel is decoded.
DEFAULT_MAX_PIXELS = 64_000_000

# Modes whose pixel values are class indices as stored (a palette PNG's indices, not its colours).
_INDEX_MODES = ("P", "L")
_WIDE_INT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


class ImageReadError(ValueError):
    """An image or mask file could not be read as asked; the message names the file."""


class ImageNotFoundError(ImageReadError, FileNotFoundError):
    """The file does not exist (both an :class:`ImageReadError` and a ``FileNotFoundError``)."""


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open ``path``, check its header size against ``max_pixels``, decode it and apply EXIF orientation."""
    if not path.is_file():
        raise ImageNotFoundError(f"{path}: file not found (check the data root and the split list)")
    try:
        with warnings.catch_warnings():
            # Our own cap below replaces Pillow's global MAX_IMAGE_PIXELS warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)  # lazy: reads the header only
            width, height = img.size
            if width * height > max_pixels:
                img.close()
                # Name both ways to raise the cap: read_image's max_pixels is not the network
                # size cap that deeplab.segment(max_pixels=...) and --max-pixels set.
                raise ImageReadError(
                    f"{path}: {width}x{height} = {width * height} pixels exceeds the cap of "
                    f"{max_pixels} pixels for decoding an image (a guard against decompression "
                    "bombs): downscale the file, or if it is trusted raise the cap "
                    "(deeplab segment --max-image-pixels N; read_image(path, max_pixels=N) in Python)"
                )
            img.load()
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{path}: refused by Pillow's decompression-bomb check ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # OSError covers "image file is truncated" and UnidentifiedImageError.
        raise ImageReadError(
            f"{path}: cannot decode image ({exc}); the file is truncated, corrupt or not an "
            "image: re-download or re-export it"
        ) from exc
    try:
        # In place: the default returns a full copy even when there is nothing to rotate.
        ImageOps.exif_transpose(img, in_place=True)
        return img
    except Exception as exc:  # a malformed EXIF block must not pass silently as a wrong orientation
        raise ImageReadError(f"{path}: malformed EXIF orientation data ({exc})") from exc


def _wide_to_uint8(arr: np.ndarray) -> np.ndarray:
    # 16-bit data: map the full 0..65535 range onto 0..255 (65535 / 257 = 255 exactly).
    arr = np.clip(arr, 0, 65535).astype(np.uint32)
    return ((arr + 128) // 257).astype(np.uint8)


def read_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image as RGB uint8.

    Args:
        path: image file (anything Pillow decodes: JPEG, PNG, BMP, TIFF, WebP...).
        max_pixels: refuse images with more than this many pixels (checked from the header,
            before decoding, so a decompression bomb costs nothing).

    Returns:
        ``np.ndarray`` uint8 (H, W, 3), RGB, EXIF orientation applied. Grayscale (L, 1, I;16, I)
        is replicated to three channels (16-bit scaled by 1/257), alpha (LA, RGBA, PA) is dropped,
        palette images are expanded to their colours, CMYK/YCbCr converted.

    Raises:
        ImageReadError: missing, unreadable, truncated or oversized file (the message names it).
    """
    path = Path(path)
    return pil_to_rgb(_open(path, max_pixels), str(path))


def pil_to_rgb(img: Image.Image, name: str = "PIL image") -> np.ndarray:
    """Convert a decoded PIL image to RGB uint8 as :func:`read_image` does (no EXIF step).

    Args:
        img: any PIL image.
        name: what to call it in error messages (the file name for :func:`read_image`).

    Returns:
        ``np.ndarray`` uint8 (H, W, 3) RGB; 16-bit grayscale is scaled by 1/257.

    Raises:
        ImageReadError: a floating-point (mode F) image, or an unexpected decoded layout.
    """
    mode = img.mode
    if mode in _WIDE_INT_MODES or mode == "F":
        if mode == "F":
            raise ImageReadError(
                f"{name}: floating-point image (mode F) has no defined 0..255 range; convert it to "
                "8-bit before use"
            )
        # Pillow's convert("RGB") clips 16-bit values at 255 instead of scaling them.
        gray = _wide_to_uint8(np.asarray(img))
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode != "RGB":
        if mode in ("P", "PA") and "transparency" in img.info:
            img = img.convert("RGBA")
        img = img.convert("RGB")
    out = np.asarray(img)
    if not out.flags.writeable:  # Pillow hands out a read-only buffer; callers may edit in place
        out = out.copy()
    if out.dtype != np.uint8 or out.ndim != 3 or out.shape[2] != 3:
        raise ImageReadError(f"{name}: unexpected decoded layout {out.shape} {out.dtype} (mode {mode})")
    return out


def read_mask(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a label mask as class indices.

    Args:
        path: a single-channel label image: palette PNG (mode P, the VOC style: the *indices*
            are returned, never the colours), grayscale (mode L), 1-bit, or 16-bit grayscale whose
            values are all below 256.
        max_pixels: size cap, as for :func:`read_image`.

    Returns:
        ``np.ndarray`` uint8 (H, W) of raw label values (no data-set mapping applied).

    Raises:
        ImageReadError: missing/unreadable file, an RGB colour-coded mask (convert it with
            :func:`colour_mask_to_labels`), or 16-bit values >= 256.
    """
    path = Path(path)
    img = _open(path, max_pixels)
    mode = img.mode
    if mode in _INDEX_MODES:
        return np.array(img, dtype=np.uint8, copy=True)
    if mode == "1":
        return np.asarray(img, dtype=np.uint8)
    if mode in _WIDE_INT_MODES:
        arr = np.asarray(img)
        top = int(arr.max()) if arr.size else 0
        low = int(arr.min()) if arr.size else 0
        if top > 255 or low < 0:
            raise ImageReadError(
                f"{path}: 16-bit mask with values in [{low}, {top}]; labels must lie in 0..255 "
                "(remap the classes to fewer than 256 ids and save as an 8-bit PNG)"
            )
        return arr.astype(np.uint8)
    if mode == "LA":
        return np.array(img.getchannel("L"), dtype=np.uint8)
    raise ImageReadError(
        f"{path}: mask has mode {mode} (a colour-coded mask?); masks must hold one class index per "
        "pixel (8-bit grayscale or palette PNG). Convert a colour mask with "
        "deeplab.data.io.colour_mask_to_labels(read_image(path), palette) and write it with "
        "write_label_png"
    )


def read_mat_mask(path: str | os.PathLike, key: str) -> np.ndarray:
    """Read a label map stored in a MATLAB ``.mat`` file (SBD, COCO-stuff 10k).

    Args:
        path: the ``.mat`` file (MATLAB v5 format, read with ``scipy.io.loadmat``).
        key: dotted path to the array: ``"GTcls.Segmentation"`` (SBD) or ``"S"`` (COCO-stuff 10k).

    Returns:
        ``np.ndarray`` uint8 (H, W) raw label values.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageNotFoundError(f"{path}: file not found (check the data root and the split list)")
    try:
        import scipy.io
    except ImportError as exc:  # optional dependency: say how to get it
        raise ImportError(
            f"reading {path} needs scipy: pip install 'deeplab[mat]' (or pip install scipy)"
        ) from exc
    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)
    except NotImplementedError as exc:
        raise ImageReadError(f"{path}: MATLAB v7.3 (HDF5) files are not supported; re-save as v7") from exc
    except Exception as exc:  # scipy raises assorted errors on corrupt files
        raise ImageReadError(f"{path}: cannot read .mat file ({exc})") from exc
    obj = mat
    for part in key.split("."):
        try:
            obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
        except (KeyError, AttributeError):
            raise ImageReadError(f"{path}: no field {key!r} in the .mat file (found {sorted(k for k in mat if not k.startswith('__'))})") from None
    arr = np.asarray(obj)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer) and not np.issubdtype(arr.dtype, np.floating):
        raise ImageReadError(f"{path}: field {key!r} is not a 2-D label map (shape {arr.shape}, {arr.dtype})")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ImageReadError(f"{path}: labels in [{arr.min()}, {arr.max()}] do not fit 0..255")
    return arr.astype(np.uint8)


def label_png_image(labels: np.ndarray, palette: np.ndarray | None = None) -> Image.Image:
    """A label map as the PIL image of its PNG: palette mode (``P``) with ``palette``, else ``L``.

    Args:
        labels: uint8-compatible (H, W) class indices (255 = ignore).
        palette: (N, 3) uint8 RGB colours for indices 0..N-1 (N <= 256); index 255 is drawn white
            when the palette does not reach it. ``None``: grayscale.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"labels must lie in 0..255 to fit a PNG, got [{labels.min()}, {labels.max()}]")
    img = Image.fromarray(labels.astype(np.uint8), mode="L")
    if palette is not None:
        pal = np.zeros((256, 3), dtype=np.uint8)
        pal[255] = 255
        palette = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
        if len(palette) > 256:
            raise ValueError(f"palette has {len(palette)} colours; a PNG holds at most 256")
        pal[: len(palette)] = palette
        img = img.convert("P")
        img.putpalette(pal.ravel().tolist())
    return img


def write_label_png(path: str | os.PathLike, labels: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Write a label map as a palette PNG (:func:`label_png_image`), atomically (temporary file +
    ``os.replace``)."""
    img = label_png_image(labels, palette)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as fh:
        img.save(fh, format="PNG")


def colour_mask_to_labels(
    rgb: np.ndarray, palette: np.ndarray, *, unknown: int | None = None
) -> np.ndarray:
    """Convert a colour-coded (H, W, 3) mask to class indices through its palette.

    Args:
        rgb: uint8 (H, W, 3) colour mask.
        palette: (N, 3) colours; pixel of colour ``palette[k]`` becomes ``k``.
        unknown: label for colours not in the palette (e.g. 255); ``None`` raises instead.

    Returns:
        uint8 (H, W) labels.
    """
    rgb = np.asarray(rgb, dtype=np.uint8)
    palette = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    pal_code = (palette[:, 0].astype(np.int32) << 16) | (palette[:, 1].astype(np.int32) << 8) | palette[:, 2]
    order = np.argsort(pal_code, kind="stable")
    sorted_codes = pal_code[order]
    pos = np.clip(np.searchsorted(sorted_codes, code), 0, len(sorted_codes) - 1)
    found = sorted_codes[pos] == code
    out = order[pos].astype(np.uint8)
    if not found.all():
        if unknown is None:
            ys, xs = np.nonzero(~found)
            c = rgb[ys[0], xs[0]]
            raise ValueError(
                f"colour {tuple(int(v) for v in c)} at (y={ys[0]}, x={xs[0]}) is not in the palette "
                "(pass unknown=255 to map unknown colours to ignore)"
            )
        out[~found] = unknown
    return out
