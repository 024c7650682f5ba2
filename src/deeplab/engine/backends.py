"""Inference backends for segment and eval: PyTorch, or the exported graph on ONNX Runtime / OpenVINO.

``--backend onnxruntime|openvino`` runs the ONNX graph of the weights through
:class:`deeplab.runtime.Predictor`, wrapped as a module the inference engine drives like any
model, so multi-scale inputs, flipping, the size cap, videos, the CRF and the metrics stay the
one implementation of :mod:`deeplab.engine.inference`. A ``.onnx`` file (``deeplab export
--dynamic``) is used as it is; other weights are exported once into a cache
(``$XDG_CACHE_HOME/deeplab/onnx``, else ``~/.cache/deeplab/onnx``), keyed by the weights file's
sha256 and the torch version, and reused.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from deeplab.engine.segment import ModelBundle, bundle_from_model, check_device, load_bundle

__all__ = ["BACKENDS", "RuntimeModel", "load_backend_bundle", "onnx_for_weights"]

BACKENDS = ("torch", "onnxruntime", "openvino")


class RuntimeModel(nn.Module):
    """A :class:`deeplab.runtime.Predictor`'s graph behind ``model(x) -> logits`` (CPU, float32).

    Carries what the engine reads from a model: ``num_classes``, ``output_stride``,
    ``align_corners`` and ``msc_fusion`` (from the graph's metadata and model family).
    """

    def __init__(self, predictor) -> None:
        super().__init__()
        from deeplab.models import model_info

        self.predictor = predictor
        meta = predictor.metadata
        self.num_classes = predictor.num_classes
        self.name = str(meta.get("model", "onnx"))
        self.output_stride = meta.get("output_stride")
        self.align_corners = predictor.align_corners
        try:
            self.msc_fusion = model_info(self.name).msc_fusion
        except ValueError:  # a graph of a model this version does not know: v2's rule
            self.msc_fusion = "max"
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            out = self.predictor._run(x.detach().float().cpu().contiguous().numpy())
        except Exception as e:  # the runtimes raise their own types for a shape the graph cannot take
            raise ValueError(f"{self.predictor.path} ({self.predictor.backend}) cannot run a "
                             f"{x.shape[2]}x{x.shape[3]} input: {str(e).splitlines()[0]}; export the graph with "
                             "--dynamic for any size") from None
        return torch.from_numpy(out).float()


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "deeplab" / "onnx"


def onnx_for_weights(weights: Path) -> Path:
    """The ``--dynamic`` ONNX graph of a weights file, exported once into the cache and reused."""
    from deeplab.fileio import sha256_file
    from deeplab.weights import build_from_weights, export_onnx
    from deeplab.weights.onnx_export import onnx_metadata

    key = f"{sha256_file(weights)[:20]}-torch{torch.__version__.split('+')[0]}"
    path = _cache_dir() / f"{weights.stem}-{key}.onnx"
    if path.is_file():
        return path
    model, metadata = build_from_weights(weights, msc_scales=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, path, height=97, width=129, dynamic=True, metadata=onnx_metadata(model, metadata))
    return path


def load_backend_bundle(weights: str | os.PathLike | None, *, backend: str = "torch", model_name: str | None = None,
                        precision: str = "auto", device: str = "cpu") -> ModelBundle:
    """:func:`~deeplab.engine.segment.load_bundle` for any backend.

    Args:
        weights: weights file (``.onnx`` for the runtimes, or any weights, exported once); None:
            the packaged default model.
        backend: ``"torch"``, ``"onnxruntime"`` or ``"openvino"``.
        model_name: expected model name (checked against the metadata).
        precision: ``"auto"`` (PyTorch: bf16 where native; OpenVINO: its own choice, bf16 on CPUs
            with bf16 units; ONNX Runtime: fp32), ``"bf16"`` or ``"fp32"``.
        device: ``"cpu"`` (the runtimes run on the CPU) or ``"cuda"`` (PyTorch only).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: use one of {BACKENDS}")
    if backend == "torch":
        return load_bundle(weights, model_name=model_name, precision=precision, device=device)
    if check_device(device) != "cpu":
        raise ValueError(f"--backend {backend} runs on the CPU: drop --device {device} or use --backend torch")
    from deeplab.runtime import Predictor
    from deeplab.weights import resolve_weights

    path = resolve_weights(weights)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found: check the path given to --weights")
    graph = path if path.suffix.lower() == ".onnx" else onnx_for_weights(path)
    try:
        predictor = Predictor(graph, backend, precision="fp32" if precision == "fp32" else "auto")
    except ImportError as e:
        extra = "onnx" if backend == "onnxruntime" else "openvino"
        raise ValueError(f"--backend {backend} needs the {e.name} package: pip install 'deeplab[{extra}]'") from None
    if predictor.fixed_size is not None:
        raise ValueError(f"{graph} takes {predictor.fixed_size[0]}x{predictor.fixed_size[1]} inputs only: export it "
                         "with 'deeplab export --dynamic' so that it takes the images' own sizes")
    name = predictor.metadata.get("model")
    if model_name is not None and name not in (None, model_name):
        raise ValueError(f"{path} holds a {name!r} model, not {model_name!r}: drop --model or pass the matching weights")
    # The engine's own arithmetic around the graph (resizing, fusion, softmax) stays in fp32;
    # what the graph ran in is the runtime's choice, recorded for the printouts.
    metadata = {**predictor.metadata, "backend": backend,
                "backend_precision": "fp32" if precision == "fp32" or backend == "onnxruntime" else "runtime default"}
    return bundle_from_model(RuntimeModel(predictor), metadata, precision="fp32", optimize=False)
