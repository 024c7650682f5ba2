"""Segment images and videos: label maps and overlays, on one machine or many.

For every input image, writes into --out:
  <stem>.png          the label map as a palette PNG in the model's class colours
  <stem>_overlay.jpg  the image blended with the colours, with a legend of the classes present
  <stem>.npy          float16 (C,H,W) probabilities (with --save-probs)

For every input video (any container and codec FFmpeg decodes; needs pip install 'deeplab[video]'):
  <stem>_overlay.mp4  H.264 at the video's frame rate and size, the legend drawn
  <stem>_classes.csv  one row per frame: index, timestamp, share of every class
  <stem>/NNNNNN.png   the label map of every frame (with --save-frames), numbered from 0

Inputs may be files, folders (their images and videos, not recursive) and glob patterns.
Unreadable files are reported and skipped, a truncated video keeps the frames decoded before
the damage; the exit status is then 1. With no --weights the packaged default model is used.
Under torchrun the inputs are split among the processes, each input done once.

Examples:
  deeplab segment street.jpg --out seg/
  deeplab segment photos/ 'more/**/*.png' --out seg/ --weights my_model.safetensors --crf
  deeplab segment big.tif --out seg/ --msc 0.5,0.75 --precision fp32
  deeplab segment drive.mp4 --out seg/ --every 2 --batch 8 --save-frames --temporal-ema 0.5
  torchrun --nproc-per-node 4 -m deeplab segment photos/ --out seg/ --skip-existing --summary seg/summary.csv
"""

from __future__ import annotations

import argparse
import csv
import glob
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from deeplab.cli.common import (
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    add_backend_argument,
    add_input_scale_argument,
    add_msc_arguments,
    add_precision_argument,
    at_least,
    check_output_file,
    check_writable,
    overwritten_input,
    report_error,
)
from deeplab.engine.outputs import video_output_names

# How long the processes of a torchrun wait for each other at the end (the slowest share): the
# default 30 minutes is shorter than one long video.
_GATHER_TIMEOUT = timedelta(days=7)


def _ema_weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(
            f"--temporal-ema {text!r}: expected a weight in [0, 1) such as 0.5 (0: off)"
        )
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image or video files, folders of them or glob patterns")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if needed)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="weights .safetensors (or .onnx with --backend), or a packaged model by name (camvid-v2); "
                             "without it, the packaged default model")
    parser.add_argument("--model", default=None,
                        help="expected model name (checked against the weights' metadata)")
    parser.add_argument("--crf", action="store_true", help="refine with the fully connected CRF")
    add_msc_arguments(parser)
    add_input_scale_argument(parser)
    parser.add_argument("--flip", action="store_true", help="also average the mirrored image")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: each process its LOCAL_RANK's GPU)")
    add_precision_argument(parser)
    add_backend_argument(parser)
    parser.add_argument("--batch", type=int, default=1,
                        help="images or video frames per forward pass (consecutive ones of one size)")
    parser.add_argument("--save-probs", action="store_true",
                        help="also write <stem>.npy float16 (C,H,W) probabilities (images)")
    parser.add_argument("--max-pixels", type=at_least("--max-pixels", int, 1, "6000000"), default=None,
                        metavar="N", help="downscale larger images and frames for the network; unset: 6,000,000")
    parser.add_argument("--max-image-pixels", type=at_least("--max-image-pixels", int, 1, "64000000"),
                        default=None, metavar="N", help="refuse to decode image files of more pixels (a guard against "
                        "decompression bombs); raise it for trusted large files; unset: 64,000,000")
    parser.add_argument("--alpha", type=float, default=0.5, help="colour weight of the overlay")
    video = parser.add_argument_group("videos")
    video.add_argument("--every", type=at_least("--every", int, 1, "2"), default=1, metavar="N",
                       help="segment every Nth frame (the overlay video's rate is divided by N)")
    video.add_argument("--save-frames", action="store_true",
                       help="also write the label map of every segmented frame as <stem>/NNNNNN.png")
    video.add_argument("--temporal-ema", type=_ema_weight, default=0.0, metavar="W",
                       help="smooth the probabilities between frames: weight W of the previous frames "
                       "in an exponential moving average (0: off)")
    collection = parser.add_argument_group("collections")
    collection.add_argument("--skip-existing", action="store_true",
                            help="leave out inputs whose outputs are all there (resume an interrupted run)")
    collection.add_argument("--summary", type=Path, default=None, metavar="FILE.csv",
                            help="write one row per input: path, size, frames, seconds, share of every class")


