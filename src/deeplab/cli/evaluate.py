"""Evaluate a model on a data set at full resolution (the paper's protocol).

Every image is segmented whole (logits upsampled bilinearly to the image size), optionally
refined by the CRF, and all labelled pixels go into one confusion matrix. Prints a per-class
table; --json writes mIoU, pixel accuracy, mean accuracy, FWIoU, per-class IoU and the settings.
Under torchrun each process takes a share of the images and the counts are summed (same
result as one process). With no --weights the packaged default model is evaluated.

Examples:
  deeplab eval --dataset camvid --data-root data/CamVid --split val
  deeplab eval --dataset camvid --data-root data/CamVid --split val --weights m.safetensors \\
      --msc 0.5,0.75 --flip --crf --json val.json --report report/
  deeplab eval --dataset camvid --data-root data/CamVid --split val --save-probs probs/
  deeplab eval --dataset cityscapes --data-root data/cityscapes --split val --sliding-window 513
  torchrun --nproc-per-node 2 -m deeplab eval --dataset camvid --data-root data/CamVid --split val
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
    check_writable,
    report_error,
)


def parse_crf_params(text: str | None) -> dict[str, float]:
    """Parse ``"bi_w=4,bi_xy_std=67"`` into a dict checked against ``DenseCRF``'s arguments."""
    if not text:
        return {}
    from deeplab.crf import DenseCRF

    allowed = _crf_fields(DenseCRF)
    out: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"--crf-params: {part!r} is not KEY=VALUE (e.g. bi_w=4,bi_xy_std=67)")
        if key not in allowed:
            raise ValueError(f"--crf-params: unknown parameter {key!r}; valid: {', '.join(allowed)}")
        try:
            num = float(value)
        except ValueError:
            raise ValueError(f"--crf-params: {key}={value!r} is not a number") from None
        if key == "iterations" and not num.is_integer():
            raise ValueError(f"--crf-params: iterations={value!r} must be a whole number")
        out[key] = int(num) if key == "iterations" else num
    return out


def _crf_fields(cls: type) -> list[str]:
    import inspect

    return [p for p in inspect.signature(cls).parameters if p not in ("self",)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="data set name (see deeplab.data.list_datasets)")
    parser.add_argument("--data-root", required=True, type=Path, help="the data set's root folder")
    parser.add_argument("--split", default="val", help="split to evaluate")
    parser.add_argument("--weights", type=Path, default=None,
                        help="weights .safetensors (or .onnx with --backend), or a packaged model by name (camvid-v2); "
                             "without it, the packaged default model")
    parser.add_argument("--model", default=None,
                        help="expected model name (checked against the weights' metadata)")
    add_msc_arguments(parser)
    add_input_scale_argument(parser)
    parser.add_argument("--flip", action="store_true", help="average with the mirrored image")
    parser.add_argument("--crf", action="store_true", help="refine with the fully connected CRF")
    parser.add_argument("--crf-params", default=None, metavar="K=V,...",
                        help="DenseCRF parameters, e.g. bi_w=4,bi_xy_std=67,bi_rgb_std=3; unset ones "
                        "come from the weights' metadata, else DenseCRF's defaults")
    parser.add_argument("--sliding-window", type=int, default=None, metavar="SIZE",
                        help="sliding-window inference with SIZE x SIZE windows (large images)")
    parser.add_argument("--overlap", type=float, default=1 / 3,
                        help="fraction of a sliding window shared with its neighbour (default: %(default).3g)")
    parser.add_argument("--save-probs", type=Path, default=None, metavar="DIR",
                        help="write float16 <id>.npy (C,H,W) probabilities (before the CRF)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT.json", help="write the metrics as JSON")
    parser.add_argument("--report", type=Path, default=None, metavar="DIR",
                        help="write an HTML report (index.html) into DIR")
    add_precision_argument(parser)
    add_backend_argument(parser)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N images")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding images")


