#!/usr/bin/env python3
"""Package a trained run as the default model shipped in ``src/deeplab/assets/`` (maintainers).

Casts the weights to float16 (the package-size budget is 25 MB; the model computes in bf16 or
fp32 after loading), sets the output stride used at inference and stores the CRF parameters and
the training / evaluation record in the metadata, so ``deeplab segment`` needs no flags.

Example:
  python scripts/package_default_model.py runs/camvid_r18/best.safetensors \\
      --output-stride 8 --crf-json crf_search.json --record record.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


from deeplab.weights import half_state_dict, read_metadata, save_state_dict
from deeplab.weights.loading import read_state_dict

DEFAULT_DST = Path(__file__).resolve().parents[1] / "src/deeplab/assets/deeplab_v2_camvid.safetensors"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="the run's weights (best.safetensors)")
    parser.add_argument("--dst", type=Path, default=DEFAULT_DST)
    parser.add_argument("--output-stride", type=int, default=None, help="output stride at inference")
    parser.add_argument("--crf-json", type=Path, help="'deeplab crf-search --json' output (its best setting)")
    parser.add_argument("--record", type=Path, help="JSON merged into the metadata under 'record'")
    args = parser.parse_args()

    meta = read_metadata(args.src)
    state, _, _ = read_state_dict(args.src)
    state = half_state_dict(state)
    if args.output_stride:
        meta["model_kwargs"] = {**meta.get("model_kwargs", {}), "output_stride": args.output_stride}
    if args.crf_json:
        meta["crf"] = json.loads(args.crf_json.read_text())["best"]
    if args.record:
        meta["record"] = json.loads(args.record.read_text())
    meta["source"] = f"deeplab train ({args.src.parent.name}), packaged by scripts/package_default_model.py"
    args.dst.parent.mkdir(parents=True, exist_ok=True)
    save_state_dict(state, args.dst, meta)
    print(f"wrote {args.dst} ({args.dst.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
