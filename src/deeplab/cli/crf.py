"""Refine saved probabilities (or logits) with the fully connected CRF and write label PNGs.

For every image ``IMAGES/<id>.<jpg|png|...>`` the command reads ``PROBS/<id>.npy`` or
``PROBS/<id>.npz`` (the one array in it, or the array named ``probs`` / ``logits``): a
(C, H, W) float16/float32/float64 array of softmax probabilities at the image's size (what
'deeplab eval --save-probs DIR' writes), or logits with --logits (a softmax over C is applied).
It writes ``OUT/<id>.png``: a palette PNG of the CRF's argmax labels (--palette voc, camvid,
or none for a grayscale PNG of class indices), atomically. Work is spread over --workers
processes (default: every core); with --workers 1 the CRF uses every core itself. On a GPU
(--device cuda) same-size images are refined --batch at a time (default 16). The exit
status is non-zero when any image failed, and the failures are listed.

Examples:
  deeplab eval --dataset voc12 --data-root VOC2012 --split val --save-probs probs/
  deeplab crf --images VOC2012/JPEGImages --probs probs/ --out crf_labels/
  deeplab crf --images frames/ --probs logits/ --logits --out labels/ --palette camvid \\
      --bi-w 5 --bi-xy-std 21 --bi-rgb-std 3 --pos-w 4 --pos-xy-std 1 --workers 2
  deeplab crf --images frames/ --probs probs/ --out labels/ --device cuda --batch 32
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from deeplab.cli.common import IMAGE_SUFFIXES, check_writable, overwritten_input, report_error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, type=Path, metavar="DIR", help="folder of RGB images")
    parser.add_argument("--probs", required=True, type=Path, metavar="DIR",
                        help="folder of <id>.npy / <id>.npz (C, H, W) probabilities (or logits with --logits)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the <id>.png label maps")
    parser.add_argument("--logits", action="store_true", help="the arrays are logits: apply a softmax over C first")
    parser.add_argument("--palette", choices=("voc", "camvid", "none"), default="voc",
                        help="colours of the label PNGs (none: grayscale class indices)")
    parser.add_argument("--bi-w", type=float, default=4.0, help="bilateral kernel weight (w1)")
    parser.add_argument("--bi-xy-std", type=float, default=67.0, help="bilateral spatial std (sigma_alpha, pixels)")
    parser.add_argument("--bi-rgb-std", type=float, default=3.0, help="bilateral colour std (sigma_beta)")
    parser.add_argument("--pos-w", type=float, default=3.0, help="smoothness kernel weight (w2)")
    parser.add_argument("--pos-xy-std", type=float, default=1.0, help="smoothness spatial std (sigma_gamma, pixels)")
    parser.add_argument("--iterations", type=int, default=10, help="mean-field iterations")
    parser.add_argument("--clip", type=float, default=1e-5, help="probabilities are clipped to [clip, 1] before -log")
    parser.add_argument("--fp32-lattice", action="store_true",
                        help="filter in float32 throughout (Q within ~1e-5 of pydensecrf's; the float16 "
                             "default is ~1.4x faster in the iterations, same labels to 99.99 %%)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes (default: the number of cores; 1: in this process, all threads)")
    parser.add_argument("--device", default="cpu",
                        help="torch device for the CRF (cuda runs in this process, --batch images at a time)")
    parser.add_argument("--batch", type=int, default=None,
                        help="images of one size refined together as one batch (default: 16 on a GPU, "
                             "1 on the CPU, where --workers processes run images in parallel instead)")
    parser.add_argument("--overwrite", action="store_true", help="redo images whose PNG already exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _find_pairs(images: Path, probs: Path) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    pairs, missing = [], []
    seen: dict[str, Path] = {}
    for path in sorted(images.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
            continue
        if path.stem in seen:  # both would read <id>.npy and write <id>.png, the second over the first
            missing.append(f"{path.name}: {seen[path.stem].name} has the same id {path.stem!r}, and an id has "
                           "one probability file and one output; move one of them to another folder")
            continue
        seen[path.stem] = path
        for suffix in (".npy", ".npz"):
            candidate = probs / f"{path.stem}{suffix}"
            if candidate.is_file():
                pairs.append((path.stem, path, candidate))
                break
        else:
            missing.append(f"{path.name}: no {path.stem}.npy or {path.stem}.npz in {probs}")
    return pairs, missing


def _load_array(path: Path):
    import numpy as np

    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            keys = list(data.keys())
            for key in ("probs", "logits"):
                if key in keys:
                    return data[key]
            if len(keys) != 1:
                raise ValueError(f"{path}: holds arrays {keys}; name one 'probs' or 'logits' (or store one array)")
            return data[keys[0]]
    return np.load(path, allow_pickle=False)


def _crf_kwargs(args: argparse.Namespace) -> dict:
    return {
        "bi_w": args.bi_w,
        "bi_xy_std": args.bi_xy_std,
        "bi_rgb_std": args.bi_rgb_std,
        "pos_w": args.pos_w,
        "pos_xy_std": args.pos_xy_std,
        "iterations": args.iterations,
        "clip": args.clip,
        "lattice_fp16": not args.fp32_lattice,
    }


_WORKER: dict = {}


def _init_worker(crf_kwargs: dict, threads: int, device: str = "cpu") -> None:
    import torch

    from deeplab.crf import DenseCRF

    torch.set_num_threads(threads)
    _WORKER["crf"] = DenseCRF(**crf_kwargs)
    _WORKER["device"] = torch.device(device)


def _prepare(job: tuple[str, Path, Path, Path, bool, str]):
    """Read and check one job's image and probabilities: (uint8 (H, W, 3), float (C, H, W))."""
    import numpy as np

    from deeplab.data.io import read_image

    _, image_path, probs_path, _, logits, _ = job
    image = read_image(image_path)
    arr = _load_array(probs_path)
    if arr.dtype not in (np.float16, np.float32, np.float64) or arr.ndim != 3:
        raise ValueError(f"{probs_path}: expected a (C, H, W) float array, got {arr.shape} {arr.dtype}")
    if arr.shape[0] > 256:  # labels above 255 would wrap around in the 8-bit PNG
        raise ValueError(f"{probs_path}: {arr.shape[0]} classes do not fit a label PNG, which holds "
                         "at most 256 class indices")
    if arr.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"{probs_path}: probabilities {arr.shape} do not match the image {image_path.name} "
            f"{image.shape}: save them at the image's size (C, {image.shape[0]}, {image.shape[1]})"
        )
    if logits:
        x = arr.astype(np.float32)
        x -= x.max(0, keepdims=True)
        np.exp(x, out=x)
        x /= x.sum(0, keepdims=True)
        arr = x
    elif np.isfinite(arr).all() and (arr.min() < -1e-3 or arr.max() > 1 + 1e-3):
        raise ValueError(f"{probs_path}: values in [{arr.min():.3g}, {arr.max():.3g}] are not probabilities; "
                         "pass --logits for logits")
    # float16 is refined in float32 either way; float64 stays float64.
    return image, arr if arr.dtype == np.float64 else arr.astype(np.float32, copy=False)


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def _process(jobs: list[tuple[str, Path, Path, Path, bool, str]]) -> list[tuple[str, str | None]]:
    """Run a chunk of images; return (id, error message or None) for each. Never raises for bad files.

    Images of the same size, label count and dtype go through the CRF as one batch (one
    lattice for all of them, with the image index in its keys: the same labels as one by one).
    """
    import numpy as np
    import torch

    from deeplab.data.io import write_label_png
    from deeplab.data.palettes import CAMVID_PALETTE, voc_palette

    results: list[tuple[str, str | None]] = []
    groups: dict[tuple, list] = {}
    for job in jobs:
        try:
            image, arr = _prepare(job)
        except Exception as exc:  # noqa: BLE001 - reported per file, the run goes on
            results.append((job[0], _error(exc)))
            continue
        groups.setdefault((arr.shape, arr.dtype), []).append((job, image, arr))
    device = _WORKER["device"]
    # One --palette for the whole run, so for every job of the chunk.
    palette = {"voc": voc_palette(256), "camvid": CAMVID_PALETTE, "none": None}[jobs[0][5]] if jobs else None
    for items in groups.values():
        try:
            images = torch.from_numpy(np.stack([image for _, image, _ in items])).to(device)
            probs = torch.from_numpy(np.stack([arr for _, _, arr in items])).to(device)
            labels = _WORKER["crf"](images, probs).argmax(1).to(torch.uint8).cpu().numpy()
        except Exception as exc:  # noqa: BLE001
            results += [(job[0], _error(exc)) for job, _, _ in items]
            continue
        for (job, _, _), lab in zip(items, labels):
            sample_id, out_path = job[0], job[3]
            try:
                write_label_png(out_path, lab, palette)
                results.append((sample_id, None))
            except Exception as exc:  # noqa: BLE001
                results.append((sample_id, _error(exc)))
    return results


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from deeplab.crf import DenseCRF

    for name in ("images", "probs"):
        folder = getattr(args, name)
        if not folder.is_dir():
            return report_error(f"--{name} {folder} is not a folder")
    try:
        crf_kwargs = _crf_kwargs(args)
        DenseCRF(**crf_kwargs)
    except ValueError as exc:
        return report_error(str(exc))
    cores = os.cpu_count() or 1
    workers = cores if args.workers is None else args.workers
    if workers < 1:
        return report_error(f"--workers must be >= 1, got {workers}")
    pairs, failures = _find_pairs(args.images, args.probs)
    if not pairs:
        return report_error(f"no image in {args.images} has probabilities in {args.probs} (<id>.npy or <id>.npz)")
    inputs = {p.resolve(): p for p in args.images.iterdir()}
    hit = overwritten_input(args.out, inputs, [f"{sid}.png" for sid, _, _ in pairs])
    if hit is not None:
        return report_error(f"--out {args.out} would overwrite input {hit}: choose another --out")
    reason = check_writable(args.out)
    if reason:
        return report_error(reason)
    jobs = [
        (sid, image, probs, args.out / f"{sid}.png", args.logits, args.palette)
        for sid, image, probs in pairs
        if args.overwrite or not (args.out / f"{sid}.png").exists()
    ]
    try:
        device = torch.device(args.device)
        if device.type != "cpu":
            torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as exc:
        return report_error(f"--device {args.device} is not usable here: {exc}")
    if device.type != "cpu":
        workers = 1  # one process owns the GPU
    batch = args.batch if args.batch is not None else (16 if device.type != "cpu" else 1)
    if batch < 1:
        return report_error(f"--batch must be >= 1, got {batch}")
    chunks = [jobs[i:i + batch] for i in range(0, len(jobs), batch)]
    workers = min(workers, max(1, len(chunks)))
    errors: list[str] = []
    bar = tqdm(total=len(jobs), unit="img", disable=args.no_progress, desc="crf")

    def collect(results: list[tuple[str, str | None]]) -> None:
        errors.extend(f"{sid}: {err}" for sid, err in results if err)
        bar.update(len(results))

    if workers == 1:
        _init_worker(crf_kwargs, torch.get_num_threads(), args.device)
        for results in map(_process, chunks):
            collect(results)
    else:
        import multiprocessing as mp

        # One thread a process: images in parallel scale better than threads inside one image.
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(crf_kwargs, 1)) as pool:
            for results in pool.imap_unordered(_process, chunks):
                collect(results)
    bar.close()
    failures += errors
    done = len(jobs) - len(errors)
    print(f"wrote {done} label maps to {args.out} ({len(pairs) - len(jobs)} already there)")
    if failures:
        print(f"error: {len(failures)} image(s) failed:", file=sys.stderr)
        for line in failures:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0
