#!/usr/bin/env python3
"""Measure the post-hoc logit adjustment of a model trained with class weights (maintainers).

A network trained with class weights ``w_c`` in the cross-entropy learns the weighted posterior
``p_w(c|x) ∝ w_c p(c|x)``: on CamVid (median-frequency weights up to 8.8 for bicyclist) it
over-predicts the rare classes, with high recall and low precision, which costs IoU. Subtracting
``tau * log(w_c)`` from the logits undoes the weighting (``tau = 1`` gives back the unweighted
posterior; Menon et al. 2021, "Long-tail learning via logit adjustment"); values between 0 and
1 trade recall of the rare classes for their precision. A per-class constant on the logits is a
change of the classifier's bias, so the adjusted model is the same network with other biases
(``scripts/package_default_model.py --logit-adjust TAU`` writes it).

Reads the probabilities that ``deeplab eval --save-probs DIR`` wrote for a split (an argmax of
``log p - tau log w`` equals the argmax of the adjusted logits: bilinear upsampling and the
softmax commute with a per-class constant) and prints mIoU, pixel accuracy and the per-class
IoU for each ``tau``.

Example:
  deeplab eval --weights cand.safetensors --dataset camvid --data-root ../shared/data/camvid_segnet \\
      --split train --save-probs probs_train/
  python scripts/logit_adjustment.py --dataset camvid --data-root ../shared/data/camvid_segnet \\
      --split train --probs probs_train/ --class-weights runs/camvid_r18_d/class_weights.json \\
      --taus 0,0.25,0.5,0.75,1 --json tau_train.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from deeplab.data import build_dataset
from deeplab.engine.evaluate import probs_path
from deeplab.engine.metrics import ConfusionMatrix, metrics_from_matrix


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument("--split", default="val")
    parser.add_argument("--probs", required=True, type=Path, help="folder written by 'deeplab eval --save-probs'")
    parser.add_argument("--class-weights", required=True, type=Path, help="the run's class_weights.json")
    parser.add_argument("--taus", default="0,0.25,0.5,0.75,1", help="comma-separated adjustment strengths")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images of the split")
    parser.add_argument("--json", type=Path, default=None, help="write the table as JSON")
    args = parser.parse_args()

    weights = np.asarray(json.loads(args.class_weights.read_text())["weights"], dtype=np.float32)
    taus = [float(t) for t in args.taus.split(",")]
    dataset = build_dataset(args.dataset, args.data_root, args.split)
    num_classes = len(weights)
    if int(dataset.num_classes) != num_classes:
        raise SystemExit(f"error: {args.class_weights} has {num_classes} weights, {args.dataset} has "
                         f"{dataset.num_classes} classes")
    log_w = torch.from_numpy(np.log(weights))[:, None, None]
    matrices = {tau: ConfusionMatrix(num_classes, ignore_index=dataset.ignore_index) for tau in taus}
    count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    for index in range(count):
        path = probs_path(args.probs, dataset.ids[index])
        if not path.is_file():
            raise SystemExit(f"error: {path} is missing: run 'deeplab eval --split {args.split} --save-probs "
                             f"{args.probs}' with the same data set first")
        log_p = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32)).clamp_(min=1e-8).log_()
        target = torch.from_numpy(dataset.load_mask(index).astype(np.int64))
        for tau in taus:
            matrices[tau].update((log_p - tau * log_w).argmax(0), target)
    names = list(dataset.class_names)
    rows = []
    for tau in taus:
        m = metrics_from_matrix(matrices[tau].mat)
        rows.append({"tau": tau, "miou": m["miou"], "pixel_acc": m["pixel_acc"],
                     "per_class_iou": dict(zip(names, m["per_class_iou"]))})
    print(f"logit adjustment on {args.dataset} {args.split}, "
          f"first {count} images, logits - tau * log(w), w from {args.class_weights}")
    print(f"{'tau':>5} {'mIoU':>6} {'pixAcc':>6} " + " ".join(f"{n[:8]:>8}" for n in names))
    for r in rows:
        print(f"{r['tau']:>5.2f} {100 * r['miou']:>6.2f} {100 * r['pixel_acc']:>6.2f} "
              + " ".join(f"{100 * v:>8.2f}" for v in r["per_class_iou"].values()))
    if args.json:
        args.json.write_text(json.dumps({"split": args.split, "images": count, "weights": weights.tolist(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
