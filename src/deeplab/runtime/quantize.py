"""int8 post-training quantization of an exported graph with NNCF (``deeplab export --int8``).

:func:`quantize_int8` turns the fp32 graph ``deeplab export`` writes into a QDQ int8 ONNX graph
(``QuantizeLinear`` / ``DequantizeLinear`` pairs around the convolutions: int8 weights per output
channel, int8 activations per tensor, NNCF's "performance" preset, symmetric), calibrated on
images fed through the graph's own pre-processing (the ``normalization`` of its metadata). The
result is still an ``.onnx`` file with the same input, output and ``metadata_props`` (plus a
``quantization`` entry), so :class:`deeplab.runtime.Predictor` and ``--backend`` run it as they
run the fp32 graph: ONNX Runtime fuses the pairs into int8 convolutions, OpenVINO into its own
int8 kernels (VNNI on AVX-512 CPUs).

Why NNCF's ONNX backend and not ONNX Runtime's ``quantize_static`` or a hand-written scheme:
NNCF is OpenVINO's own quantizer, places the pairs where OpenVINO's CPU plugin fuses them, and
corrects the biases after quantization (fast bias correction); one QDQ graph then serves both
runtimes. What it cost on CamVid val and what it gained is in docs/deployment.md.

Imports numpy, Pillow, onnx and nncf (whose ONNX backend runs ONNX Runtime to collect the
activation statistics); not PyTorch itself (NNCF loads it if it is installed).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deeplab.fileio import atomic_path
from deeplab.runtime import normalize

__all__ = ["IMAGE_EXTENSIONS", "calibration_images", "quantize_int8"]

#: What :func:`calibration_images` collects (as the ``folder`` data set reads).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
#: Calibration images above this many pixels are downscaled first: the size cap of
#: ``deeplab.engine.inference``, so the statistics come from the sizes the network runs at.
_MAX_PIXELS = 6_000_000
_INSTALL = "pip install 'deeplab[int8]'"


def calibration_images(folder: str | os.PathLike[str], count: int) -> list[Path]:
    """``count`` image files of ``folder`` (searched recursively, hidden entries skipped), spread
    evenly over its sorted listing; all of them if it holds fewer.

    Evenly spread rather than the first ``count``: image folders are often sorted by sequence
    (CamVid's train split is five videos one after the other), and the first files would all be
    one scene.

    Raises:
        ValueError: ``count`` below 1, ``folder`` not a folder, or no image in it.
    """
    folder = Path(folder)
    if count < 1:
        raise ValueError(f"the number of calibration images must be at least 1, got {count}")
    if not folder.is_dir():
        raise ValueError(f"calibration folder {folder} does not exist or is not a folder: give a folder of "
                         "training images (never the evaluation split)")
    files = sorted(p for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise ValueError(f"calibration folder {folder} holds no image ({', '.join(IMAGE_EXTENSIONS)}, searched "
                         "recursively): give a folder of training images")
    if len(files) <= count:
        return files
    picks = np.linspace(0, len(files), num=count, endpoint=False).astype(int)
    return [files[i] for i in picks]


def _read_rgb(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """uint8 (H, W, 3) RGB, EXIF orientation applied, by Pillow alone (``deeplab.data`` would load
    PyTorch); resized to ``size`` (height, width) for a fixed-size graph, else capped at ``_MAX_PIXELS``."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"calibration image {path} cannot be read ({e}): remove it or give another folder") from None
    w, h = img.size
    if size is None and w * h > _MAX_PIXELS:
        f = (_MAX_PIXELS / (w * h)) ** 0.5
        size = (max(1, int(h * f)), max(1, int(w * f)))
    if size is not None and (h, w) != tuple(size):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(img)


def quantize_int8(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    images: Sequence[str | os.PathLike[str]],
) -> dict[str, Any]:
    """Quantize the fp32 graph ``src`` to int8 with NNCF, calibrated on ``images``; write ``dst``.

    Each calibration image goes through the graph's own pre-processing (the ``normalization``
    of its ``metadata_props``), one at a time, at its own size for a graph exported with
    ``--dynamic`` and resized to the graph's input size otherwise.

    Args:
        src: an fp32 ``.onnx`` file from ``deeplab export`` (it must carry ``normalization``).
        dst: the int8 ``.onnx`` file, written atomically; may not be ``src``.
        images: calibration image files (see :func:`calibration_images`); training images,
            never those the model is evaluated on.

    Returns:
        The ``quantization`` entry added to the metadata (tool and version, preset, image count).

    Raises:
        ImportError: nncf (or onnx / onnxruntime) is not installed; the message says what to install.
        ValueError: no images, ``src`` without normalisation metadata, or an unreadable image.
    """
    try:
        import nncf
        import onnx
        import onnxruntime  # noqa: F401  (NNCF's ONNX backend collects the statistics with it)
    except ImportError as e:
        raise ImportError(f"int8 quantization needs the {e.name} package: {_INSTALL}", name=e.name) from None
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"the int8 graph cannot overwrite its fp32 source {src}: give another output file")
    if not images:
        raise ValueError("no calibration images given")
    proto = onnx.load(str(src))
    props = {p.key: p.value for p in proto.metadata_props}
    if "normalization" not in props:
        raise ValueError(f"{src}: no 'normalization' metadata, so the calibration images cannot be pre-processed "
                         "as the graph expects: export it with 'deeplab export' from weights that carry it")
    normalization = json.loads(props["normalization"])
    graph_input = proto.graph.input[0]
    dims = graph_input.type.tensor_type.shape.dim[2:]
    fixed = all(d.HasField("dim_value") for d in dims)
    size = (dims[0].dim_value, dims[1].dim_value) if fixed else None

    def feed(path):
        return {graph_input.name: normalize(_read_rgb(Path(path), size)[None], normalization)}

    quantized = nncf.quantize(proto, nncf.Dataset(list(images), feed), subset_size=len(images),
                              preset=nncf.QuantizationPreset.PERFORMANCE)
    record = {
        "format": "QDQ int8: weights per output channel, activations per tensor, symmetric",
        "tool": f"nncf {nncf.__version__}",
        "preset": "performance",
        "fast_bias_correction": True,
        "calibration_images": len(images),
        "calibration_size": "graph input size" if fixed else "each image's own size",
    }
    # The metadata is what the runtime pre-processes by: copied from the source rather than
    # trusting the quantizer to carry it over.
    del quantized.metadata_props[:]
    for key, value in {**props, "quantization": json.dumps(record, sort_keys=True)}.items():
        entry = quantized.metadata_props.add()
        entry.key, entry.value = key, value
    quantized.producer_name = "deeplab"
    onnx.checker.check_model(quantized, full_check=True)
    with atomic_path(dst) as tmp:
        onnx.save(quantized, str(tmp))
    return record
