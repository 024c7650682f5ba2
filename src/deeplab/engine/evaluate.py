"""Full-resolution evaluation of a model on a data set (the paper's test protocol).

Every image is run whole (or by sliding windows), its logits upsampled bilinearly to the image
size, optionally refined by the fully connected CRF, and every labelled pixel goes into one
confusion matrix. Under ``torch.distributed`` each process evaluates a disjoint shard of the
images (no padding duplicates) and the integer matrices are summed, so the result equals a
single process's exactly.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deeplab.data.loader import iter_loader
from deeplab.engine.inference import (
    DEFAULT_MAX_PIXELS,
    Precision,
    finish_prediction,
    model_align_corners,
    predict_logits,
    prepare_model,
)
from deeplab.engine.metrics import ConfusionMatrix, metrics_from_matrix
from deeplab.fileio import atomic_open
from deeplab.models.inference import resolve_precision

__all__ = ["evaluate", "save_probs_npy", "probs_path", "crf_grid_search", "refine_grid"]


def probs_path(directory: str | Path, sample_id: str) -> Path:
    """Where ``--save-probs`` stores the probabilities of ``sample_id`` (``DIR/<id>.npy``)."""
    return Path(directory) / f"{sample_id}.npy"


def save_probs_npy(path: str | Path, probs: torch.Tensor | np.ndarray) -> None:
    """Write (C,H,W) probabilities as float16 ``.npy``, atomically (temp file + rename).

    Missing parent folders are created: ids with ``/`` (the folder data set's sub-folder
    splits) put files in sub-folders of the ``--save-probs`` folder.
    """
    arr = probs.detach().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        np.save(f, arr.astype(np.float16))


def _sample_id(dataset: Any, index: int) -> str:
    ids = getattr(dataset, "ids", None)
    return str(ids[index]) if ids is not None else f"{index:06d}"


def _shard(indices: list[int]) -> list[int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return indices[dist.get_rank() :: dist.get_world_size()]
    return indices


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _gather_lists(items: list) -> list:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return items
    out: list[list] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def _image_miou(pred: torch.Tensor, target: np.ndarray, num_classes: int, ignore: int) -> float:
    cm = ConfusionMatrix(num_classes, ignore)
    cm.update(pred, target)
    return metrics_from_matrix(cm.mat)["miou"]


class _Identity:
    """Collate for batch size 1 that keeps numpy samples as they are."""

    def __call__(self, batch: list) -> Any:
        return batch[0]


def evaluate(
    model: nn.Module,
    dataset: Any,
    *,
    normalization: dict,
    msc_scales: Sequence[float] | None = None,
    flip: bool = False,
    precision: Precision = "auto",
    sliding_window: int | None = None,
    overlap: float = 1 / 3,
    crf: Callable[[np.ndarray, torch.Tensor], torch.Tensor] | None = None,
    save_probs: str | Path | None = None,
    limit: int | None = None,
    device: str | torch.device = "cpu",
    optimize: bool = True,
    num_workers: int = 0,
    keep_examples: int = 0,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool = False,
    notice: Callable[[str], None] | None = None,
    input_scale: float = 1.0,
    msc_fusion: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on every (image, mask) pair of ``dataset`` at full resolution.

    Args:
        model: a segmentation model (``deeplab.models.build_model``); see ``optimize``.
        dataset: un-transformed data set: ``ds[i]`` -> (uint8 (H,W,3) RGB, uint8 (H,W) mask),
            with ``num_classes``, ``ignore_index`` and ``ids`` (as from
            ``deeplab.data.build_dataset`` without transforms).
        normalization: the model's normalisation spec.
        msc_scales: extra input scales fused with scale 1 (e.g. ``(0.5, 0.75)``).
        flip: average with the mirrored image's logits.
        msc_fusion: ``"max"`` or ``"mean"`` over the scales; None: the model's own (v1 / v2:
            max, v3 / v3+: mean).
        precision: network precision, ``"auto"`` (default: bf16 where ``device`` computes it
            natively, else fp32), ``"bf16"`` or ``"fp32"``; softmax is always fp32. The result's
            ``precision`` says which ran.
        sliding_window: window size for large images (None: whole images).
        overlap: fraction of a window shared with its neighbour.
        crf: a ``deeplab.crf.DenseCRF`` (or any ``(image, probs) -> probs``) applied before the
            argmax; None to skip.
        save_probs: folder for float16 ``<id>.npy`` (C,H,W) probabilities *before* the CRF
            (the CRF itself reads these float16 values, so that ``deeplab crf`` on the saved
            files gives the same pixels).
        limit: evaluate only the first ``limit`` images.
        device: where the model runs.
        optimize: prepare the model with ``prepare_model`` (eval mode, BN folding,
            channels-last); False to run it as given (it must be in eval mode).
        num_workers: DataLoader workers decoding images.
        keep_examples: keep the predictions of this many best and worst images (by per-image
            mIoU) under ``"examples"`` (for the HTML report).
        max_pixels: inference size cap (see ``predict_probs``).
        progress: show a progress bar (on the main process only).
        notice: receives notices (e.g. a downscaled image); default ``warnings.warn``.
        input_scale: the network sees each image resized by this factor (see ``predict_probs``).

    Returns:
        The metrics of :func:`deeplab.engine.metrics.metrics_from_matrix` plus ``num_images``,
        ``seconds``, ``images_per_s``, ``precision`` (the one that ran), ``per_image`` (list of
        ``{"id", "miou", "pixel_acc"}``) and, with ``keep_examples``, ``examples``:
        ``{"best": [...], "worst": [...]}`` of ``{"index", "id", "miou", "pred"}`` (pred a uint8
        (H,W) array).
    """
    num_classes = int(dataset.num_classes)
    ignore = int(getattr(dataset, "ignore_index", 255))
    model_classes = getattr(model, "num_classes", None)
    if model_classes is not None and int(model_classes) != num_classes:
        raise ValueError(
            f"the model predicts {model_classes} classes but the data set has {num_classes}: "
            "use weights trained on this data set"
        )
    precision = resolve_precision(precision, device)
    if optimize:
        model = prepare_model(model, precision=precision, device=device)
    elif model.training:
        raise ValueError("the model is in training mode: pass optimize=True or call model.eval()")

    n = len(dataset)
    indices = list(range(n if limit is None else min(n, int(limit))))
    local = _shard(indices)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, local),
        batch_size=1,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_Identity(),
    )
    cm = ConfusionMatrix(num_classes, ignore)
    per_image: list[dict[str, Any]] = []
    best: list[tuple[float, int, dict]] = []  # min-heap of the best k
    worst: list[tuple[float, int, dict]] = []  # min-heap on -miou: the worst k
    # Worker errors (a bad sample) keep their own one-paragraph message.
    it: Any = iter_loader(loader)
    bar = None
    if progress and _is_main():
        from tqdm import tqdm

        # Updated by hand after each image: a tqdm wrapped around the loader inside
        # zip(local, ...) was never asked for the item after the last and stopped at N-1 of N.
        bar = tqdm(total=len(local), desc="eval", unit="img")
    t0 = time.perf_counter()
    for index, (image, mask) in zip(local, it):
        image = np.asarray(image)
        mask = np.asarray(mask)
        if image.shape[:2] != mask.shape[:2]:
            raise ValueError(
                f"image {_sample_id(dataset, index)!r} is {image.shape[1]}x{image.shape[0]} but "
                f"its mask is {mask.shape[1]}x{mask.shape[0]}"
            )
        logits = predict_logits(
            model,
            image,
            normalization=normalization,
            msc_scales=msc_scales,
            flip=flip,
            precision=precision,
            sliding_window=sliding_window,
            overlap=overlap,
            max_pixels=max_pixels,
            notice=notice,
            input_scale=input_scale,
            msc_fusion=msc_fusion,
        )
        sid = _sample_id(dataset, index)
        pred, probs = finish_prediction(logits, image, crf=crf, want_probs=save_probs is not None,
                                        align_corners=model_align_corners(model))
        if save_probs is not None:
            save_probs_npy(probs_path(save_probs, sid), probs)
        one = ConfusionMatrix(num_classes, ignore)
        one.update(pred, mask)
        cm.merge(one)
        m = metrics_from_matrix(one.mat)
        per_image.append({"id": sid, "miou": m["miou"], "pixel_acc": m["pixel_acc"]})
        if keep_examples > 0 and not np.isnan(m["miou"]):
            ex = {"index": index, "id": sid, "miou": m["miou"], "pred": pred.numpy().astype(np.uint8)}
            for heap, key in ((best, m["miou"]), (worst, -m["miou"])):
                item = (key, -index, ex)
                if len(heap) < keep_examples:
                    heapq.heappush(heap, item)
                elif item[:2] > heap[0][:2]:
                    heapq.heapreplace(heap, item)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    cm.all_reduce()  # also waits for the slowest process: the time below is the whole run's
    seconds = time.perf_counter() - t0
    result = metrics_from_matrix(cm.mat)
    per_image = _gather_lists(per_image)
    per_image.sort(key=lambda r: r["id"])
    result.update(
        num_images=len(per_image),
        seconds=seconds,
        images_per_s=len(per_image) / seconds if seconds > 0 else float("nan"),
        precision=precision,
        per_image=per_image,
    )
    if keep_examples > 0:
        bests = _gather_lists([e for _, _, e in best])
        worsts = _gather_lists([e for _, _, e in worst])
        result["examples"] = {
            "best": sorted(bests, key=lambda e: (-e["miou"], e["index"]))[:keep_examples],
            "worst": sorted(worsts, key=lambda e: (e["miou"], e["index"]))[:keep_examples],
        }
    return result


