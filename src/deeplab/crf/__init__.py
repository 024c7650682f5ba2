"""The fully connected CRF (Krähenbühl & Koltun 2011) on a permutohedral lattice, in PyTorch.

``DenseCRF(...)(image, probs)`` refines softmax probabilities exactly as pydensecrf's
``DenseCRF2D`` does (same lattice arithmetic), on CPU or GPU, batched and differentiable.
"""

from __future__ import annotations

from deeplab.crf.dense_crf import DenseCRF, DenseKernel, bilateral_features, gaussian_features, mean_field
from deeplab.crf.lattice import PermutohedralLattice

__all__ = [
    "DenseCRF",
    "DenseKernel",
    "PermutohedralLattice",
    "bilateral_features",
    "gaussian_features",
    "mean_field",
]
