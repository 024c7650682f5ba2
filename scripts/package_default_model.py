#!/usr/bin/env python3
"""Package a trained run as the default model shipped in ``src/deeplab/assets/`` (maintainers).

Casts the weights to float16, or int8 with ``--int8`` (the package-size budget is 25 MB; the
model computes in bf16 or fp32 after loading), sets the output stride used at inference and
stores the CRF parameters and the training / evaluation record in the metadata, so
``deeplab segment`` needs no flags.

Example:
  python scripts/package_default_model.py runs/camvid_r18/best.safetensors \\
      --output-stride 8 --crf-json crf_search.json --record record.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from deeplab.weights import half_state_dict, int8_state_dict, read_metadata, save_state_dict
from deeplab.weights.loading import read_state_dict

DEFAULT_DST = Path(__file__).resolve().parents[1] / "src/deeplab/assets/deeplab_v2_camvid.safetensors"


def _classifier_bias(state: dict, num_classes: int) -> str:
    """The bias of the first ASPP branch's classifier (ResNet ``aspp.branches.0.bias``, VGG ``...fc8.bias``)."""
    keys = [k for k, v in state.items()
            if k.startswith("aspp.branches.0.") and k.endswith("bias") and v.numel() == num_classes]
    if len(keys) != 1:
        raise SystemExit(f"error: cannot tell the classifier bias among {keys or 'no'} aspp.branches.0 biases")
    return keys[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="the run's weights (best.safetensors)")
    parser.add_argument("--dst", type=Path, default=DEFAULT_DST)
    parser.add_argument("--output-stride", type=int, default=None, help="output stride at inference")
    parser.add_argument("--input-scale", type=float, default=None,
                        help="the factor images are resized by for the network (the scale trained at)")
    parser.add_argument("--crf-json", type=Path, help="'deeplab crf-search --json' output (its best setting)")
    parser.add_argument("--record", type=Path, help="JSON merged into the metadata under 'record'")
    parser.add_argument("--logit-adjust", type=float, default=0.0, metavar="TAU",
                        help="subtract TAU * log(w_c) of the training class weights from the classifier bias "
                             "(see scripts/logit_adjustment.py)")
    parser.add_argument("--int8", action="store_true",
                        help="int8 convolution weights with a scale per output channel (half the float16 "
                             "file: what a ResNet-34 needs to fit the 25 MB budget)")
    parser.add_argument("--class-weights", type=Path, default=None,
                        help="the run's class_weights.json (default: next to SRC)")
    args = parser.parse_args()

    meta = read_metadata(args.src)
    state, _, _ = read_state_dict(args.src)
    if args.logit_adjust:
        weights_file = args.class_weights or args.src.parent / "class_weights.json"
        weights = json.loads(weights_file.read_text())["weights"]
        key = _classifier_bias(state, len(weights))
        offset = args.logit_adjust * torch.log(torch.tensor(weights, dtype=torch.float64))
        # ASPP sums its branches, so a constant on one branch's bias moves every logit of that class.
        state[key] = (state[key].double() - offset).to(state[key].dtype)
        meta["logit_adjustment"] = {"tau": args.logit_adjust, "class_weights": weights, "bias": key}
        print(f"{key} -= {args.logit_adjust} * log(class weights of {weights_file})")
    state = int8_state_dict(state) if args.int8 else half_state_dict(state)
    if args.output_stride:
        meta["model_kwargs"] = {**meta.get("model_kwargs", {}), "output_stride": args.output_stride}
    if args.input_scale:
        meta["input_scale"] = args.input_scale
    if args.crf_json:
        meta["crf"] = json.loads(args.crf_json.read_text())["best"]
    if args.record:
        meta["record"] = json.loads(args.record.read_text())
    # The run's "miou" is its in-training validation (its stride, before any adjustment): keep
    # it under its own name so that it is not read as the packaged model's figure.
    if "miou" in meta:
        meta["train_val_miou"] = meta.pop("miou")
    meta["source"] = f"deeplab train ({args.src.parent.name}), packaged by scripts/package_default_model.py"
    args.dst.parent.mkdir(parents=True, exist_ok=True)
    save_state_dict(state, args.dst, meta)
    print(f"wrote {args.dst} ({args.dst.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
