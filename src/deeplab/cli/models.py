"""List the model names that build_model accepts, with their parameter counts.

Examples:
  deeplab models                        # table: name, backbone, head, parameters, default rates;
                                        # and what precision "auto" means on this machine
  deeplab models --num-classes 19       # parameter counts for 19 classes (Cityscapes)
  deeplab models --names                # just the names, one a line (for scripts)
"""

from __future__ import annotations

import argparse

from deeplab.cli.common import report_error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Attach the ``deeplab models`` options."""
    parser.add_argument("--num-classes", type=int, default=21,
                        help="number of classes used for the parameter counts (21 = PASCAL VOC)")
    parser.add_argument("--names", action="store_true", help="print only the names, one a line")


def run(args: argparse.Namespace) -> int:
    """Print the model table; returns the exit status."""
    import torch

    from deeplab.models import build_model, list_models, model_info, resolve_precision

    if args.num_classes < 1:
        return report_error(f"--num-classes {args.num_classes} must be a positive integer")
    if args.names:
        print("\n".join(list_models()))
        return 0
    rows = [("name", "backbone", "head", "params", "output strides (default)", "default atrous_rates")]
    for name in list_models():
        info = model_info(name)
        # Building on the meta device allocates no memory and runs no initialisation kernels.
        with torch.device("meta"):
            model = build_model(name, num_classes=args.num_classes)
        params = sum(p.numel() for p in model.parameters())
        rows.append((name, info.backbone, info.head, f"{params / 1e6:.2f}M ({params:,})",
                     ",".join(map(str, info.output_strides)) + f" ({info.default_output_stride})",
                     str(info.default_atrous_rates)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print(f"\nparameters counted with {args.num_classes} classes; atrous_rates are given at output stride 8 "
          "(v3's (12, 24, 36) are its paper's (6, 12, 18) at 16); v3+ uses the paper's two-convolution decoder "
          "(decoder_convs=1: VainF's)")
    # Which precision "auto" (every command's default) means on this machine: it differs between CPUs.
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("precision 'auto' here: " + ", ".join(f"{resolve_precision('auto', d)} on {d}" for d in devices)
          + " (bf16 only where the device computes it natively)")
    return 0
