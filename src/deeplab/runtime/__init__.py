"""Deployment without PyTorch: an exported DeepLab graph run by ONNX Runtime or OpenVINO.

This package imports numpy and the chosen runtime only (Pillow to read image files), so a
service image can drop PyTorch. It runs the graph ``deeplab export`` writes (input ``image``,
the normalised batch; output ``logits`` at the network's stride) with the same pre- and
post-processing as ``deeplab segment``, read from the graph's ``metadata_props``:
``normalization`` (Caffe BGR minus the mean, or RGB ``(x / 255 - mean) / std``),
``logits_stride`` and ``align_corners`` (how the logits are upsampled: Caffe's corner-aligned
bilinear for v1 / v2, ``align_corners=False`` for v3 / v3+), ``class_names`` and ``palette``.

Example::

    from deeplab.runtime import Predictor
    predictor = Predictor("camvid.onnx", backend="openvino")      # or "onnxruntime"
    labels, probs = predictor.predict(rgb_uint8_image, flip=False)

The bilinear upsampling is written here with numpy (two small interpolation matrices, exact
PyTorch semantics for both corner conventions) because neither runtime's resize is exposed
outside a graph and the project's graphs end at the logits on purpose (see ``deeplab export``).
Not supported here (use the PyTorch path): multi-scale inputs, sliding windows, the CRF, and
weights with an ``input_scale`` other than 1.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BACKENDS", "Predictor", "bilinear_matrix", "image_batch", "normalize", "upsample"]

#: The runtimes a :class:`Predictor` can use.
BACKENDS = ("onnxruntime", "openvino")
_PRECISIONS = ("auto", "fp32")


def bilinear_matrix(n_in: int, n_out: int, align_corners: bool) -> np.ndarray:
    """The (n_out, n_in) float32 matrix of 1-D bilinear interpolation as ``torch.nn.functional.interpolate``
    computes it (``align_corners`` True: corners on corners; False: pixel centres, clamped at 0)."""
    out = np.zeros((n_out, n_in), dtype=np.float32)
    if align_corners:
        scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        src = np.arange(n_out, dtype=np.float32) * np.float32(scale)
    else:
        scale = np.float32(n_in / n_out)
        src = np.maximum((np.arange(n_out, dtype=np.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = (src - i0).astype(np.float32)
    rows = np.arange(n_out)
    np.add.at(out, (rows, i0), 1.0 - lam)
    np.add.at(out, (rows, i1), lam)
    return out


def upsample(logits: np.ndarray, size: tuple[int, int], align_corners: bool) -> np.ndarray:
    """Bilinear resize of (..., h, w) logits to ``size`` (float32)."""
    h, w = logits.shape[-2:]
    if (h, w) == tuple(size):
        return logits.astype(np.float32, copy=False)
    wy = bilinear_matrix(h, size[0], align_corners)
    wx = bilinear_matrix(w, size[1], align_corners)
    return np.matmul(np.matmul(wy, logits.astype(np.float32, copy=False)), wx.T)


def image_batch(images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """uint8 RGB ``(H, W, 3)``, ``(B, H, W, 3)`` or a list of equal-size images as a ``(B, H, W, 3)`` batch.

    Raises:
        ValueError: another dtype or shape, or images of different sizes.
    """
    if isinstance(images, (list, tuple)):
        sizes = {np.asarray(im).shape for im in images}
        if len(sizes) != 1:
            raise ValueError(f"images of a batch must have one size, got {sorted(sizes)}")
        images = np.stack([np.asarray(im) for im in images])
    batch = np.asarray(images)
    if batch.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB images, got dtype {batch.dtype}")
    if batch.ndim == 3:
        batch = batch[None]
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image or a (B, H, W, 3) batch, got shape {batch.shape}")
    return batch


def normalize(images: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """uint8 (B, H, W, 3) RGB -> the network's float32 (B, 3, H, W) input, as ``deeplab.data.transforms``."""
    x = images.astype(np.float32).transpose(0, 3, 1, 2)
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(1, 3, 1, 1)
    if spec.get("mode") == "caffe_bgr":
        return np.ascontiguousarray(x[:, ::-1] - mean)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x / 255.0 - mean) / std)


