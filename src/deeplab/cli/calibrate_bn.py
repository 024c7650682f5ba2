"""Re-estimate a trained model's batch-norm statistics on whole training images ("precise BN").

Training computes batch-norm statistics on random crops of rescaled, padded images; inference
runs on whole images at scale 1. One pass over the training split as it is evaluated (whole
images, no augmentation) replaces the running means and variances; no weight changes and no
label is read. Run it on the training split: statistics taken from the images you then
evaluate on would be a use of the evaluation data. The output keeps the input's metadata, adds
'bn_calibration' (data set, split, images, batch size, precision), and is float16 if the input
was, else float32. Models without batch norm (VGG) or with frozen batch norm have nothing to
recalibrate.

Examples:
  deeplab calibrate-bn --weights runs/camvid/last.safetensors --dataset camvid \\
      --data-root data/CamVid --out runs/camvid/calibrated.safetensors
  deeplab calibrate-bn --weights m.safetensors --dataset camvid --data-root data/CamVid \\
      --output-stride 8 --batch-size 4 --limit 200 --out m_os8.safetensors
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from deeplab.cli.common import add_precision_argument, check_output_file, report_error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Attach the ``deeplab calibrate-bn`` options."""
    parser.add_argument("--weights", type=Path, required=True, help="the trained weights (.safetensors with metadata)")
    parser.add_argument("--dataset", required=True, help="data set name (see deeplab.data.list_datasets)")
    parser.add_argument("--data-root", required=True, type=Path, help="the data set's root folder")
    parser.add_argument("--split", default="train", help="split whose images give the statistics")
    parser.add_argument("--out", type=Path, required=True, help="destination .safetensors")
    parser.add_argument("--output-stride", type=int, default=None,
                        help="the stride the model will run at (default: the weights'); stored in the output")
    parser.add_argument("--batch-size", type=int, default=8, help="whole images per forward pass")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images of the split")
    add_precision_argument(parser)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")


def run(args: argparse.Namespace) -> int:
    """Recalibrate and write the weights; returns the exit status."""
    if args.batch_size < 1:
        return report_error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        return report_error(f"--limit must be >= 1, got {args.limit}")
    reason = check_output_file(args.out, ".safetensors")
    if reason:
        return report_error(f"--out: {reason}")

    import torch

    from deeplab.data import build_dataset
    from deeplab.engine.calibrate import recalibrate_bn
    from deeplab.engine.segment import check_device
    from deeplab.weights import build_from_weights, half_state_dict, read_state_dict, save_state_dict

    try:
        device = check_device(args.device)
        if not args.weights.is_file():
            raise FileNotFoundError(f"weights file not found: {args.weights}")
        overrides = {"output_stride": args.output_stride} if args.output_stride else {}
        model, metadata = build_from_weights(args.weights, **overrides)
        dataset = build_dataset(args.dataset, args.data_root, args.split)
        if int(dataset.num_classes) != model.num_classes:
            raise ValueError(f"{args.weights} predicts {model.num_classes} classes but {args.dataset} has "
                             f"{dataset.num_classes}: calibrate on the data set the model was trained on")
        normalization = metadata.get("normalization")
        if normalization is None:
            raise ValueError(f"{args.weights} has no 'normalization' metadata: convert it with "
                             "deeplab convert ... --normalization first")
        t0 = time.perf_counter()
        info = recalibrate_bn(model, dataset, normalization=normalization, batch_size=args.batch_size,
                              limit=args.limit, precision=args.precision, device=device)
    except (ValueError, OSError) as e:  # also a missing or bad image, named by the data set
        return report_error(str(e))
    seconds = time.perf_counter() - t0

    source_half = any(t.dtype == torch.float16 for t in read_state_dict(args.weights)[0].values())
    state = model.to("cpu").state_dict()
    if source_half:
        state = half_state_dict(state)
    metadata["model_kwargs"] = {**metadata.get("model_kwargs", {}), "output_stride": model.output_stride}
    metadata["bn_calibration"] = {"dataset": args.dataset, "split": args.split, **info}
    try:
        save_state_dict(state, args.out, metadata)
    except OSError as e:  # disk full, permission denied: the atomic write left no partial file
        return report_error(f"cannot write {args.out}: {e.strerror or e}")
    print(f"recalibrated {info['layers']} batch norms on {info['images']} {args.split} images "
          f"({info['batches']} batches, {info['precision']}) in {seconds:.1f} s; wrote {args.out}")
    return 0