# --------------------------------------------------------------------------- inputs and names


def expand_inputs(items: list[str]) -> tuple[list[Path], list[str]]:
    """Files, folders and globs -> (image and video paths in order without duplicates, problems)."""
    suffixes = (*IMAGE_SUFFIXES, *VIDEO_SUFFIXES)
    paths: list[Path] = []
    problems: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in suffixes)
            if not found:
                problems.append(f"{item}: folder holds no images or videos ({', '.join(suffixes)})")
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


def _is_video(path: Path) -> bool:
    """Videos by their suffix; a file of another suffix that Pillow cannot identify too."""
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return True
    if suffix in IMAGE_SUFFIXES:
        return False
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):
            return False
    except UnidentifiedImageError:
        return True
    except OSError:
        return False  # unreadable: read_image names the problem


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


# --------------------------------------------------------------------------- one process's share


@dataclass
class _Input:
    index: int  # in the whole run's input list: the summary's order
    path: Path
    stem: str
    video: bool


@dataclass
class _Share:
    """What one process did: summary rows by input index, counts, failures."""

    rows: dict[int, list[str]] = field(default_factory=dict)
    images: int = 0
    videos: int = 0
    frames: int = 0
    existing: int = 0
    image_seconds: float = 0.0
    video_seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    fatal: str | None = None  # an error that stopped this process (e.g. the disk filled up)

    def take_existing(self, item: _Input, row: list[str]) -> None:
        """Count an input whose outputs --skip-existing found; keep its summary row if one was read."""
        self.existing += 1
        if row:
            self.rows[item.index] = row


def _row(item: _Input, kind: str, status: str, width: Any = "", height: Any = "", frames: Any = "",
         seconds: float | None = None, shares: Any = None, num_classes: int = 0) -> list[str]:
    values = [f"{s:.6f}" for s in shares] if shares is not None else [""] * num_classes
    return [str(item.path), kind, status, str(width), str(height), str(frames),
            "" if seconds is None else f"{seconds:.3f}", *values]


def _shares(labels, num_classes: int):
    from deeplab.engine.segment import class_pixels

    counts = class_pixels(labels, num_classes)
    return counts / max(1, counts.sum())


def _existing_image(item: _Input, args: argparse.Namespace, num_classes: int, want_row: bool) -> list[str] | None:
    """The summary row of an image whose outputs are all there, or None if they are not."""
    if not all((args.out / name).is_file() for name in _output_names(item.stem, args.save_probs)):
        return None
    if not want_row:
        return []
    import numpy as np
    from PIL import Image

    try:
        with Image.open(args.out / f"{item.stem}.png") as im:
            labels = np.asarray(im)
    except OSError:
        return None  # not a readable label map: redo it
    return _row(item, "image", "existing", labels.shape[1], labels.shape[0], 1,
                shares=_shares(labels, num_classes))


def _existing_video(item: _Input, args: argparse.Namespace, num_classes: int, want_row: bool) -> list[str] | None:
    """The summary row of a video whose outputs are all there, or None if they are not.

    The CSV is written last, after the overlay video is complete; with --save-frames the folder
    must hold one label map per CSV row."""
    import numpy as np

    names = video_output_names(item.stem, args.save_frames)
    video, table = args.out / names[0], args.out / names[1]
    if not (video.is_file() and table.is_file()):
        return None
    try:
        with open(table, newline="") as f:
            rows = list(csv.reader(f))[1:]
        shares = np.array([[float(v) for v in r[2:]] for r in rows], dtype=np.float64)
    except (OSError, ValueError):
        return None
    if not rows or shares.shape[1] != num_classes:
        return None
    if args.save_frames:
        folder = args.out / item.stem
        if not folder.is_dir() or any(not (folder / f"{int(r[0]):06d}.png").is_file() for r in rows):
            return None
    if not want_row:
        return []
    from deeplab.engine.video import VideoReadError, VideoReader

    try:
        with VideoReader(video) as reader:
            width, height = reader.width, reader.height
    except VideoReadError:
        return None
    return _row(item, "video", "existing", width, height, len(rows), shares=shares.mean(0))


