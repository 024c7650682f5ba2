"""Helpers shared by the subcommands: the user-error report, output checks, common options.

Every subcommand reports an error the user can fix with :func:`report_error` (``error: ...`` on
stderr, exit status 2, the status argparse uses for bad options), so scripts can tell a user
error (2) from skipped inputs (1) and a diverged training run (3).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

# The files a folder argument of segment and crf picks up (read_image decodes each to RGB).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# The files a folder argument of segment picks up as videos (decoded by PyAV, deeplab.engine.video).
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".mts",
                  ".m2ts", ".flv", ".wmv", ".3gp", ".ogv")


def parse_scales(text: str | None) -> tuple[float, ...] | None:
    """Parse ``"0.5,0.75"`` into ``(0.5, 0.75)``; None or empty gives None."""
    if not text:
        return None
    try:
        scales = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--msc {text!r}: expected comma-separated scales such as 0.5,0.75"
        ) from None
    if not scales or any(not (0 < s) for s in scales):
        raise argparse.ArgumentTypeError(f"--msc {text!r}: scales must be positive numbers")
    return tuple(s for s in scales if s != 1.0) or None


def _positive_scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--input-scale {text!r}: expected a positive number such as 1.5")
    return value


def add_input_scale_argument(parser: argparse.ArgumentParser) -> None:
    """``--input-scale``, shared by segment, eval and crf-search (None: the weights' own)."""
    parser.add_argument("--input-scale", type=_positive_scale, default=None, metavar="S",
                        help="resize images by S for the network (the output stays full size); "
                        "unset: the weights' input_scale, else 1")


def add_msc_arguments(parser: argparse.ArgumentParser) -> None:
    """``--msc`` and ``--msc-fusion``, shared by segment, eval and crf-search."""
    parser.add_argument("--msc", type=parse_scales, default=None, metavar="S1,S2",
                        help="extra input scales fused with scale 1, e.g. 0.5,0.75 (v2) or 0.5,0.75,1.25,1.5,1.75 (v3)")
    parser.add_argument("--msc-fusion", choices=("max", "mean"), default=None,
                        help="how --msc scales are fused: max (the v2 paper) or mean (the v3 / v3+ papers); "
                             "unset: the model family's own")


def at_least(flag: str, kind: type, low: float, example: str):
    """An argparse ``type`` for ``flag``: a ``kind`` (int or float) of at least ``low``; the error
    names the flag, the text and an example."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value >= low:  # also refuses NaN
            whole = "whole " if kind is int else ""
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: expected a {whole}number >= {low:g} such as {example}")
        return value

    return parse


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    """``--backend``, shared by segment, eval, crf-search and serve."""
    parser.add_argument("--backend", choices=("torch", "onnxruntime", "openvino"), default="torch",
                        help="what runs the network: PyTorch, or the exported ONNX graph (--weights X.onnx, or any "
                             "weights, exported once into ~/.cache/deeplab/onnx) on ONNX Runtime or OpenVINO; "
                             "the pre- and post-processing are the same")


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    """``--precision``, shared by segment, eval and crf-search."""
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="network precision; auto: bf16 where the device computes it natively (AVX512_BF16 / AMX "
                             "CPUs, Ampere+ GPUs), else fp32 (softmax is always fp32)")


def report_error(msg: str) -> int:
    """Print ``error: msg`` to stderr and return exit status 2 (every subcommand's user error)."""
    print(f"error: {msg}", file=sys.stderr)
    return 2


def check_writable(out: Path) -> str | None:
    """None if ``out`` can be created and written to, else the reason."""
    if out.exists() and not out.is_dir():
        return f"cannot create the folder {out}: {out} exists and is not a folder"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create the folder {out}: {e.strerror or e}"
    try:
        with tempfile.NamedTemporaryFile(dir=out, prefix=".deeplab-write-test-"):
            pass
    except OSError as e:
        return f"output folder {out} is not writable ({e.strerror or e}): choose another --out"
    return None


def overwritten_input(out: Path, inputs: dict[Path, Path], names: list[str]) -> Path | None:
    """The input that writing ``names`` into ``out`` would replace, if any (``inputs``: each
    input file by its resolved path)."""
    for name in names:
        hit = inputs.get((out / name).resolve())
        if hit is not None:
            return hit
    return None


def check_output_file(path: Path, suffix: str | None = None) -> str | None:
    """None if the file ``path`` can be written (its folder is created), else the reason.

    For single-file outputs (--json, weights, ONNX), checked before the work starts so that
    nothing computed is lost at the end; ``suffix`` (e.g. ``".safetensors"``) is required if given.
    """
    if suffix is not None and path.suffix.lower() != suffix:
        return f"{path} must end with {suffix}"
    if path.is_dir():
        return f"{path} is a folder: give a file name inside it"
    reason = check_writable(path.parent)
    return None if reason is None else f"cannot write {path}: {reason}"
