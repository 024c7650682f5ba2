"""DeepLab v1/v2 (Chen et al., arXiv 1606.00915), v3 (1706.05587) and v3+ (1802.02611) semantic segmentation.

Sub-packages: ``models`` (atrous backbones, ASPP, multi-scale inputs), ``crf`` (the fully
connected CRF), ``data`` (data sets and joint transforms), ``weights`` (safetensors, Caffe and
foreign checkpoints), ``engine`` (training, evaluation, inference) and ``cli``.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__", "segment"]


def __getattr__(name: str):
    # Lazy so that `import deeplab` stays cheap and the one-way import order
    # (cli -> engine -> models/data/crf/weights) holds.
    if name == "segment":
        from deeplab.engine.segment import segment

        return segment
    raise AttributeError(f"module 'deeplab' has no attribute {name!r}")