def _segment_images(items: list[_Input], args: argparse.Namespace, ctx: dict, share: _Share,
                    progress: bool) -> None:
    import numpy as np
    from tqdm import tqdm

    from deeplab.data.io import ImageReadError, read_image, write_label_png
    from deeplab.engine.evaluate import save_probs_npy
    from deeplab.engine.inference import finish_prediction, model_align_corners, predict_logits
    from deeplab.engine.segment import overlay, save_jpeg

    bundle = ctx["bundle"]
    num_classes = bundle.num_classes
    bar = tqdm(total=len(items), unit="img", desc="segment", disable=not progress or len(items) < 2,
               file=sys.stderr)
    t_start = time.perf_counter()

    def process(group: list[tuple[_Input, np.ndarray, float]]) -> None:
        t0 = time.perf_counter()
        batch = np.stack([img for _, img, _ in group])
        logits = predict_logits(
            bundle.model, batch, normalization=bundle.normalization, msc_scales=args.msc,
            flip=args.flip, precision=bundle.precision, max_pixels=ctx["max_pixels"], notice=ctx["notice"],
            input_scale=bundle.scale_for(args.input_scale), msc_fusion=args.msc_fusion,
        )
        network = (time.perf_counter() - t0) / len(group)
        for k, (item, img, read_s) in enumerate(group):
            t1 = time.perf_counter()
            labels, probs = finish_prediction(logits[k : k + 1], img, crf=ctx["crf"], want_probs=args.save_probs,
                                              align_corners=model_align_corners(bundle.model))
            if args.save_probs:
                save_probs_npy(args.out / f"{item.stem}.npy", probs)
            labels = labels.numpy().astype(np.uint8)
            write_label_png(args.out / f"{item.stem}.png", labels, bundle.palette)
            save_jpeg(args.out / f"{item.stem}_overlay.jpg",
                      overlay(img, labels, bundle.palette, bundle.class_names, alpha=args.alpha))
            seconds = read_s + network + time.perf_counter() - t1
            share.rows[item.index] = _row(item, "image", "segmented", img.shape[1], img.shape[0], 1,
                                          seconds, _shares(labels, num_classes))
            share.images += 1
            bar.update(1)

    group: list[tuple[_Input, np.ndarray, float]] = []
    try:
        for item in items:
            if args.skip_existing:
                row = _existing_image(item, args, num_classes, args.summary is not None)
                if row is not None:
                    share.take_existing(item, row)
                    bar.update(1)
                    continue
            t0 = time.perf_counter()
            try:
                img = read_image(item.path, max_pixels=ctx["max_image_pixels"])
            except (ImageReadError, OSError) as e:
                share.failures.append(str(e))
                share.rows[item.index] = _row(item, "image", "failed", num_classes=num_classes)
                bar.write(f"skipped: {e}", file=sys.stderr)
                bar.update(1)
                continue
            read_s = time.perf_counter() - t0
            if group and (len(group) >= args.batch or group[0][1].shape != img.shape):
                process(group)
                group = []
            group.append((item, img, read_s))
        if group:
            process(group)
    except OSError as e:  # e.g. the disk filled up while writing
        share.fatal = f"writing to {args.out} failed: {e}"
    finally:
        bar.close()
        share.image_seconds = time.perf_counter() - t_start


