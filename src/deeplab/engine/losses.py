"""Segmentation losses: pixel-wise cross-entropy at the logits' resolution and the MSC 4-term loss.

DeepLab computes the loss on the stride-8 logits, not on upsampled ones: the labels are shrunk
to each logits' size by nearest neighbour (Caffe's label ``Interp`` / kazuto1011's
``resize_labels``), so no label value is ever invented, and pixels labelled ``ignore_index``
(255) do not count. With multi-scale inputs (MSC) the training loss is the sum of the
cross-entropies of the scale-1 logits, of each extra scale's logits and of the max-fused logits
(4 terms for scales 1, 0.75, 0.5).

``lovasz_softmax`` is not in the paper: Berman et al.'s convex surrogate of the per-class
Jaccard loss (CVPR 2018), an optional extra term of the training loss (``solver.lovasz_weight``)
that optimises mean IoU, the metric small classes decide, rather than pixel accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["cross_entropy_sum", "lovasz_softmax", "msc_cross_entropy", "resize_labels", "valid_weight"]


def resize_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize integer label maps by nearest neighbour, vectorised over the batch.

    Args:
        labels: (B, H, W) integer labels (any integer dtype; 255 = ignore survives unchanged).
        size: target (h, w).

    Returns:
        (B, h, w) int64 labels. Output pixel ``(i, j)`` takes input pixel
        ``(floor(i * H / h), floor(j * W / w))``, PyTorch's "nearest" rule.
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must be (B, H, W), got shape {tuple(labels.shape)}")
    size = (int(size[0]), int(size[1]))
    if tuple(labels.shape[-2:]) == size:
        return labels.long()
    # Label ids <= 255 are exact in float32; "nearest" copies values, it never blends them.
    out = F.interpolate(labels[:, None].float(), size=size, mode="nearest")
    return out[:, 0].long()


def _as_list(outputs: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    outputs = list(outputs)
    if not outputs:
        raise ValueError("no logits given")
    return outputs


def cross_entropy_sum(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = 255,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over valid pixels of the (class-weighted) cross-entropy, computed in fp32.

    Args:
        logits: (B, C, h, w) at any precision (autocast output is cast to fp32 first).
        labels: (B, H, W) labels, resized to (h, w) by nearest neighbour if needed.
        ignore_index: label that contributes nothing.
        weight: optional (C,) class weights (pixel i counts ``weight[label_i]`` times).
    """
    labels = resize_labels(labels, logits.shape[-2:]).to(logits.device)
    return F.cross_entropy(logits.float(), labels, weight=weight, ignore_index=ignore_index, reduction="sum")


def valid_weight(
    labels: torch.Tensor,
    size: Sequence[int],
    *,
    ignore_index: int = 255,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The normaliser of a mean cross-entropy: number (or class-weight sum) of valid pixels at ``size``.

    Args:
        labels: (B, H, W) labels.
        size: the logits' (h, w) the labels are resized to.
        ignore_index: label that is not counted.
        weight: optional (C,) class weights: the normaliser is then the sum of the valid pixels'
            weights, as ``F.cross_entropy(reduction="mean")`` computes it.

    Returns:
        A float64 scalar tensor.
    """
    lab = resize_labels(labels, size)
    valid = lab != ignore_index
    if weight is None:
        return valid.sum().to(torch.float64)
    w = weight.to(device=lab.device, dtype=torch.float64)
    return w[lab[valid]].sum()


def msc_cross_entropy(
    outputs: torch.Tensor | Sequence[torch.Tensor],
    labels: torch.Tensor,
    *,
    ignore_index: int = 255,
    weight: torch.Tensor | None = None,
    normalizers: Sequence[float | torch.Tensor] | None = None,
) -> torch.Tensor:
    """The DeepLab training loss: the sum over logits maps of each one's mean cross-entropy.

    Args:
        outputs: one (B, C, h, w) logits tensor, or the MSC model's training output (the logits
            of each scale, then the fused logits): 4 terms for scales (1, 0.75, 0.5).
        labels: (B, H, W) labels at the input's resolution; resized to each map by nearest neighbour.
        ignore_index: label excluded from the loss.
        weight: optional (C,) class weights.
        normalizers: one divisor per term; ``None`` = each term's own valid pixel count (or class
            weight sum), i.e. PyTorch's / Caffe's per-batch mean. The trainer passes the counts of
            the whole global batch (every process, every ``iter_size`` pass) so that the gradient
            does not depend on how the batch was split.

    Returns:
        A scalar fp32 tensor. A term with no valid pixel contributes 0.
    """
    maps = _as_list(outputs)
    if normalizers is not None and len(normalizers) != len(maps):
        raise ValueError(f"{len(normalizers)} normalizers for {len(maps)} logits maps")
    total = maps[0].new_zeros((), dtype=torch.float32)
    for i, logits in enumerate(maps):
        s = cross_entropy_sum(logits, labels, ignore_index=ignore_index, weight=weight)
        if normalizers is None:
            n = valid_weight(labels, logits.shape[-2:], ignore_index=ignore_index, weight=weight)
        else:
            n = normalizers[i]
        n = float(n)
        if n > 0:
            total = total + s / n
    return total


def lovasz_softmax(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = 255) -> torch.Tensor:
    """The Lovasz-softmax loss (Berman et al. 2018): mean over present classes of the Lovasz
    extension of the Jaccard loss ``1 - IoU_c``, applied to the errors ``|[y = c] - p_c|``.

    Written here because no library among the project's dependencies provides it (the ones that
    do pull in torchvision). At one-hot probabilities it equals ``1 - IoU_c`` exactly; in
    between it is the piecewise-linear interpolation of that set function, so it is convex in
    the errors and has a gradient everywhere but at ties.

    Args:
        logits: (B, C, h, w) at any precision (computed in fp32, or in float64 if given).
        labels: (B, H, W) labels, resized to (h, w) by nearest neighbour if needed.
        ignore_index: label that does not count.

    Returns:
        A scalar tensor: the mean over the classes that occur among the valid labels of the
        whole batch (Berman et al.'s "present" classes); 0 when no pixel is valid.
    """
    labels = resize_labels(labels, logits.shape[-2:]).to(logits.device)
    num_classes = logits.shape[1]
    dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16 autocast output -> fp32
    probs = logits.to(dtype).softmax(1).permute(1, 0, 2, 3).reshape(num_classes, -1)  # (C, P)
    labels = labels.reshape(-1)
    valid = labels != ignore_index
    probs, labels = probs[:, valid], labels[valid]
    fg = labels[None, :] == torch.arange(num_classes, device=labels.device)[:, None]  # (C, P)
    present = fg.any(1)
    if not bool(present.any()):
        return logits.to(dtype).sum() * 0.0  # keeps the graph: backward() still works
    probs, fg = probs[present], fg[present].to(dtype)
    errors = (fg - probs).abs()
    # Sorting detaches the order, not the values: the loss is linear in the sorted errors with
    # the Jaccard loss's increments along that order as coefficients.
    errors_sorted, order = torch.sort(errors, dim=1, descending=True)
    fg_sorted = fg.gather(1, order)
    gts = fg_sorted.sum(1, keepdim=True)
    intersection = gts - fg_sorted.cumsum(1)
    union = gts + (1.0 - fg_sorted).cumsum(1)
    jaccard = 1.0 - intersection / union  # the Jaccard loss of the first k errors, k = 1..P
    increments = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)
    return (errors_sorted * increments).sum(1).mean()
