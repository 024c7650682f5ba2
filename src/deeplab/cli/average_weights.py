"""Average the weights of several checkpoints of one network (stochastic weight averaging).

Writes the element-wise mean of the input files (float64 sums, each tensor stored in the
first file's dtype) with the last file's metadata and a 'weight_average' entry. Average the
checkpoints of one run taken at a constant learning rate (SWA), or runs fine-tuned from one
start ("model soup"); unrelated runs do not average into a working model. The mean of the
batch-norm statistics is not the statistics of the mean weights: run deeplab calibrate-bn on
the output before using it.

Examples:
  deeplab train cfg.yaml --out runs/swa --set solver.lr_power=0 --set keep_checkpoints=100 \\
      --set init_weights=runs/base/last.safetensors
  deeplab average-weights runs/swa/checkpoints/iter_*.safetensors --out runs/swa/average.safetensors
  deeplab calibrate-bn --weights runs/swa/average.safetensors --dataset camvid \\
      --data-root data/CamVid --out runs/swa/swa.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

from deeplab.cli.common import check_output_file, report_error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Attach the ``deeplab average-weights`` options."""
    parser.add_argument("weights", type=Path, nargs="+", help="two or more .safetensors files of one network")
    parser.add_argument("--out", type=Path, required=True, help="destination .safetensors")


def run(args: argparse.Namespace) -> int:
    """Average and write the weights; returns the exit status."""
    if any(p.resolve() == args.out.resolve() for p in args.weights):
        return report_error(f"--out {args.out} is one of the inputs: write the average to a new file")
    reason = check_output_file(args.out, ".safetensors")
    if reason:
        return report_error(f"--out: {reason}")

    from deeplab.weights import save_state_dict
    from deeplab.weights.average import average_weight_files, has_batch_norm_statistics

    try:
        state, metadata = average_weight_files(args.weights)
    except (ValueError, OSError) as e:
        return report_error(str(e))
    try:
        save_state_dict(state, args.out, metadata)
    except OSError as e:  # disk full, permission denied: the atomic write left no partial file
        return report_error(f"cannot write {args.out}: {e.strerror or e}")
    print(f"averaged {len(args.weights)} files ({metadata['model']}); wrote {args.out}")
    if has_batch_norm_statistics(state):
        print("note: its batch-norm statistics are the inputs' mean: run deeplab calibrate-bn on it before use")
    return 0