def _segment_videos(items: list[_Input], args: argparse.Namespace, ctx: dict, share: _Share,
                    progress: bool) -> None:
    from deeplab.engine.video import VideoReadError, segment_video

    bundle = ctx["bundle"]
    num_classes = bundle.num_classes
    t_start = time.perf_counter()
    try:
        for item in items:
            if args.skip_existing:
                row = _existing_video(item, args, num_classes, args.summary is not None)
                if row is not None:
                    share.take_existing(item, row)
                    continue
            try:
                r = segment_video(
                    bundle, item.path, args.out, item.stem, every=args.every, batch=args.batch,
                    crf=ctx["crf"], flip=args.flip, msc_scales=args.msc, msc_fusion=args.msc_fusion,
                    input_scale=args.input_scale, max_pixels=ctx["max_pixels"],
                    temporal_ema=args.temporal_ema, save_frames=args.save_frames, alpha=args.alpha,
                    progress=progress, notice=ctx["notice"],
                )
            except VideoReadError as e:
                if item.path.suffix.lower() not in VIDEO_SUFFIXES:  # tried as a video after Pillow
                    e = VideoReadError(f"{e} (nor is it an image Pillow reads)")
                share.failures.append(str(e))
                share.rows[item.index] = _row(item, "video", "failed", num_classes=num_classes)
                print(f"skipped: {e}", file=sys.stderr)
                continue
            status = "segmented"
            if r.error is not None:
                share.failures.append(r.error)
                print(f"error: {r.error}", file=sys.stderr)
                status = "truncated"
            share.rows[item.index] = _row(item, "video", status, r.width, r.height, r.frames, r.seconds,
                                          r.shares)
            share.videos += 1
            share.frames += r.frames
    except OSError as e:
        share.fatal = f"writing to {args.out} failed: {e}"
    finally:
        share.video_seconds = time.perf_counter() - t_start


# --------------------------------------------------------------------------- the run


def _gather(share: _Share) -> list[_Share]:
    """Every process's share on rank 0 (one process: its own); [] on the other ranks."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [share]
    parts: list[Any] = [None] * dist.get_world_size() if dist.get_rank() == 0 else None  # type: ignore[assignment]
    dist.gather_object(share, parts, dst=0)
    return parts or []


def _agree_on_status(status: int) -> int:
    """The highest exit status of all processes, on every process (also waits for rank 0)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return status
    flags = torch.zeros(3, dtype=torch.int64)
    flags[min(status, 2)] = 1
    if dist.get_backend() == "nccl":  # NCCL only reduces CUDA tensors
        flags = flags.cuda()
    dist.all_reduce(flags, op=dist.ReduceOp.SUM)
    return 2 if flags[2] else 1 if flags[1] else 0


def _write_summary(path: Path, shares: list[_Share], class_names) -> None:
    from deeplab.fileio import atomic_open

    rows: dict[int, list[str]] = {}
    for s in shares:
        rows.update(s.rows)
    with atomic_open(path, "w") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "kind", "status", "width", "height", "frames", "seconds", *class_names])
        w.writerows(rows[i] for i in sorted(rows))


