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

__all__ = ["LOVASZ_BINS", "cross_entropy_sum", "lovasz_softmax", "msc_cross_entropy", "resize_labels", "valid_weight"]


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


#: ``lovasz_softmax``'s default bucket count: its value lies within 1/65536 of the exact loss.
LOVASZ_BINS = 1 << 16


def lovasz_softmax(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = 255,
                   bins: int | None = LOVASZ_BINS) -> torch.Tensor:
    """The Lovasz-softmax loss (Berman et al. 2018): mean over present classes of the Lovasz
    extension of the Jaccard loss ``1 - IoU_c``, applied to the errors ``|[y = c] - p_c|``.

    Written here because no library among the project's dependencies provides it (the ones that
    do pull in torchvision). At one-hot probabilities it equals ``1 - IoU_c`` exactly; in
    between it is the piecewise-linear interpolation of that set function, so it is convex in
    the errors and has a gradient everywhere but at ties.

    The exact loss (``bins=None``) sorts each class's errors; at a training batch (8 crops of
    321x321, 11 classes) that sort is most of the step's loss cost on a CPU. ``bins=K``
    instead buckets the errors, which lie in [0, 1], into K equal intervals and counts
    foreground and background pixels per bucket (linear time, no sort): the Jaccard loss is
    exact at every bucket boundary, each pixel's gradient is its share of its bucket's
    increment, and since a class's increments are non-negative and sum to at most 1, the
    value lies within ``1 / K`` of the exact loss. Buckets holding one pixel each give the
    exact gradient too.

    Args:
        logits: (B, C, h, w) at any precision (computed in fp32, or in float64 if given).
        labels: (B, H, W) labels, resized to (h, w) by nearest neighbour if needed.
        ignore_index: label that does not count.
        bins: bucket count (see above), or None to sort.

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
    probs, fg = probs[present], fg[present]
    fg_float = fg.to(dtype)
    errors = (fg_float - probs).abs()
    if bins is None:
        return _lovasz_sorted(errors, fg_float)
    return _lovasz_binned(errors, fg, bins)


def _lovasz_sorted(errors: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
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


def _lovasz_binned(errors: torch.Tensor, fg: torch.Tensor, bins: int) -> torch.Tensor:
    num_classes = errors.shape[0]
    # Bucket 0 holds the largest errors, so cumulative counts follow the descending order; one
    # key per (class, bucket, foreground?) lets one bincount and one gather do all the work.
    bucket = bins - 1 - (errors.detach() * bins).long().clamp_(0, bins - 1)
    key = (bucket + torch.arange(num_classes, device=errors.device)[:, None] * bins) * 2 + fg
    counts = torch.bincount(key.reshape(-1), minlength=num_classes * bins * 2).view(num_classes, bins, 2)
    # Counts reach B*H*W; float64 keeps the Jaccard differences exact enough.
    n_bg, n_fg = counts.double().unbind(-1)
    seen_fg, seen_bg = n_fg.cumsum(1), n_bg.cumsum(1)
    gts = seen_fg[:, -1:]
    jaccard = 1.0 - (gts - seen_fg) / (gts + seen_bg)  # after each bucket
    increments = torch.diff(jaccard, dim=1, prepend=torch.zeros_like(gts))
    # A bucket's increment split between its foreground and background pixels as the Jaccard
    # loss's partial derivatives at the bucket's midpoint weigh them (a foreground error adds
    # 1 / union, a background one intersection / union^2): one mean for both would blur the
    # gradient, as the two differ by the factor intersection / union.
    mid_fg, mid_bg = seen_fg - n_fg / 2, seen_bg - n_bg / 2
    share_fg = n_fg / (gts + mid_bg)
    share_bg = n_bg * (gts - mid_fg) / (gts + mid_bg) ** 2
    scale = increments / (share_fg + share_bg).clamp(min=1e-300)
    per_pixel = torch.stack([share_bg * scale / n_bg.clamp(min=1), share_fg * scale / n_fg.clamp(min=1)], -1)
    return (errors * per_pixel.to(errors.dtype).reshape(-1)[key]).sum(1).mean()