# --------------------------------------------------------------------------- CRF parameter search


def _grid_values(center: float, step: float) -> list[float]:
    return [v for v in (center - step / 2, center, center + step / 2) if v > 0]


def crf_grid_search(
    samples: Sequence[tuple[np.ndarray, Any, np.ndarray]],
    num_classes: int,
    *,
    bi_w: Sequence[float],
    bi_xy_std: Sequence[float],
    bi_rgb_std: Sequence[float],
    pos_w: float = 3.0,
    pos_xy_std: float = 3.0,
    iterations: int = 10,
    clip: float = 1e-5,
    ignore_index: int = 255,
    skip: set[tuple[float, float, float]] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> list[dict[str, Any]]:
    """mIoU of every (bi_w, bi_xy_std, bi_rgb_std) setting of the dense CRF on ``samples``.

    The probabilities are computed once by the caller and only the CRF runs per setting. The
    result of each setting equals ``DenseCRF(bi_w, bi_xy_std, bi_rgb_std, pos_w, pos_xy_std,
    iterations, clip)(image, probs).argmax(0)``; the work is shared where the CRF allows it:
    the unary and the smoothness kernel once per image, the bilateral lattice once per
    (bi_xy_std, bi_rgb_std) for all bi_w.

    Args:
        samples: (uint8 (H,W,3) image, (C,H,W) probabilities (numpy or tensor, any float),
            uint8 (H,W) ground truth) triples; iterated once.
        num_classes: number of classes.
        bi_w, bi_xy_std, bi_rgb_std: the grid's values of each parameter.
        pos_w, pos_xy_std, iterations, clip: the fixed ``DenseCRF`` parameters (the paper: 3, 3, 10).
        ignore_index: ground-truth label left out of the counts.
        skip: settings already measured (left out).
        device: where the CRF runs.
        progress: show a progress bar over the images.

    Returns:
        One dict per setting: ``bi_w``, ``bi_xy_std``, ``bi_rgb_std``, ``miou``, ``pixel_acc``.
    """
    from deeplab.crf import DenseKernel, bilateral_features, gaussian_features, mean_field

    skip = skip or set()
    pairs = [(xy, rgb) for xy in bi_xy_std for rgb in bi_rgb_std]
    settings = [(w, xy, rgb) for xy, rgb in pairs for w in bi_w if (w, xy, rgb) not in skip]
    cms = {s: ConfusionMatrix(num_classes, ignore_index) for s in settings}
    if not settings:
        return []
    it: Any = samples
    if progress:
        from tqdm import tqdm

        it = tqdm(samples, desc="crf-search", unit="img")
    for image, probs, mask in it:
        p = torch.as_tensor(np.asarray(probs) if not isinstance(probs, torch.Tensor) else probs)
        p = p.to(device=device, dtype=torch.float32)
        c, h, w_ = p.shape
        img = torch.from_numpy(np.ascontiguousarray(image)).to(device)[None]
        # Same unary as DenseCRF.__call__: -log of the clipped probabilities.
        unary = -torch.log(p.clamp(clip, 1.0)).permute(1, 2, 0).reshape(h * w_, c)
        # fp16 lattices, as DenseCRF's default, so the search scores what `eval --crf` runs.
        smooth = DenseKernel(gaussian_features(1, h, w_, pos_xy_std, device=p.device), fp16=True)
        for xy, rgb in pairs:
            todo = [wt for wt in bi_w if (wt, xy, rgb) in cms]
            if not todo:
                continue
            bilateral = DenseKernel(bilateral_features(img, xy, rgb), fp16=True)
            for wt in todo:
                q = mean_field(unary, [smooth, bilateral], [pos_w, wt], iterations)
                cms[(wt, xy, rgb)].update(q.argmax(1).reshape(h, w_).cpu(), mask)
    out = []
    for (wt, xy, rgb), cm in cms.items():
        m = cm.compute()
        out.append({"bi_w": wt, "bi_xy_std": xy, "bi_rgb_std": rgb, "miou": m["miou"],
                    "pixel_acc": m["pixel_acc"]})
    return out


def refine_grid(best: dict[str, float], steps: dict[str, float]) -> dict[str, list[float]]:
    """The fine round of the coarse-to-fine search: half the coarse step around ``best``."""
    return {k: _grid_values(best[k], steps[k]) for k in ("bi_w", "bi_xy_std", "bi_rgb_std")}
