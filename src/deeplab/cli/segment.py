"""Segment images: write a palette label PNG and an overlay for each.

For every input image, writes into --out:
  <stem>.png          the label map as a palette PNG in the model's class colours
  <stem>_overlay.jpg  the image blended with the colours, with a legend of the classes present
  <stem>.npy          float16 (C,H,W) probabilities (with --save-probs)

Inputs may be files, folders (their images, not recursive) and glob patterns. Unreadable files
are reported and skipped; the exit status is then 1. With no --weights the packaged default
model is used.

Examples:
  deeplab segment street.jpg --out seg/
  deeplab segment photos/ 'more/**/*.png' --out seg/ --weights my_model.safetensors --crf
  deeplab segment big.tif --out seg/ --msc 0.5,0.75 --precision fp32
"""

from __future__ import annotations

import argparse
import glob
import sys
import time
from pathlib import Path

from deeplab.cli.common import (
    IMAGE_SUFFIXES,
    add_input_scale_argument,
    add_msc_arguments,
    add_precision_argument,
    check_writable,
    overwritten_input,
    report_error,
)


def _positive_pixels(flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(
                f"{flag} {text!r}: expected a positive number of pixels such as 6000000"
            )
        return value

    return parse



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR",
                        help="image files, folders of images or glob patterns")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if needed)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="weights .safetensors; without it, the packaged default model")
    parser.add_argument("--model", default=None,
                        help="expected model name (checked against the weights' metadata)")
    parser.add_argument("--crf", action="store_true", help="refine with the fully connected CRF")
    add_msc_arguments(parser)
    add_input_scale_argument(parser)
    parser.add_argument("--flip", action="store_true", help="also average the mirrored image")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    add_precision_argument(parser)
    parser.add_argument("--batch", type=int, default=1,
                        help="images per forward pass (consecutive images of one size)")
    parser.add_argument("--save-probs", action="store_true",
                        help="also write <stem>.npy float16 (C,H,W) probabilities")
    parser.add_argument("--max-pixels", type=_positive_pixels("--max-pixels"), default=None, metavar="N",
                        help="downscale larger images for the network; unset: 6,000,000")
    parser.add_argument("--max-image-pixels", type=_positive_pixels("--max-image-pixels"), default=None,
                        metavar="N", help="refuse to decode image files of more pixels (a guard against "
                        "decompression bombs); raise it for trusted large files; unset: 64,000,000")
    parser.add_argument("--alpha", type=float, default=0.5, help="colour weight of the overlay")


