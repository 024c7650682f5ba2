"""Data pipeline throughput on CamVid: decoding + the paper's augmentation, and its parts.

Compares, in the same run:
1. the full training pipeline (read, check, RandomScale, pad, crop 321, flip, normalise) through
   ``build_dataloader`` with 0 workers (baseline) and with N workers;
2. RandomScale's image resize: Pillow bilinear on uint8 (used) against torch ``interpolate`` on
   float32;
3. the per-sample label check: ``np.bincount`` (used) against ``np.unique``.

Usage: python benchmarks/data_pipeline.py [--root ../shared/data/camvid_segnet] [--batches 20]
       [--workers 2] [--batch-size 10]
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from deeplab.data import build_dataset
from deeplab.data.loader import build_dataloader
from deeplab.data.transforms import build_train_transforms


def _loader_rate(ds, batch_size: int, workers: int, batches: int) -> float:
    loader = build_dataloader(ds, batch_size, shuffle=True, num_workers=workers, seed=0, drop_last=True)
    it = iter(loader)
    next(it)  # start-up (worker spawn) is not throughput
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            images, _ = next(it)
        except StopIteration:
            it = iter(loader)
            images, _ = next(it)
        n += images.shape[0]
    return n / (time.perf_counter() - t)


def _time(fn, repeat: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    default_root = Path(os.environ.get("DEEPLAB_DATA", here.parent / "shared" / "data")) / "camvid_segnet"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=default_root)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    ds = build_dataset("camvid", args.root, "train", transforms=build_train_transforms(crop_size=321))
    base = _loader_rate(ds, args.batch_size, 0, args.batches)
    cand = _loader_rate(ds, args.batch_size, args.workers, args.batches)
    print(f"pipeline  0 workers: {base:7.1f} img/s   {args.workers} workers: {cand:7.1f} img/s   ratio {cand / base:.2f}x")

    raw = build_dataset("camvid", args.root, "train")
    image, mask = raw.load(0)
    h, w = int(image.shape[0] * 1.37), int(image.shape[1] * 1.37)
    t_pil = _time(lambda: np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR)), 50)

    def _torch() -> np.ndarray:
        t = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()

    t_torch = _time(_torch, 50)
    print(f"resize    torch float: {t_torch * 1e3:6.2f} ms   Pillow uint8: {t_pil * 1e3:6.2f} ms   ratio {t_torch / t_pil:.2f}x")

    t_unique = _time(lambda: np.unique(mask), 100)
    t_bincount = _time(lambda: np.bincount(mask.ravel(), minlength=256), 100)
    print(f"labels    np.unique: {t_unique * 1e3:6.3f} ms   np.bincount: {t_bincount * 1e3:6.3f} ms   ratio {t_unique / t_bincount:.2f}x")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak RSS: main {peak:.0f} MiB, largest worker {peak_children:.0f} MiB")


if __name__ == "__main__":
    main()
