#!/usr/bin/env python3
"""The mIoU ceiling an output stride sets on a data set (maintainers).

DeepLab predicts one logits vector per ``S x S`` cell and upsamples the map bilinearly to the
image, so an object thinner than a cell (a pole at 480x360) cannot come out whole, however good
the network. This script measures that ceiling from the labels alone: the "perfect" map at
stride S holds each class's share of each cell's labelled pixels (the one-hot labels averaged
over the cell), upsampled bilinearly like the network's logits (pixel centres,
``align_corners=False``) and arg-maxed. The per-class IoU of that prediction says how much of a
class the stride leaves reachable; it depends on the stride and the image size, not on a model.

Example:
  python scripts/stride_ceiling.py --dataset camvid --data-root ../shared/data/camvid_segnet \\
      --split val --strides 4,8,16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from deeplab.data import build_dataset
from deeplab.engine.metrics import ConfusionMatrix, metrics_from_matrix


def ceiling_prediction(mask: np.ndarray, stride: int, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """The labels a stride-``stride`` map of per-cell class shares gives after bilinear upsampling.

    Args:
        mask: (H, W) integer labels; ``ignore_index`` marks unlabelled pixels.
        stride: the cell size in pixels (the output stride; 1 gives back the labels).
        num_classes: number of classes (labels ``0 .. num_classes - 1``).
        ignore_index: the unlabelled value; such pixels count in no class's share.

    Returns:
        (H, W) int64 predicted labels.
    """
    m = torch.from_numpy(np.asarray(mask).astype(np.int64))
    h, w = m.shape
    valid = m != ignore_index
    if bool((m[valid] >= num_classes).any()) or bool((m[valid] < 0).any()):
        raise ValueError(f"labels outside 0..{num_classes - 1} (other than {ignore_index})")
    one_hot = F.one_hot(torch.where(valid, m, 0), num_classes).permute(2, 0, 1).float() * valid
    # Pad to whole cells (the padding is unlabelled, like the network's bottom/right padding).
    ph, pw = -(-h // stride) * stride, -(-w // stride) * stride
    one_hot = F.pad(one_hot, (0, pw - w, 0, ph - h))
    shares = F.avg_pool2d(one_hot[None], stride)
    up = F.interpolate(shares, size=(ph, pw), mode="bilinear", align_corners=False)[0, :, :h, :w]
    return up.argmax(0).numpy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument("--split", default="val")
    parser.add_argument("--strides", default="4,8,16", help="comma-separated output strides")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images of the split")
    parser.add_argument("--json", type=Path, default=None, help="write the table as JSON")
    args = parser.parse_args()

    strides = [int(s) for s in args.strides.split(",")]
    if any(s < 1 for s in strides):
        raise SystemExit(f"error: --strides must be positive integers, got {args.strides}")
    dataset = build_dataset(args.dataset, args.data_root, args.split)
    num_classes, ignore = int(dataset.num_classes), int(dataset.ignore_index)
    matrices = {s: ConfusionMatrix(num_classes, ignore_index=ignore) for s in strides}
    count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    for index in range(count):
        mask = dataset.load_mask(index)
        for s in strides:
            matrices[s].update(ceiling_prediction(mask, s, num_classes, ignore), mask)
    names = list(dataset.class_names)
    rows = []
    for s in strides:
        m = metrics_from_matrix(matrices[s].mat)
        rows.append({"stride": s, "miou": m["miou"], "per_class_iou": dict(zip(names, m["per_class_iou"]))})
    print(f"mIoU ceiling of per-cell class shares, bilinear upsampling: {args.dataset} {args.split}, "
          f"first {count} images")
    print(f"{'stride':>6} {'mIoU':>6} " + " ".join(f"{n[:8]:>8}" for n in names))
    for r in rows:
        print(f"{r['stride']:>6} {100 * r['miou']:>6.2f} "
              + " ".join(f"{100 * v:>8.2f}" for v in r["per_class_iou"].values()))
    if args.json:
        args.json.write_text(json.dumps({"split": args.split, "images": count, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
