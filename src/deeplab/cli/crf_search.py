"""Search the CRF parameters on validation images (the paper's coarse-to-fine protocol).

The paper fixes pos_w = 3, pos_xy_std = 3 and cross-validates bi_w in 3:6, bi_xy_std in
30:10:100 and bi_rgb_std in 3:6 (MATLAB start:step:stop) on 100 val images, then refines
with half the step around the best setting. The network runs once: probabilities come from
--probs DIR (written by 'deeplab eval --save-probs DIR') or are computed once and kept in
memory; only the CRF runs for each setting. Prints a table (best first) and the best setting.

Examples:
  deeplab eval --dataset camvid --data-root data/CamVid --split val --limit 100 --save-probs probs/
  deeplab crf-search --dataset camvid --data-root data/CamVid --split val --probs probs/ --limit 100
  deeplab crf-search --dataset camvid --data-root data/CamVid --limit 20 \\
      --bi-w 3,5 --bi-xy-std 30:20:90 --bi-rgb-std 3,5 --no-refine --json crf.json
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from deeplab.cli.common import (
    add_backend_argument,
    add_input_scale_argument,
    add_msc_arguments,
    add_precision_argument,
    check_output_file,
    report_error,
)


def parse_range(text: str) -> list[float]:
    """``"3:1:6"`` (MATLAB start:step:stop) or ``"3,4.5,6"`` -> list of positive floats."""
    try:
        if ":" in text:
            parts = [float(x) for x in text.split(":")]
            if len(parts) == 2:
                parts = [parts[0], 1.0, parts[1]]
            if len(parts) != 3 or parts[1] <= 0 or parts[2] < parts[0]:
                raise ValueError
            start, step, stop = parts
            n = int(math.floor((stop - start) / step + 1e-9)) + 1
            values = [round(start + i * step, 6) for i in range(n)]
        else:
            values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected start:step:stop (e.g. 30:10:100) or a list (e.g. 3,4,5)"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: values must be positive")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="data set name")
    parser.add_argument("--data-root", required=True, type=Path, help="the data set's root folder")
    parser.add_argument("--split", default="val", help="split holding the images to search on")
    parser.add_argument("--limit", type=int, default=100, help="first N images of the split (the paper: 100)")
    parser.add_argument("--probs", type=Path, default=None, metavar="DIR",
                        help="probabilities saved by 'deeplab eval --save-probs DIR'; without it they are computed once")
    parser.add_argument("--weights", type=Path, default=None,
                        help="weights used when --probs is not given; without it, the packaged model")
    parser.add_argument("--model", default=None, help="expected model name (checked against the weights)")
    add_msc_arguments(parser)
    add_input_scale_argument(parser)
    parser.add_argument("--flip", action="store_true", help="flip averaging when computing probabilities")
    add_precision_argument(parser)
    add_backend_argument(parser)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (network and CRF)")
    parser.add_argument("--bi-w", type=parse_range, default="3:1:6",
                        metavar="RANGE", help="bilateral weight w1 values: start:step:stop or a list")
    parser.add_argument("--bi-xy-std", type=parse_range, default="30:10:100",
                        metavar="RANGE", help="bilateral spatial std values")
    parser.add_argument("--bi-rgb-std", type=parse_range, default="3:1:6",
                        metavar="RANGE", help="bilateral colour std values")
    parser.add_argument("--pos-w", type=float, default=3.0, help="smoothness weight w2 (fixed)")
    parser.add_argument("--pos-xy-std", type=float, default=3.0, help="smoothness std (fixed)")
    parser.add_argument("--iterations", type=int, default=10, help="mean-field iterations")
    parser.add_argument("--no-refine", action="store_true", help="skip the fine round")
    parser.add_argument("--top", type=int, default=15, help="rows of the table to print")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT.json", help="write every setting's mIoU")


def _step(values: list[float]) -> float:
    if len(values) < 2:
        return values[0] / 2
    return min(b - a for a, b in zip(sorted(values), sorted(values)[1:]))


class _SavedProbs:
    """(image, probs, mask) of the first ``n`` samples, probabilities read from ``DIR/<id>.npy``."""

    def __init__(self, dataset, directory: Path, n: int) -> None:
        from deeplab.engine.evaluate import probs_path

        self.dataset, self.n = dataset, n
        self.paths = [probs_path(directory, dataset.ids[i]) for i in range(n)]
        missing = [p for p in self.paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} probability file(s) missing in {directory}, e.g. {missing[0]}: "
                "write them with 'deeplab eval ... --save-probs DIR' on the same split and --limit"
            )

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        import numpy as np

        for i, path in enumerate(self.paths):
            image, mask = self.dataset[i]
            probs = np.load(path, allow_pickle=False)
            c = self.dataset.num_classes
            if probs.shape != (c, *np.asarray(mask).shape):
                raise ValueError(
                    f"{path}: probabilities of shape {probs.shape} do not fit the image's "
                    f"{(c, *np.asarray(mask).shape)}: were they saved from this split?"
                )
            yield image, probs, mask


def run(args: argparse.Namespace) -> int:
    if args.limit < 1:
        return report_error(f"--limit must be >= 1, got {args.limit}")
    if args.iterations < 0:
        return report_error(f"--iterations must be >= 0, got {args.iterations}")
    if args.probs is not None and not args.probs.is_dir():
        return report_error(f"--probs {args.probs}: no such folder (write it with 'deeplab eval --save-probs')")
    if args.json is not None:
        reason = check_output_file(args.json)  # before the search: its results must not be lost
        if reason:
            return report_error(f"--json: {reason}")

    import numpy as np
    import torch

    from deeplab.data import build_dataset
    from deeplab.engine.evaluate import crf_grid_search, refine_grid
    from deeplab.engine.segment import check_device

    try:
        device = check_device(args.device)
        dataset = build_dataset(args.dataset, args.data_root, args.split)
    except (ValueError, FileNotFoundError, OSError) as e:
        return report_error(str(e))
    n = min(args.limit, len(dataset))
    if n == 0:
        return report_error(f"split {args.split!r} of {args.dataset} holds no images")

    if args.probs is not None:
        try:
            samples = _SavedProbs(dataset, args.probs, n)
            # Fail on a wrong folder before the long search.
            next(iter(_SavedProbs(dataset, args.probs, 1)))
        except (FileNotFoundError, ValueError) as e:
            return report_error(str(e))
        source = str(args.probs)
    else:
        from deeplab.engine.inference import predict_probs
        from deeplab.engine.backends import load_backend_bundle

        try:
            bundle = load_backend_bundle(args.weights, backend=args.backend, model_name=args.model,
                                         precision=args.precision, device=device)
        except (FileNotFoundError, ValueError) as e:
            return report_error(str(e))
        if bundle.num_classes != dataset.num_classes:
            return report_error(f"the model predicts {bundle.num_classes} classes but {args.dataset} "
                                f"has {dataset.num_classes}")
        from tqdm import tqdm

        samples = []
        # Computed once, held as float16: every CRF setting reuses them.
        try:
            for i in tqdm(range(n), desc="probabilities", unit="img", file=sys.stderr):
                image, mask = dataset[i]
                probs = predict_probs(bundle.model, image, normalization=bundle.normalization,
                                      msc_scales=args.msc, msc_fusion=args.msc_fusion, flip=args.flip, precision=bundle.precision,
                                      input_scale=bundle.scale_for(args.input_scale))
                samples.append((image, probs[0].to(torch.float16).cpu(), mask))
        except ValueError as e:  # a bad sample (size mismatch, labels out of range, unreadable file)
            return report_error(str(e))
        source = f"computed with {bundle.name} ({args.weights or 'default weights'})"

    fixed = dict(pos_w=args.pos_w, pos_xy_std=args.pos_xy_std, iterations=args.iterations)
    grid = {"bi_w": args.bi_w, "bi_xy_std": args.bi_xy_std, "bi_rgb_std": args.bi_rgb_std}
    num_settings = len(args.bi_w) * len(args.bi_xy_std) * len(args.bi_rgb_std)
    print(f"coarse round: {num_settings} settings on {n} images", file=sys.stderr)
    try:
        rows = crf_grid_search(samples, dataset.num_classes, **grid, **fixed, device=device,
                               progress=True)
        for r in rows:
            r["round"] = "coarse"
        if not args.no_refine:
            best = max(rows, key=lambda r: r["miou"])
            steps = {k: _step(v) for k, v in grid.items()}
            fine = refine_grid(best, steps)
            done = {(r["bi_w"], r["bi_xy_std"], r["bi_rgb_std"]) for r in rows}
            print(f"fine round around bi_w={best['bi_w']:g}, bi_xy_std={best['bi_xy_std']:g}, "
                  f"bi_rgb_std={best['bi_rgb_std']:g}", file=sys.stderr)
            extra = crf_grid_search(samples, dataset.num_classes, **fine, **fixed, skip=done,
                                    device=device, progress=True)
            for r in extra:
                r["round"] = "fine"
            rows += extra
    except ValueError as e:
        return report_error(str(e))

    # The no-CRF baseline, for comparison.
    from deeplab.engine.metrics import ConfusionMatrix

    base = ConfusionMatrix(dataset.num_classes, dataset.ignore_index)
    for _, probs, mask in samples:
        base.update(torch.as_tensor(np.asarray(probs, dtype=np.float32)).argmax(0), mask)
    base_miou = base.compute()["miou"]

    rows.sort(key=lambda r: -r["miou"])
    print(f"{'bi_w':>6} {'bi_xy_std':>9} {'bi_rgb_std':>10} {'mIoU %':>7} {'pix acc %':>9}  round")
    for r in rows[: args.top]:
        print(f"{r['bi_w']:6g} {r['bi_xy_std']:9g} {r['bi_rgb_std']:10g} {100 * r['miou']:7.2f} "
              f"{100 * r['pixel_acc']:9.2f}  {r['round']}")
    best = rows[0]
    print(f"without CRF: mIoU {100 * base_miou:.2f}%")
    print(f"best: --crf-params bi_w={best['bi_w']:g},bi_xy_std={best['bi_xy_std']:g},"
          f"bi_rgb_std={best['bi_rgb_std']:g},pos_w={args.pos_w:g},pos_xy_std={args.pos_xy_std:g}"
          f"  (mIoU {100 * best['miou']:.2f}%, {100 * (best['miou'] - base_miou):+.2f} points)")
    if args.json:
        from deeplab.fileio import write_json

        write_json(args.json, {
            "best": {k: best[k] for k in ("bi_w", "bi_xy_std", "bi_rgb_std")} | {
                "pos_w": args.pos_w, "pos_xy_std": args.pos_xy_std, "iterations": args.iterations},
            "best_miou": best["miou"],
            "miou_without_crf": base_miou,
            "num_images": n,
            "probabilities": source,
            "dataset": args.dataset,
            "split": args.split,
            "settings": rows,
        })
        print(f"wrote {args.json}")
    return 0
