"""Segmentation metrics from a confusion matrix (mIoU, pixel / mean accuracy, FWIoU).

The matrix is accumulated with one vectorised ``bincount`` per update and can be summed across
processes with :meth:`ConfusionMatrix.all_reduce`, so that distributed evaluation gives exactly
the single-process numbers (integer counts: no rounding).

Conventions (those of the DeepLab / FCN evaluation code and torchvision's references):

- Rows are ground-truth classes, columns predicted classes; pixels whose label is
  ``ignore_index`` are not counted at all.
- IoU of class c = TP / (TP + FP + FN). A class that appears neither in the ground truth nor in
  the predictions (union 0) has IoU NaN and is left out of the mean: an empty class is neither
  right nor wrong. A class predicted but absent from the ground truth has IoU 0 and counts.
- Class accuracy = TP / (number of ground-truth pixels of c); NaN (and left out of
  ``mean_acc``) for a class absent from the ground truth.
- FWIoU = sum over classes of (ground-truth pixel share) x IoU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["ConfusionMatrix", "metrics_from_matrix"]


def _as_long_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = np.ascontiguousarray(x, dtype=np.int64)
        if not x.flags.writeable:  # torch warns on read-only arrays (e.g. from PIL)
            x = x.copy()
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a numpy array or a torch tensor, got {type(x).__name__}")
    return x.reshape(-1).to(torch.int64)


class ConfusionMatrix:
    """A (num_classes x num_classes) int64 confusion matrix: rows ground truth, columns prediction.

    Args:
        num_classes: number of classes (labels 0 .. num_classes-1).
        ignore_index: ground-truth label that is excluded from every count (255 by convention).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.mat = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def reset(self) -> None:
        """Set every count back to zero."""
        self.mat.zero_()

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add the pixels of one prediction / ground-truth pair (any matching shape).

        Args:
            pred: predicted labels (integers in ``[0, num_classes)``), e.g. ``probs.argmax(1)``.
            target: ground-truth labels; pixels equal to ``ignore_index`` are skipped.

        Raises:
            ValueError: shapes differ, or a label outside ``[0, num_classes)`` (other than the
                ignore label) appears: a mismatch between the model and the data set.
        """
        if tuple(pred.shape) != tuple(target.shape):
            raise ValueError(
                f"prediction shape {tuple(pred.shape)} != ground-truth shape {tuple(target.shape)}"
            )
        p = _as_long_tensor(pred).cpu()
        t = _as_long_tensor(target).cpu()
        keep = t != self.ignore_index
        p, t = p[keep], t[keep]
        if t.numel() == 0:
            return
        n = self.num_classes
        bad_t = (t < 0) | (t >= n)
        if bool(bad_t.any()):
            vals = torch.unique(t[bad_t])[:10].tolist()
            raise ValueError(
                f"ground-truth labels {vals} are outside [0, {n}) and are not the ignore label "
                f"{self.ignore_index}: does the data set match the model's {n} classes?"
            )
        bad_p = (p < 0) | (p >= n)
        if bool(bad_p.any()):
            vals = torch.unique(p[bad_p])[:10].tolist()
            raise ValueError(f"predicted labels {vals} are outside [0, {n})")
        self.mat += torch.bincount(t * n + p, minlength=n * n).reshape(n, n)

    def merge(self, other: ConfusionMatrix) -> None:
        """Add another matrix's counts (same number of classes) to this one."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self.mat += other.mat

    def all_reduce(self) -> None:
        """Sum the matrix over every process of the default group (no-op without one).

        The counts are int64, so the sum is exact: distributed evaluation equals one process's.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        t = self.mat
        # NCCL only reduces CUDA tensors; gloo reduces CPU ones.
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        self.mat = t.cpu()

    def compute(self) -> dict[str, Any]:
        """Return the metrics (see :func:`metrics_from_matrix`)."""
        return metrics_from_matrix(self.mat)


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def metrics_from_matrix(mat: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """Metrics of a confusion matrix (rows ground truth, columns prediction).

    Returns:
        dict with ``miou``, ``pixel_acc``, ``mean_acc``, ``fwiou`` (floats in [0, 1], NaN
        with no labelled pixel), ``per_class_iou`` and ``per_class_acc`` (lists of floats, NaN
        for a class with union 0 / no ground truth), ``iou`` (alias of ``per_class_iou``),
        ``num_pixels`` (labelled pixels counted) and ``confusion_matrix`` (nested lists).
    """
    m = mat.cpu().numpy() if isinstance(mat, torch.Tensor) else np.asarray(mat)
    m = m.astype(np.float64)
    tp = np.diag(m)
    gt = m.sum(axis=1)
    pred = m.sum(axis=0)
    union = gt + pred - tp
    total = m.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    pixel_acc = float(tp.sum() / total) if total > 0 else float("nan")
    if total > 0:
        freq = gt / total
        fwiou = float(np.nansum(np.where(gt > 0, freq * iou, 0.0)))
    else:
        fwiou = float("nan")
    per_class_iou = [float(v) for v in iou]
    return {
        "miou": _nanmean(iou),
        "pixel_acc": pixel_acc,
        "mean_acc": _nanmean(acc),
        "fwiou": fwiou,
        "per_class_iou": per_class_iou,
        "iou": per_class_iou,
        "per_class_acc": [float(v) for v in acc],
        "num_pixels": int(total),
        "confusion_matrix": m.astype(np.int64).tolist(),
    }

