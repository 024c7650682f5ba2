"""Train a DeepLab model from a YAML config with the paper's protocol.

The config (see configs/ and docs) names the model, the data set and the solver; any key can be
overridden with --set (values are YAML). The run folder receives the fully resolved config.yaml,
checkpoints/ (weights as safetensors plus the optimiser / RNG state), last.safetensors,
best.safetensors and best.json (best validation mIoU), and metrics.jsonl.

Examples:
  deeplab train configs/camvid_resnet18.yaml --out runs/camvid_r18
  deeplab train configs/camvid_resnet18.yaml --out runs/camvid_r18 --resume
  deeplab train configs/voc12_resnet101_aspp_l_msc.yaml --out runs/voc --set data.root=/data/VOC2012
  torchrun --nproc_per_node 2 -m deeplab.cli train configs/camvid_resnet18.yaml --out runs/ddp

Under torchrun, solver.batch_size is per process: the global batch is
batch_size x iter_size x number of processes. Exit status: 0 done, 2 bad config / data /
checkpoint, 3 diverged (NaN / inf loss; the last good checkpoint is kept).
"""

from __future__ import annotations

import argparse
import os
import sys

from deeplab.cli.common import report_error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Attach the ``train`` options to ``parser``."""
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("--out", required=True, help="run folder (created)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set solver.base_lr=1e-3 (repeatable)",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue the run in --out from its newest checkpoint (or from the given iter_N.pt)",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar: one log line every log_interval iterations instead (for log files)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    """Run ``deeplab train``; returns the exit status."""
    from deeplab.engine.config import ConfigError, config_to_dict, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        return report_error(str(e))
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None), end="")
        return 0

    from deeplab.engine.checkpoint import CheckpointError
    from deeplab.engine.train import TrainingDiverged, TrainingError, train

    try:
        summary = train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (TrainingError, CheckpointError) as e:
        return report_error(str(e))
    if os.environ.get("RANK", "0") != "0":  # under torchrun the main process reports
        return 0
    best = summary["best_miou"]
    best_txt = f", best val mIoU {100 * best:.2f}% at iteration {summary['best_iteration']}" if best is not None else ""
    print(
        f"done: {summary['iteration']} iterations in {summary['seconds']:.0f} s, last loss "
        f"{summary['loss']:.4f}{best_txt}; weights {summary['last_weights']}",
        file=sys.stderr,
    )
    return 0
