"""Evaluation throughput on CamVid val: fp32 against the default ("auto") and bf16, with and without the CRF.

Each variant runs `deeplab.engine.evaluate.evaluate` in its own subprocess (so that its peak
memory, ru_maxrss, is its own) over the first --limit val images at full resolution (480x360):

1. baseline ``fp32``: the network in float32;
2. ``auto``, the project's default: bf16 where the CPU computes it natively (AVX512_BF16 / AMX),
   else fp32 (the output says which ran);
3. ``bf16``: bfloat16 weights (softmax still fp32), even where oneDNN emulates it (AVX2);
4. ``auto+crf``: the default plus the dense CRF (DenseCRF's default parameters), on the first
   --crf-limit images (the CRF dominates the time).

Prints images/s of each, the speed ratios against fp32, the mIoU of each and the mIoU
difference between bf16 and fp32 (goal: < 0.1 points) with the share of pixels whose label differs.
Uses the packaged default model when ``deeplab.weights.default_weights_path()`` exists, else
a seeded random ``--model`` (mIoU near zero: the difference is then a weak check, and the
output says so).

Usage: python benchmarks/bench_eval.py [--limit 6] [--crf-limit 2] [--model deeplab_v2_resnet18]
       [--data-root ../shared/data/camvid_segnet] [--weights FILE]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _machine import data_root, run_child  # benchmarks/_machine.py (run as python benchmarks/X.py)

_CHILD = r"""
import json, resource, sys
import numpy as np, torch
from deeplab.data import build_dataset
from deeplab.engine.evaluate import evaluate
cfg = json.loads(sys.argv[1])
ds = build_dataset("camvid", cfg["data_root"], "val")
if cfg["weights"]:
    from deeplab.weights import build_from_weights
    model, meta = build_from_weights(cfg["weights"])
    norm = meta.get("normalization") or {"mode": "caffe_bgr", "mean": [104.008, 116.669, 122.675]}
else:
    from deeplab.models import build_model
    torch.manual_seed(0)
    model = build_model(cfg["model"], num_classes=ds.num_classes).eval()
    norm = {"mode": "caffe_bgr", "mean": [104.008, 116.669, 122.675]}
crf = None
if cfg["crf"]:
    from deeplab.crf import DenseCRF
    crf = DenseCRF()
# one warm-up image (oneDNN kernel selection, lazy imports) outside the timing
evaluate(model, ds, normalization=norm, precision=cfg["precision"], crf=crf, limit=1)
r = evaluate(model, ds, normalization=norm, precision=cfg["precision"], crf=crf,
             limit=cfg["limit"], keep_examples=cfg["limit"])
preds = {e["id"]: e["pred"] for e in r["examples"]["best"]}
np.savez_compressed(cfg["preds"], **preds)
print(json.dumps({"images_per_s": r["images_per_s"], "miou": r["miou"], "pixel_acc": r["pixel_acc"],
                  "num_images": r["num_images"], "precision": r["precision"],
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", type=Path,
                    default=data_root() / "camvid_segnet")
    ap.add_argument("--limit", type=int, default=6, help="val images per variant")
    ap.add_argument("--crf-limit", type=int, default=2, help="val images for the CRF variant (0: skip)")
    ap.add_argument("--model", default="deeplab_v2_resnet18", help="random model when no weights")
    ap.add_argument("--weights", type=Path, default=None, help="weights (default: the packaged model)")
    args = ap.parse_args()

    weights = args.weights
    if weights is None:
        try:
            from deeplab.weights import default_weights_path

            weights = default_weights_path()
        except FileNotFoundError:
            weights = None
    what = f"weights {weights}" if weights else f"a seeded RANDOM {args.model} (no default weights found)"
    print(f"CamVid val, first {args.limit} images at 480x360, {what}; torch threads {__import__('torch').get_num_threads()}")

    with tempfile.TemporaryDirectory() as tmp:
        base = {"data_root": str(args.data_root), "weights": str(weights) if weights else None,
                "model": args.model, "limit": args.limit}
        res = {}
        for name, precision, crf, limit in (("fp32", "fp32", False, args.limit),
                                            ("auto", "auto", False, args.limit),
                                            ("bf16", "bf16", False, args.limit),
                                            ("auto+crf", "auto", True, args.crf_limit)):
            if limit <= 0:
                continue
            cfg = base | {"precision": precision, "crf": crf, "limit": limit,
                          "preds": str(Path(tmp) / f"{name}.npz")}
            res[name] = run_child(_CHILD, cfg, name)
            r = res[name]
            print(f"{name:>9}: {r['precision']:>4} {r['images_per_s']:6.2f} images/s  mIoU {100 * r['miou']:6.2f}  "
                  f"pixel acc {100 * r['pixel_acc']:6.2f}  peak RSS {r['maxrss_mb']:.0f} MB  "
                  f"({r['num_images']} images)")
        import numpy as np

        a = np.load(Path(tmp) / "fp32.npz")
        b = np.load(Path(tmp) / "bf16.npz")
        differ = sum(int((a[k] != b[k]).sum()) for k in a.files)
        total = sum(a[k].size for k in a.files)
    for name in ("auto", "bf16"):
        print(f"speed {name} / fp32: {res[name]['images_per_s'] / res['fp32']['images_per_s']:.2f}x")
    diff = 100 * (res["bf16"]["miou"] - res["fp32"]["miou"])
    print(f"mIoU bf16 - fp32: {diff:+.3f} points (goal |diff| < 0.1); labels differ on "
          f"{100 * differ / total:.3f}% of pixels")
    if "auto+crf" in res:
        print(f"CRF cost: {res['auto']['images_per_s'] / res['auto+crf']['images_per_s']:.1f}x slower with the CRF")
    if not weights:
        print("note: random weights: the mIoU difference says little; rerun with trained weights")


if __name__ == "__main__":
    main()
