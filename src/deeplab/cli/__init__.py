"""The ``deeplab`` command line tool: one module per subcommand.

Each subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int`` (the exit
status). The table below is the single list of subcommands; modules import heavy libraries
inside ``run`` so that ``deeplab --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). An explicit table, not a registry filled by import side effects.
_COMMANDS: dict[str, tuple[str, str]] = {
    "segment": ("deeplab.cli.segment", "segment images and write label maps and overlays"),
    "eval": ("deeplab.cli.evaluate", "evaluate a model on a data set (mIoU and friends)"),
    "train": ("deeplab.cli.train", "train a model from a YAML config (the paper's protocol)"),
    "crf": ("deeplab.cli.crf", "refine saved probabilities with the fully connected CRF"),
    "crf-search": ("deeplab.cli.crf_search", "grid-search the CRF parameters on validation images"),
    "calibrate-bn": ("deeplab.cli.calibrate_bn", "re-estimate batch-norm statistics on whole training images"),
    "average-weights": ("deeplab.cli.average_weights", "average checkpoints of one network (SWA, model soups)"),
    "convert": ("deeplab.cli.convert", "convert Caffe / PyTorch weights to the project's safetensors"),
    "export": ("deeplab.cli.export", "export a model to ONNX"),
    "package": ("deeplab.cli.package", "package a finished training run as one weights file with its card's figures"),
    "models": ("deeplab.cli.models", "list the model names build_model accepts"),
    "serve": ("deeplab.cli.serve", "serve a model over HTTP: a JSON API and a page to try it in a browser"),
}


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every subcommand attached."""
    parser = argparse.ArgumentParser(
        prog="deeplab",
        description="DeepLab v1/v2/v3/v3+ semantic segmentation: atrous convolution, ASPP, "
        "multi-scale inputs, the fully connected CRF and the v3+ encoder-decoder.",
        epilog="Run 'deeplab COMMAND --help' for a command's options and examples.",
        formatter_class=_Formatter,
    )
    from deeplab import __version__

    parser.add_argument("--version", action="version", version=f"deeplab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in _COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=help_text,
            description=(module.__doc__ or help_text).strip(),
            formatter_class=_Formatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``deeplab`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