def format_table(result: dict, class_names: list[str] | tuple[str, ...]) -> str:
    """The per-class IoU / accuracy table and the summary lines, as text."""
    width = max(8, *(len(n) for n in class_names))
    lines = [f"{'class':<{width}}  {'IoU %':>7}  {'acc %':>7}"]
    for name, iou, acc in zip(class_names, result["per_class_iou"], result["per_class_acc"]):
        f = lambda v: "    n/a" if math.isnan(v) else f"{100 * v:7.2f}"  # noqa: E731
        lines.append(f"{name:<{width}}  {f(iou)}  {f(acc)}")
    lines.append("-" * (width + 18))
    for key, label in (("miou", "mIoU"), ("pixel_acc", "pixel acc"), ("mean_acc", "mean acc"),
                       ("fwiou", "FWIoU")):
        lines.append(f"{label:<{width}}  {100 * result[key]:7.2f}")
    ran = f" ({result['precision']})" if "precision" in result else ""
    lines.append(f"{result['num_images']} images, {result['images_per_s']:.2f} images/s{ran}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        return report_error(f"--limit must be >= 1, got {args.limit}")
    if args.sliding_window is not None and args.sliding_window < 16:
        return report_error(f"--sliding-window must be at least 16 pixels, got {args.sliding_window}")
    if not 0.0 <= args.overlap < 1.0:
        return report_error(f"--overlap must be in [0, 1), got {args.overlap}")
    try:
        crf_params = parse_crf_params(args.crf_params)
    except ValueError as e:
        return report_error(str(e))
    if crf_params and not args.crf:
        return report_error("--crf-params given without --crf: add --crf to use the CRF")
    for folder, flag in ((args.save_probs, "--save-probs"), (args.report, "--report")):
        if folder is not None:
            reason = check_writable(folder)
            if reason:
                return report_error(f"{flag}: {reason}")
    if args.json is not None:
        reason = check_output_file(args.json)
        if reason:
            return report_error(f"--json: {reason}")

    from deeplab.data import build_dataset
    from deeplab.engine.distributed import cleanup, init_distributed
    from deeplab.engine.evaluate import evaluate
    from deeplab.engine.inference import model_msc_fusion
    from deeplab.engine.backends import load_backend_bundle
    from deeplab.engine.segment import check_device

    try:
        device = check_device(args.device)
        dataset = build_dataset(args.dataset, args.data_root, args.split)
    except (ValueError, FileNotFoundError, OSError) as e:
        return report_error(str(e))
    if len(dataset) == 0:
        return report_error(f"split {args.split!r} of {args.dataset} at {args.data_root} holds no images")
    try:
        bundle = load_backend_bundle(args.weights, backend=args.backend, model_name=args.model,
                                     precision=args.precision, device=device)
    except (FileNotFoundError, ValueError) as e:
        return report_error(str(e))
    if bundle.num_classes != dataset.num_classes:
        return report_error(
            f"the model predicts {bundle.num_classes} classes but {args.dataset} has "
            f"{dataset.num_classes}: use weights trained on this data set"
        )
    crf = None
    if args.crf:
        from deeplab.crf import DenseCRF

        crf_params = {**bundle.crf_params, **crf_params}
        try:
            crf = DenseCRF(**crf_params)
        except ValueError as e:  # a value out of range (iterations=-1, bi_xy_std=0, nan ...)
            given = ",".join(f"{k}={v}" for k, v in crf_params.items())
            return report_error(f"{e} (CRF parameters {given}): set a valid value with --crf-params")

    info = init_distributed(device.split(":")[0])
    if device.startswith("cuda") and info.world_size > 1:
        import torch

        device = f"cuda:{info.local_rank}"
        bundle.model.to(device)
        torch.cuda.set_device(info.local_rank)
    main = info.rank == 0

    seen: set[str] = set()

    def notice(msg: str) -> None:
        if msg not in seen:  # once per distinct message, not once per image
            seen.add(msg)
            print(f"notice: {msg}", file=sys.stderr)

    input_scale = bundle.scale_for(args.input_scale)
    try:
        result = evaluate(
            bundle.model, dataset, normalization=bundle.normalization, msc_scales=args.msc,
            flip=args.flip, precision=bundle.precision, sliding_window=args.sliding_window,
            overlap=args.overlap, crf=crf,
            save_probs=args.save_probs, limit=args.limit, device=device, optimize=False,
            num_workers=args.workers, keep_examples=3 if args.report else 0,
            progress=main, notice=notice, input_scale=input_scale, msc_fusion=args.msc_fusion,
        )
    except ValueError as e:  # a bad sample (size mismatch, labels out of range)
        cleanup()
        return report_error(str(e))
    cleanup()
    if not main:
        return 0

    names = list(dataset.class_names)
    if args.backend != "torch":  # the engine's wrapper runs in fp32; the graph in what the runtime chose
        result["precision"] = f"{args.backend}, {bundle.metadata['backend_precision']}"
    print(format_table(result, names))
    settings = {
        "dataset": args.dataset,
        "data_root": str(args.data_root),
        "split": args.split,
        "model": bundle.name,
        "weights": str(args.weights) if args.weights else "default",
        "msc_scales": list(args.msc) if args.msc else None,
        "msc_fusion": (args.msc_fusion or model_msc_fusion(bundle.model)) if args.msc else None,
        "input_scale": input_scale,
        "flip": args.flip,
        "crf": crf_params if args.crf else None,
        "sliding_window": args.sliding_window,
        "overlap": args.overlap if args.sliding_window else None,
        "precision": bundle.metadata.get("backend_precision", bundle.precision),
        "backend": args.backend,
        "device": args.device,
        "limit": args.limit,
        "world_size": info.world_size,
        "upsampling": "bilinear, align_corners=True, full resolution",
    }
    out = {
        "miou": result["miou"],
        "pixel_acc": result["pixel_acc"],
        "mean_acc": result["mean_acc"],
        "fwiou": result["fwiou"],
        "per_class_iou": dict(zip(names, result["per_class_iou"])),
        "per_class_acc": dict(zip(names, result["per_class_acc"])),
        "num_images": result["num_images"],
        "num_pixels": result["num_pixels"],
        "images_per_s": result["images_per_s"],
        "settings": settings,
        "confusion_matrix": result["confusion_matrix"],
        "per_image": result["per_image"],
    }
    if args.json:
        from deeplab.fileio import write_json

        write_json(args.json, out)
        print(f"wrote {args.json}")
    if args.report:
        from deeplab.engine.report import write_report

        page = write_report(args.report, result, dataset=dataset, class_names=names,
                            palette=bundle.palette, settings=settings)
        print(f"wrote {page}")
    return 0