def _softmax(logits: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


class Predictor:
    """One exported graph on one runtime, with the project's pre- and post-processing.

    Args:
        path: an ``.onnx`` file from ``deeplab export`` (``--dynamic`` for any image size).
        backend: ``"onnxruntime"`` or ``"openvino"``.
        precision: ``"auto"`` (the runtime's default: OpenVINO computes in bf16 on CPUs with
            bf16 units) or ``"fp32"``.
        threads: CPU threads for the runtime (None: its default).

    Attributes:
        fixed_size: ``(height, width)`` of a graph exported without ``--dynamic``, else None.
        metadata: the graph's ``metadata_props`` (JSON-decoded), from which ``num_classes``,
            ``class_names``, ``palette``, ``normalization``, ``align_corners`` and
            ``logits_stride`` are read into attributes of those names.
    """

    def __init__(self, path: str | os.PathLike[str], backend: str = "onnxruntime", *, precision: str = "auto",
                 threads: int | None = None) -> None:
        self.path = Path(path)
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: use one of {BACKENDS}")
        if precision not in _PRECISIONS:
            raise ValueError(f"precision={precision!r}: use one of {_PRECISIONS}")
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such ONNX file (write one with 'deeplab export')")
        self.backend = backend
        self.precision = precision
        self._run, raw = (self._onnxruntime if backend == "onnxruntime" else self._openvino)(threads)
        self.metadata: dict[str, Any] = {}
        for key, value in raw.items():
            try:
                self.metadata[key] = json.loads(value)
            except (TypeError, json.JSONDecodeError):
                self.metadata[key] = value
        meta = self.metadata
        if "normalization" not in meta or "num_classes" not in meta:
            raise ValueError(f"{self.path}: no 'normalization' / 'num_classes' metadata: export it with "
                             "'deeplab export --weights W.safetensors' from weights that carry them")
        if float(meta.get("input_scale", 1.0) or 1.0) != 1.0:
            raise ValueError(f"{self.path}: the weights run at input_scale {meta['input_scale']}, which the "
                             "PyTorch-free runtime does not implement: use --backend torch")
        self.num_classes = int(meta["num_classes"])
        self.normalization = dict(meta["normalization"])
        self.align_corners = bool(meta.get("align_corners", True))
        self.logits_stride = meta.get("logits_stride", meta.get("output_stride"))
        self.class_names = list(meta.get("class_names") or [f"class_{i}" for i in range(self.num_classes)])
        self.palette = meta.get("palette")

    # ---------------------------------------------------------------- runtimes
    def _onnxruntime(self, threads: int | None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        dims = session.get_inputs()[0].shape[-2:]
        self.fixed_size = tuple(dims) if all(isinstance(d, int) for d in dims) else None

        def run(x: np.ndarray) -> np.ndarray:
            return session.run(None, {name: x})[0]

        return run, dict(session.get_modelmeta().custom_metadata_map)

    def _openvino(self, threads: int | None):
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(self.path))
        raw: dict[str, str] = {}
        if model.has_rt_info(["framework"]):
            for key in model.get_rt_info(["framework"]).astype(dict):
                raw[key] = model.get_rt_info(["framework", key]).astype(str)
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if self.precision == "fp32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        dims = model.input(0).get_partial_shape()[2:]
        self.fixed_size = (dims[0].get_length(), dims[1].get_length()) if dims.is_static else None
        compiled = core.compile_model(model, "CPU", config)
        # An infer request serves one inference at a time: one per calling thread (the service's
        # workers share this predictor). infer() copies its outputs (share_outputs=False).
        local = threading.local()

        def run(x: np.ndarray) -> np.ndarray:
            request = getattr(local, "request", None)
            if request is None:
                request = local.request = compiled.create_infer_request()
            return np.asarray(request.infer({0: x})[compiled.output(0)])

        return run, raw

    # ---------------------------------------------------------------- inference
    def logits(self, images: np.ndarray | Sequence[np.ndarray], *, flip: bool = False) -> np.ndarray:
        """float32 (B, C, h, w) logits at the network's stride for uint8 RGB (H, W, 3) or (B, H, W, 3)."""
        x = normalize(image_batch(images), self.normalization)
        try:
            out = np.asarray(self._run(x), dtype=np.float32)
            if flip:
                out = 0.5 * (out + np.asarray(self._run(np.ascontiguousarray(x[..., ::-1])), dtype=np.float32)[..., ::-1])
        except Exception as e:  # the runtimes raise their own types for a shape the graph cannot take
            raise ValueError(f"{self.path} ({self.backend}) cannot run a {x.shape[2]}x{x.shape[3]} input: "
                             f"{str(e).splitlines()[0]}; export the graph with --dynamic for any size") from None
        return out

    def predict(self, image: np.ndarray, *, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(labels, probs)`` of one uint8 (H, W, 3) RGB image: (H, W) class indices (uint8 up
        to 256 classes) and float32 (C, H, W) softmax probabilities, as ``deeplab.segment``."""
        logits = self.logits(image, flip=flip)[0]
        probs = _softmax(upsample(logits, image.shape[:2], self.align_corners), axis=0)
        labels = probs.argmax(0).astype(np.uint8 if self.num_classes <= 256 else np.int32)
        return labels, probs