def _report(args: argparse.Namespace, shares: list[_Share], n_images: int, n_videos: int) -> int:
    images = sum(s.images for s in shares)
    videos = sum(s.videos for s in shares)
    frames = sum(s.frames for s in shares)
    existing = sum(s.existing for s in shares)
    failures = [m for s in shares for m in s.failures]
    fatal = [s.fatal for s in shares if s.fatal]
    if n_images or not n_videos:
        seconds = max(s.image_seconds for s in shares)
        rate = images / seconds if seconds > 0 else float("nan")
        print(f"segmented {images} image(s) in {seconds:.1f} s ({rate:.2f} images/s) -> {args.out}")
    if n_videos:
        seconds = max(s.video_seconds for s in shares)
        rate = frames / seconds if seconds > 0 else float("nan")
        print(f"segmented {videos} video(s), {frames} frame(s) in {seconds:.1f} s ({rate:.2f} frames/s) "
              f"-> {args.out}")
    if existing:
        print(f"skipped {existing} input(s) whose outputs exist (--skip-existing)")
    if len(shares) > 1:
        print(f"{len(shares)} processes")
    if fatal:
        for msg in fatal:
            print(f"error: {msg}", file=sys.stderr)
        return 2
    if failures:
        print(f"error: {len(failures)} input(s) could not be read or were cut short "
              "(see 'skipped:' and 'error:' above)", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    if args.batch < 1:
        return report_error(f"--batch must be >= 1, got {args.batch}")
    if not 0.0 <= args.alpha <= 1.0:
        return report_error(f"--alpha must be in [0, 1], got {args.alpha}")
    paths, problems = expand_inputs(args.inputs)
    stems = _unique_stems(paths)
    videos = [_is_video(p) if p.is_file() else False for p in paths]
    inputs = {p.resolve(): p for p in paths}
    for path, stem, video in zip(paths, stems, videos):
        names = video_output_names(stem, args.save_frames) if video else _output_names(stem, args.save_probs)
        hit = overwritten_input(args.out, inputs, names)
        if hit is not None:
            source = "" if hit == path else f" with the output for {path}"
            return report_error(f"--out {args.out} would overwrite input {hit}{source}: choose another --out")
    if args.summary is not None:
        reason = check_output_file(args.summary, ".csv")
        if reason:
            return report_error(f"--summary: {reason}")
        if args.summary.resolve() in inputs:
            return report_error(f"--summary {args.summary} would overwrite an input: choose another file")
    reason = check_writable(args.out)
    if reason:
        return report_error(reason)
    if not paths:
        for msg in problems:
            print(f"error: {msg}", file=sys.stderr)
        return report_error("no input images or videos")
    if any(videos):
        from deeplab.engine.video import import_av

        try:
            import_av()
        except ImportError as e:
            first = next(p for p, v in zip(paths, videos) if v)
            return report_error(f"{first}: {e}")

    from deeplab.data.io import DEFAULT_MAX_PIXELS as DEFAULT_IMAGE_PIXELS
    from deeplab.engine.distributed import cleanup, init_distributed
    from deeplab.engine.inference import DEFAULT_MAX_PIXELS
    from deeplab.engine.backends import load_backend_bundle
    from deeplab.engine.segment import check_device

    try:
        device = check_device(args.device)
    except ValueError as e:
        return report_error(str(e))
    # Joined before the model loads: under torchrun each process takes its own GPU.
    info = init_distributed(device.split(":")[0], timeout=_GATHER_TIMEOUT)
    if device.startswith("cuda") and info.is_distributed:
        device = f"cuda:{info.local_rank}"
    try:
        bundle = load_backend_bundle(args.weights, backend=args.backend, model_name=args.model,
                                     precision=args.precision, device=device)
    except (FileNotFoundError, ValueError) as e:
        cleanup()
        return report_error(str(e))
    if bundle.num_classes > 256:
        cleanup()
        return report_error(
            f"{args.weights or 'the default model'} has {bundle.num_classes} classes but a label PNG "
            "holds at most 256 class indices: use deeplab.segment() from Python, which returns "
            "int32 labels for such models"
        )
    crf = None
    if args.crf:
        from deeplab.crf import DenseCRF

        crf = DenseCRF(**bundle.crf_params)

    def notice(msg: str) -> None:
        from tqdm import tqdm

        tqdm.write(f"notice: {msg}", file=sys.stderr)

    ctx = {
        "bundle": bundle, "crf": crf, "notice": notice,
        "max_pixels": DEFAULT_MAX_PIXELS if args.max_pixels is None else args.max_pixels,
        "max_image_pixels": DEFAULT_IMAGE_PIXELS if args.max_image_pixels is None else args.max_image_pixels,
    }
    if info.is_main:
        for msg in problems:
            print(f"skipped: {msg}", file=sys.stderr)
    everything = [_Input(i, p, s, v) for i, (p, s, v) in enumerate(zip(paths, stems, videos))]
    mine = everything[info.rank :: info.world_size]  # each input exactly once
    share = _Share(failures=list(problems) if info.is_main else [])
    _segment_images([x for x in mine if not x.video], args, ctx, share, progress=info.is_main)
    if share.fatal is None:
        _segment_videos([x for x in mine if x.video], args, ctx, share, progress=info.is_main)

    shares = _gather(share)
    status = 0
    if info.is_main:
        if args.summary is not None:
            try:
                _write_summary(args.summary, shares, bundle.class_names)
            except OSError as e:
                shares[0].fatal = f"writing the summary {args.summary} failed: {e}"
        n_images = sum(not x.video for x in everything)
        status = _report(args, shares, n_images, len(everything) - n_images)
        if args.summary is not None and status != 2:
            print(f"wrote {args.summary}")
    elif share.fatal:
        print(f"error: {share.fatal}", file=sys.stderr)
        status = 2
    # Every process exits with the run's status, after rank 0 has written the summary (torchrun
    # stops the others as soon as one process fails).
    status = _agree_on_status(status)
    cleanup()
    return status
