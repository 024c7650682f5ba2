"""Package a finished training run as one weights file with its card's figures.

Reads RUN/final.safetensors (written by deeplab train at the end of a schedule with weight
averaging or batch-norm re-estimation; else the last checkpoint, once the schedule is done) and
RUN's config.yaml, stores the weights as float16 (or int8 convolutions with --int8; batch-norm
statistics stay float32), sets the output stride used at inference, the CRF parameters
(--crf-json: a 'deeplab crf-search --json' output, else the defaults) and a record: the run's
iterations, config and final figures, and, unless --no-eval, the packaged file's mIoU on
--split of the run's data set three ways (plain, with the CRF, with the flip) - the figures of
its model card, measured on the very file written. This is the single look at that split that
the recipe's selection protocol allows.

Examples:
  deeplab package runs/camvid --out camvid.safetensors --output-stride 8
  deeplab package runs/camvid --out camvid.safetensors --crf-json crf.json --split val --data-root data/CamVid
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from deeplab.cli.common import add_precision_argument, check_output_file, report_error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Attach the ``deeplab package`` options."""
    parser.add_argument("run", type=Path, help="a finished run folder of deeplab train")
    parser.add_argument("--out", type=Path, required=True, help="destination .safetensors")
    parser.add_argument("--output-stride", type=int, choices=(8, 16, 32), default=None,
                        help="output stride at inference (default: the one trained at)")
    parser.add_argument("--crf-json", type=Path, default=None,
                        help="CRF parameters: a 'deeplab crf-search --json' output (its best setting)")
    parser.add_argument("--int8", action="store_true",
                        help="int8 convolution weights with a scale per output channel (half a float16 file)")
    parser.add_argument("--split", default="val", help="the split the card's figures are measured on")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="the data set's folder (default: the run config's data.root)")
    parser.add_argument("--no-eval", action="store_true", help="package without measuring the card's figures")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for the evaluation")
    add_precision_argument(parser)


def _record_of_run(run: Path, cfg) -> dict:
    """What the run folder says about itself: iterations, the recipe, its final validation."""
    from deeplab.engine.config import config_to_dict

    record: dict = {"run": run.name, "iterations": cfg.solver.max_iter, "config": config_to_dict(cfg)}
    final = run / "final.json"
    if final.is_file():
        record["final"] = json.loads(final.read_text())
    return record


def _finished_weights(run: Path, max_iter: int) -> Path:
    """final.safetensors (the recipe's end: averaged, BN re-estimated), else the last checkpoint of a
    schedule without those steps, once it reached ``max_iter``."""
    from deeplab.weights import read_metadata

    if (run / "final.safetensors").is_file():
        return run / "final.safetensors"
    last = run / "last.safetensors"
    done = read_metadata(last).get("iteration") if last.is_file() else None
    if done == max_iter:
        return last
    raise FileNotFoundError(
        f"no final weights: the run stopped at iteration {done or 0} of {max_iter}; finish it with "
        f"'deeplab train {run / 'config.yaml'} --out {run} --resume'")


def _percent(value: float) -> float | None:
    """A fraction as a percentage with two decimals; None for NaN (a class absent from the split)."""
    return None if value != value else round(100 * float(value), 2)


def run(args: argparse.Namespace) -> int:
    from deeplab.engine.config import ConfigError, load_config, resolve_data_root
    from deeplab.weights import half_state_dict, int8_state_dict, read_metadata, save_state_dict
    from deeplab.weights.loading import read_state_dict

    if not args.run.is_dir():
        return report_error(f"{args.run} is not a folder: give the run folder of deeplab train --out")
    reason = check_output_file(args.out)
    if reason:
        return report_error(f"--out: {reason}")
    try:
        cfg = load_config(args.run / "config.yaml")
        weights = _finished_weights(args.run, cfg.solver.max_iter)
        meta = read_metadata(weights)
        state, _, _ = read_state_dict(weights)
        crf = json.loads(args.crf_json.read_text())["best"] if args.crf_json else None
    except (ConfigError, OSError, ValueError, KeyError) as e:
        return report_error(f"{args.run}: {e}")

    state = int8_state_dict(state) if args.int8 else half_state_dict(state)
    if args.output_stride:
        meta["model_kwargs"] = {**meta.get("model_kwargs", {}), "output_stride": args.output_stride}
    if crf is not None:
        meta["crf"] = crf
    if "miou" in meta:  # the run's own validation, at its stride: not the packaged file's figure
        meta["train_val_miou"] = meta.pop("miou")
    meta["record"] = _record_of_run(args.run, cfg)
    meta["source"] = f"deeplab train ({args.run.name}), packaged by deeplab package"
    save_state_dict(state, args.out, meta)
    if args.no_eval:
        print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB), without figures (--no-eval)")
        return 0

    from deeplab.crf import DenseCRF
    from deeplab.data import build_dataset
    from deeplab.engine.evaluate import evaluate
    from deeplab.engine.segment import load_bundle

    root = args.data_root or resolve_data_root(cfg.data.root)
    try:
        dataset = build_dataset(cfg.data.dataset, root, args.split)
        bundle = load_bundle(args.out, precision=args.precision, device=args.device)
    except (ValueError, FileNotFoundError, OSError) as e:
        return report_error(f"{e} (the card's figures; --no-eval skips them)")
    figures: dict = {"split": args.split, "images": len(dataset), "precision": bundle.precision}
    for name, options in (("plain", {}), ("crf", {"crf": DenseCRF(**bundle.crf_params)}), ("flip", {"flip": True})):
        t0 = time.perf_counter()
        result = evaluate(bundle.model, dataset, normalization=bundle.normalization, precision=bundle.precision,
                          device=args.device, optimize=False, input_scale=bundle.scale_for(None), **options)
        figures[name] = {"miou": _percent(result["miou"]), "pixel_acc": _percent(result["pixel_acc"]),
                         "per_class_iou": [_percent(v) for v in result["per_class_iou"]]}
        print(f"{args.split} mIoU ({name}): {figures[name]['miou']:.2f} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr)
    meta["record"]["figures"] = figures
    save_state_dict(state, args.out, meta)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB): {args.split} mIoU "
          f"{figures['plain']['miou']:.2f}, with the CRF {figures['crf']['miou']:.2f}, "
          f"with flip {figures['flip']['miou']:.2f}")
    return 0
