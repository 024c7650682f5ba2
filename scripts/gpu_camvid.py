#!/usr/bin/env python3
"""Train on CamVid on a lent GPU machine that takes a small upload and gives back small files.

The GPU machines lent to this project (docs/model-cards.md, "Training it on a lent GPU machine") take a working
tree of at most 64 MiB, run one command of at most 10 minutes and give back at most 8 files of
16 MiB each. CamVid's PNG images (91 MB for train) do not fit, nor does a ResNet-34 in float16
(43 MB) as one file. Three steps:

  pack    (here)   CamVid train and val as JPEG (quality 90, no chroma subsampling: 21 MiB for
                   train, 6 for val, 1.9 grey levels of mean error) with the original PNG
                   labels, in the camvid layout with its own list files, so ``--dataset camvid``
                   reads it unchanged.
  train   (there)  first the CUDA checks (the packaged model's val mIoU on the GPU in bf16 and
                   fp32 against the CPU in fp32, and the CRF's labels on the GPU against the
                   CPU's, each with its images/s: the CUDA paths no CPU machine can test); then
                   a probe of a few iterations measures the step time with the real data
                   loading, then one run whose max_iter fits what --deadline-s leaves, so the
                   poly schedule runs to its end inside the lease; then the last weights as float16 shards,
                   the run's config, metrics, log and a record.json (speeds, figures, shards'
                   sha256) in --out.
  unpack  (here)   the shards, checked against the record, joined into one safetensors file
                   with the run's metadata; config.yaml, metrics.jsonl and class_weights.json
                   beside it, ready for scripts/package_default_model.py.

Example (docs/camvid_model.md gives the device tool's command: the ``train`` line):
  python scripts/gpu_camvid.py pack --data-root ../shared/data/camvid_segnet --dst .gpu_pack
  PYTHONPATH=src python3 scripts/gpu_camvid.py train --pack .gpu_pack --out "$OUT" --deadline-s 540 \\
      --set model.name=deeplab_v2_resnet34
  python scripts/gpu_camvid.py unpack /path/to/returned/files --dst runs/gpu_r34/last.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from deeplab.fileio import atomic_open, sha256_file

_REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = _REPO / "configs" / "camvid_resnet18.yaml"
SPLITS = ("train", "val")
RECORD = "record.json"
MAX_RETURNED_FILES = 8
# Copied back beside the shards (record.json and the log make the rest of the tool's 8 files).
RUN_FILES = ("config.yaml", "metrics.jsonl")


# ---- pack ------------------------------------------------------------------------------------


def pack(data_root: Path, dst: Path, *, quality: int = 90, limit: int | None = None) -> int:
    """Write CamVid train/val as JPEG images + PNG labels under ``dst``; returns the bytes written."""
    from PIL import Image

    from deeplab.data import build_dataset

    if dst.exists():
        raise SystemExit(f"pack: {dst} exists; remove it first (it is only a transfer copy)")
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    total = 0
    for split in SPLITS:
        samples = build_dataset("camvid", data_root, split).samples[:limit]
        (tmp / split).mkdir(parents=True)
        (tmp / f"{split}annot").mkdir()
        lines = []
        for s in samples:
            image, mask = f"{split}/{s.id}.jpg", f"{split}annot/{s.id}.png"
            with Image.open(s.image) as im:
                im.convert("RGB").save(tmp / image, quality=quality, subsampling=0)
            shutil.copyfile(s.mask, tmp / mask)
            total += (tmp / image).stat().st_size + (tmp / mask).stat().st_size
            lines.append(f"{image} {mask}\n")
        (tmp / f"{split}.txt").write_text("".join(lines))
        print(f"{split}: {len(samples)} images", file=sys.stderr)
    tmp.rename(dst)  # a half-written pack never carries the final name
    return total


# ---- train (on the GPU machine) ----------------------------------------------------------------


def _seconds_per_iteration(metrics: Path, iterations: int) -> float:
    """Step time from the probe's log, its second half only (workers starting, cuDNN tuning)."""
    times = {r["iteration"]: r["time"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r}
    first = max(iterations // 2, 1)
    if iterations not in times or first not in times or first == iterations:
        raise SystemExit(f"train: the probe logged too few iterations in {metrics} to time a step")
    return (times[iterations] - times[first]) / (iterations - first)


def fit_iterations(seconds: float, step: float, margin: float = 0.1) -> int:
    """Iterations that fit ``seconds`` at ``step`` seconds each, ``margin`` of the time kept back
    (the probe may run on the fast side); at least 1. ``seconds`` is what the deadline leaves
    after the reserve for the run's start and end (class weights, loader workers, the two
    validations, the shards)."""
    return max(int((1.0 - margin) * seconds / step), 1)


def _shard(state: dict, limit_bytes: int) -> list[dict]:
    """Split a state dict, in its order, into pieces of at most ``limit_bytes`` (one tensor may exceed it)."""
    shards: list[dict] = [{}]
    size = 0
    for key, value in state.items():
        n = value.numel() * value.element_size()
        if shards[-1] and size + n > limit_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += n
    return shards


def cuda_checks(pack: Path, device: str, images: int) -> dict:
    """The packaged model and the CRF on ``device`` against the CPU, on the pack's first val images."""
    import numpy as np
    import torch

    from deeplab.crf import DenseCRF
    from deeplab.data import build_dataset
    from deeplab.engine.evaluate import evaluate
    from deeplab.engine.inference import predict_probs, prepare_model
    from deeplab.weights import build_from_weights, default_weights_path

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    model, meta = build_from_weights(default_weights_path())
    val = build_dataset("camvid", pack, "val")
    norm = meta["normalization"]
    out: dict = {"device": device}
    for row, where, precision in (("cpu_fp32", "cpu", "fp32"), ("device_fp32", device, "fp32"),
                                  ("device_auto", device, "auto")):
        r = evaluate(model, val, normalization=norm, precision=precision, device=where, limit=images)
        out[row] = {"miou": r["miou"], "images_per_s": r["images_per_s"], "precision": r["precision"]}
    crf = DenseCRF(**meta["crf"])
    cpu_model = prepare_model(model, precision="fp32")
    agree, pixels, seconds = 0, 0, 0.0
    for i in range(min(images, len(val))):
        image, _ = val[i]
        probs = predict_probs(cpu_model, image, normalization=norm, precision="fp32")[0]
        reference = crf(image, probs.numpy()).argmax(0)
        gpu_probs, gpu_image = probs.to(device), torch.from_numpy(np.ascontiguousarray(image)).to(device)
        crf(gpu_image, gpu_probs)  # the first call per size builds and caches the positional kernel
        sync()
        t0 = time.perf_counter()
        labels = crf(gpu_image, gpu_probs).argmax(0)
        sync()
        seconds += time.perf_counter() - t0
        agree += int((labels.cpu().numpy() == reference).sum())
        pixels += reference.size
    out["crf_label_agreement"] = agree / pixels
    out["crf_images_per_s"] = min(images, len(val)) / seconds
    return out


def run_training(args: argparse.Namespace) -> dict:
    """Check, probe, train within the deadline, evaluate at output stride 8, write the shards."""
    import torch

    from deeplab.data import build_dataset
    from deeplab.engine.config import load_config
    from deeplab.engine.evaluate import evaluate
    from deeplab.engine.train import train
    from deeplab.weights import build_from_weights, half_state_dict, save_state_dict
    from deeplab.weights.safetensors_io import read_safetensors

    out, work = Path(args.out), Path(args.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    # Fixed crop sizes: cuDNN's autotuner picks each convolution's fastest kernel once.
    torch.backends.cudnn.benchmark = True
    workers = args.workers if args.workers is not None else max(1, min((os.cpu_count() or 2) - 2, 12))
    base = [f"data.root={args.pack}", f"data.num_workers={workers}", "val_interval=0",
            "checkpoint_interval=0", "log_interval=10", *args.overrides]
    record: dict = {"torch": torch.__version__,
                    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                    "deadline_s": args.deadline_s}

    def save_record() -> None:  # after each stage: a command stopped at its limit still returns it
        with atomic_open(out / RECORD, "w") as f:
            json.dump(record, f, indent=1)

    t0 = time.perf_counter()
    if args.checks == "on" or (args.checks == "auto" and torch.cuda.is_available()):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            record["checks"] = cuda_checks(args.pack, device, args.check_images)
        except Exception as e:  # a broken CUDA path is a finding, not a reason to skip the training
            record["checks_error"] = f"{type(e).__name__}: {e}"
        record["checks_s"] = round(time.perf_counter() - t0, 1)
        print("checks: " + json.dumps(record.get("checks") or record.get("checks_error")), file=sys.stderr)
        save_record()
    t_probe = time.perf_counter()
    probe = load_config(args.config, [*base, f"solver.max_iter={args.probe_iters}", "data.val_split=null",
                                      "log_interval=1"])
    train(probe, work / "probe", progress=False)
    step = _seconds_per_iteration(work / "probe" / "metrics.jsonl", args.probe_iters)
    left = args.deadline_s - (time.perf_counter() - t0) - args.reserve_s
    max_iter = fit_iterations(left, step)
    record.update(probe_s=round(time.perf_counter() - t_probe, 1), seconds_per_iteration=round(step, 4),
                  max_iter=max_iter)
    save_record()
    print(f"probe: {step:.4f} s per iteration -> max_iter {max_iter} for {left:.0f} s", file=sys.stderr)

    cfg = load_config(args.config, [*base, f"solver.max_iter={max_iter}"])
    summary = train(cfg, work / "run", progress=False)
    record.update(train_s=round(summary["seconds"], 1), final_loss=summary["loss"],
                  val_miou_as_trained=summary["best_miou"],
                  global_batch=cfg.solver.batch_size * cfg.solver.iter_size)
    last = work / "run" / "last.safetensors"

    if cfg.data.val_split:
        # The figure the CPU machine will measure (stride 8), though on the pack's JPEG images.
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, meta = build_from_weights(last, output_stride=8)
        val = build_dataset("camvid", args.pack, cfg.data.val_split)
        metrics = evaluate(model.to(device), val, normalization=meta["normalization"], device=device)
        record["val_miou_stride8_jpeg"] = metrics["miou"]
        print(f"val mIoU at output stride 8 (JPEG val images, no logit adjustment): {100 * metrics['miou']:.2f}",
              file=sys.stderr)

    state, meta = read_safetensors(last)
    pieces = _shard(half_state_dict(state), int(args.shard_mb * 2**20))
    names = [f"weights-{i}-of-{len(pieces)}.safetensors" for i in range(len(pieces))]
    for name, piece in zip(names, pieces):
        save_state_dict(piece, out / name, meta)
    for name in RUN_FILES:
        shutil.copyfile(work / "run" / name, out / name)
    weights_json = work / "run" / "class_weights.json"
    record["class_weights"] = json.loads(weights_json.read_text()) if weights_json.is_file() else None
    record["shards"] = {name: sha256_file(out / name) for name in names}
    record["total_s"] = round(time.perf_counter() - t0, 1)
    save_record()
    returned = len(names) + len(RUN_FILES) + 2  # + record.json and the command's log
    if returned > MAX_RETURNED_FILES:
        print(f"warning: {returned} files to return, the device tool gives back {MAX_RETURNED_FILES}: "
              "raise --shard-mb (at most 15)", file=sys.stderr)
    print(json.dumps({k: v for k, v in record.items() if k not in ("shards", "class_weights")}), file=sys.stderr)
    return record


# ---- unpack ----------------------------------------------------------------------------------


def unpack(src: Path, dst: Path) -> Path:
    """Join the shards listed in ``src/record.json`` (sha256 checked) into ``dst``."""
    from deeplab.weights import save_state_dict
    from deeplab.weights.safetensors_io import read_safetensors

    record_path = src / RECORD
    if not record_path.is_file():
        raise SystemExit(f"unpack: {record_path} is missing; point at the folder the train step's --out came back to")
    record = json.loads(record_path.read_text())
    state: dict = {}
    meta: dict = {}
    for name, digest in record["shards"].items():
        path = src / name
        if not path.is_file() or sha256_file(path) != digest:
            raise SystemExit(f"unpack: {path} is missing or differs from the record's sha256; fetch it again")
        piece, meta = read_safetensors(path)
        state.update(piece)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_state_dict(state, dst, meta)
    for name in RUN_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst.parent / name)
    if record.get("class_weights"):
        (dst.parent / "class_weights.json").write_text(json.dumps(record["class_weights"], indent=1))
    return dst


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="CamVid as JPEG + PNG labels for the upload")
    p.add_argument("--data-root", type=Path, required=True, help="the SegNet CamVid folder")
    p.add_argument("--dst", type=Path, required=True, help="the pack folder (ignored by git: .gpu_pack)")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--limit", type=int, default=None, help="first N images of each split (tests)")
    t = sub.add_parser("train", help="check, probe, train within --deadline-s, shard the weights into --out")
    t.add_argument("--pack", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True, help="where the returned files go ($OUT)")
    t.add_argument("--deadline-s", type=float, required=True,
                   help="wall time of the whole command: the main run gets what the checks and the probe leave")
    t.add_argument("--reserve-s", type=float, default=90.0,
                   help="kept back from the deadline for the main run's start and end")
    t.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, as for deeplab train (repeatable)")
    t.add_argument("--probe-iters", type=int, default=30)
    t.add_argument("--checks", choices=("auto", "on", "off"), default="auto",
                   help="the CUDA checks before training (auto: where CUDA is available)")
    t.add_argument("--check-images", type=_positive_int, default=8, help="val images for the checks")
    t.add_argument("--workers", type=int, default=None, help="data loader processes (default: cores - 2, at most 12)")
    t.add_argument("--shard-mb", type=float, default=15.0, help="largest shard in MiB (the tool returns <= 16)")
    t.add_argument("--work-dir", type=Path, default=Path("/tmp/deeplab_gpu_run"), help="run folders (emptied first)")
    u = sub.add_parser("unpack", help="join the returned shards into one safetensors file")
    u.add_argument("src", type=Path, help="the folder holding record.json and the shards")
    u.add_argument("--dst", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "pack":
        size = pack(args.data_root, args.dst, quality=args.quality, limit=args.limit)
        print(f"{args.dst}: {size / 2**20:.1f} MiB", file=sys.stderr)
    elif args.command == "train":
        run_training(args)
    else:
        print(unpack(args.src, args.dst), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
