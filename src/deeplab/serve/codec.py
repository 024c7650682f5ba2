"""Bytes in and out of the service: decoding uploads, encoding label maps, overlays and probabilities.

Decoding follows :func:`deeplab.data.io.read_image` step for step (the pixel cap checked from the
header before any pixel is decoded, Pillow's load, the EXIF orientation, :func:`pil_to_rgb`), so
that an upload becomes the array ``deeplab segment`` makes of the same file; the label PNG is
encoded as :func:`deeplab.data.io.write_label_png` writes it (a test compares the bytes).
Failures raise :class:`UploadError` with the HTTP status the service answers (413 too large,
415 not an image, 400 damaged).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from deeplab.data.io import ImageReadError, label_png_image, pil_to_rgb

__all__ = ["DECODED_FORMATS", "UploadError", "decode_image", "label_png_bytes", "jpeg_bytes", "npy_bytes"]

#: The formats an upload may be in (Pillow's names; "JPEG" also opens the multi-picture JPEGs of
#: many phone cameras). A closed list: Pillow also opens formats such as EPS by running
#: Ghostscript, which no upload should be able to start.
DECODED_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM", "GIF")


class UploadError(ValueError):
    """An upload the service refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _describe(data: bytes) -> str:
    head = data[:8]
    return f"{len(data)} bytes starting with {head!r}"


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """An uploaded image file's bytes as uint8 (H,W,3) RGB, as ``read_image`` reads the file.

    Args:
        data: the file's bytes.
        max_pixels: refuse more than this many pixels (width x height, read from the header
            before decoding: a decompression bomb costs nothing).

    Raises:
        UploadError: 400 empty or damaged (truncated, corrupt), 413 over ``max_pixels``, 415 not
            an image of :data:`DECODED_FORMATS` (or a floating-point one).
    """
    if not data:
        raise UploadError(400, "the upload is empty: send an image file (multipart field 'image' or the raw bytes)")
    Image.init()  # registers every plugin: Image.open(formats=...) looks the names up before doing so
    try:
        with warnings.catch_warnings():
            # Our own cap below replaces Pillow's global decompression-bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=DECODED_FORMATS)
    except UnidentifiedImageError:
        raise UploadError(415, f"the upload is not an image in a supported format ({', '.join(DECODED_FORMATS)}): "
                               f"got {_describe(data)}") from None
    except Image.DecompressionBombError as e:
        raise UploadError(413, f"the image is refused by Pillow's decompression-bomb check ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise UploadError(400, f"the image header cannot be read ({e}): the upload is corrupt") from None
    width, height = img.size
    if width * height > max_pixels:
        raise UploadError(413, f"the image is {width}x{height} = {width * height} pixels, above this service's cap "
                               f"of {max_pixels} pixels: downscale it (the server's --max-image-pixels sets the cap)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow says "image file is truncated (N bytes not processed)" for a cut-off upload.
        raise UploadError(400, f"the {img.format} image cannot be decoded ({e}): the upload is truncated or "
                               "corrupt; send the whole file") from None
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception as e:  # a malformed EXIF block must not pass silently as a wrong orientation
        raise UploadError(400, f"the {img.format} image has malformed EXIF orientation data ({e})") from None
    try:
        return pil_to_rgb(img, f"the {img.format} image")
    except ImageReadError as e:
        raise UploadError(415, str(e)) from None


def label_png_bytes(labels: np.ndarray, palette: np.ndarray) -> bytes:
    """The palette PNG of a label map, byte for byte what ``write_label_png`` writes to a file."""
    buf = io.BytesIO()
    label_png_image(labels, palette).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(image: np.ndarray, quality: int = 90) -> bytes:
    """An RGB uint8 image as JPEG, with ``deeplab.engine.segment.save_jpeg``'s quality."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def npy_bytes(probs: np.ndarray) -> bytes:
    """(C,H,W) probabilities as a float16 ``.npy`` file, as ``deeplab segment --save-probs`` writes."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(probs).astype(np.float16))
    return buf.getvalue()