def expand_inputs(items: list[str]) -> tuple[list[Path], list[str]]:
    """Files, folders and globs -> (image paths in order without duplicates, problems)."""
    paths: list[Path] = []
    problems: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append(f"{item}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        elif p.exists():
            paths.append(p)
        elif glob.has_magic(item):
            found = sorted(Path(f) for f in glob.glob(item, recursive=True) if Path(f).is_file())
            if not found:
                problems.append(f"{item}: pattern matches no file")
            paths.extend(found)
        else:
            problems.append(f"{item}: no such file or folder")
    seen: set[Path] = set()
    unique = []
    for p in paths:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique, problems


def _unique_stems(paths: list[Path]) -> list[str]:
    """One output stem per path: its own, or ``<stem>_N`` when an earlier path has it.

    ``<stem>_N`` also avoids every input's own stem (``x.jpg`` must not become ``x_1`` when
    ``x_1.png`` is an input too). Compared case-blind: on macOS and Windows ``X.png`` is ``x.png``.
    """
    natural = {p.stem.casefold() for p in paths}
    used: set[str] = set()
    last: dict[str, int] = {}
    stems: list[str] = []
    for p in paths:
        stem = p.stem
        key = stem.casefold()
        if key in used:
            n = last.get(key, 0) + 1
            while f"{key}_{n}" in used or f"{key}_{n}" in natural:
                n += 1
            last[key] = n
            stem = f"{stem}_{n}"
        used.add(stem.casefold())
        stems.append(stem)
    return stems


def _output_names(stem: str, save_probs: bool) -> list[str]:
    return [f"{stem}.png", f"{stem}_overlay.jpg", *([f"{stem}.npy"] if save_probs else [])]


def run(args: argparse.Namespace) -> int:
    if args.batch < 1:
        return report_error(f"--batch must be >= 1, got {args.batch}")
    if not 0.0 <= args.alpha <= 1.0:
        return report_error(f"--alpha must be in [0, 1], got {args.alpha}")
    paths, problems = expand_inputs(args.inputs)
    stems = _unique_stems(paths)
    inputs = {p.resolve(): p for p in paths}
    for path, stem in zip(paths, stems):
        hit = overwritten_input(args.out, inputs, _output_names(stem, args.save_probs))
        if hit is not None:
            source = "" if hit == path else f" with the output for {path}"
            return report_error(f"--out {args.out} would overwrite input {hit}{source}: choose another --out")
    reason = check_writable(args.out)
    if reason:
        return report_error(reason)
    if not paths:
        for msg in problems:
            print(f"error: {msg}", file=sys.stderr)
        return report_error("no input images")

    import numpy as np

    from deeplab.data.io import DEFAULT_MAX_PIXELS as DEFAULT_IMAGE_PIXELS
    from deeplab.data.io import ImageReadError, read_image, write_label_png
    from deeplab.engine.evaluate import save_probs_npy
    from deeplab.engine.inference import DEFAULT_MAX_PIXELS, finish_prediction, model_align_corners, predict_logits
    from deeplab.engine.segment import load_bundle, overlay, save_jpeg

    try:
        bundle = load_bundle(args.weights, model_name=args.model, precision=args.precision,
                             device=args.device)
    except (FileNotFoundError, ValueError) as e:
        return report_error(str(e))
    if bundle.num_classes > 256:
        return report_error(
            f"{args.weights or 'the default model'} has {bundle.num_classes} classes but a label PNG "
            "holds at most 256 class indices: use deeplab.segment() from Python, which returns "
            "int32 labels for such models"
        )
    crf = None
    if args.crf:
        from deeplab.crf import DenseCRF

        crf = DenseCRF(**bundle.crf_params)
    max_pixels = DEFAULT_MAX_PIXELS if args.max_pixels is None else args.max_pixels
    max_image_pixels = DEFAULT_IMAGE_PIXELS if args.max_image_pixels is None else args.max_image_pixels

    def notice(msg: str) -> None:
        bar.write(f"notice: {msg}", file=sys.stderr)

    failures = list(problems)
    for msg in problems:
        print(f"skipped: {msg}", file=sys.stderr)
    done = 0
    from tqdm import tqdm

    bar = tqdm(total=len(paths), unit="img", desc="segment", disable=len(paths) < 2, file=sys.stderr)
    t0 = time.perf_counter()

    def process(group: list[tuple[Path, str, np.ndarray]]) -> None:
        nonlocal done
        batch = np.stack([img for _, _, img in group])
        logits = predict_logits(
            bundle.model, batch, normalization=bundle.normalization, msc_scales=args.msc,
            flip=args.flip, precision=bundle.precision, max_pixels=max_pixels, notice=notice,
            input_scale=bundle.scale_for(args.input_scale), msc_fusion=args.msc_fusion,
        )
        for k, (path, stem, img) in enumerate(group):
            labels, probs = finish_prediction(logits[k : k + 1], img, crf=crf, want_probs=args.save_probs,
                                              align_corners=model_align_corners(bundle.model))
            if args.save_probs:
                save_probs_npy(args.out / f"{stem}.npy", probs)
            labels = labels.numpy().astype(np.uint8)
            write_label_png(args.out / f"{stem}.png", labels, bundle.palette)
            save_jpeg(args.out / f"{stem}_overlay.jpg",
                      overlay(img, labels, bundle.palette, bundle.class_names, alpha=args.alpha))
            done += 1
            bar.update(1)

    group: list[tuple[Path, str, np.ndarray]] = []
    try:
        for path, stem in zip(paths, stems):
            try:
                img = read_image(path, max_pixels=max_image_pixels)
            except (ImageReadError, OSError) as e:
                failures.append(str(e))
                bar.write(f"skipped: {e}", file=sys.stderr)
                bar.update(1)
                continue
            if group and (len(group) >= args.batch or group[0][2].shape != img.shape):
                process(group)
                group = []
            group.append((path, stem, img))
        if group:
            process(group)
    except OSError as e:  # e.g. the disk filled up while writing
        bar.close()
        return report_error(f"writing to {args.out} failed: {e}")
    bar.close()
    seconds = time.perf_counter() - t0
    rate = done / seconds if seconds > 0 else float("nan")
    print(f"segmented {done} image(s) in {seconds:.1f} s ({rate:.2f} images/s) -> {args.out}")
    if failures:
        print(f"error: {len(failures)} input(s) could not be read (see 'skipped:' above)",
              file=sys.stderr)
        return 1
    return 0
