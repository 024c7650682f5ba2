"""Export a model to ONNX (fp32): input 'image' (B,3,H,W) normalised, output 'logits' at the
network's stride (v1 / v2 / v3: the output stride; v3+: 4).

The graph is the single-scale network, as model(x) in PyTorch: logits at the network's stride,
without upsampling, softmax or multi-scale fusion (metadata_props say how to upsample:
``logits_stride``, ``align_corners``). The weights' metadata (model, classes,
normalisation) is stored in the ONNX metadata_props. Files without metadata (.pth, .caffemodel)
need --model (and --num-classes unless the classifier tells).

--int8 writes the graph quantized to int8 instead (NNCF post-training quantization, QDQ ONNX that
ONNX Runtime and OpenVINO run with int8 kernels), calibrated on --calibration-images images of
--calibration (training images, never the evaluation split), pre-processed as the graph expects
(at their own size with --dynamic, resized to --height x --width otherwise). Needs
pip install 'deeplab[int8]'; docs/deployment.md says what it costs in accuracy and gains in speed.

Examples:
  deeplab export --weights voc_resnet101.safetensors --out deeplab.onnx
  deeplab export --model deeplab_v2_resnet101 --weights train_iter_20000.caffemodel --out voc.onnx \\
      --height 513 --width 513
  deeplab export --weights camvid.safetensors --out camvid.onnx --dynamic --opset 17
  deeplab export --out camvid_int8.onnx --dynamic --int8 --calibration data/CamVid/train
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import tempfile
import time
from pathlib import Path

from deeplab.cli.common import check_output_file, report_error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Attach the ``deeplab export`` options."""
    parser.add_argument("--model", default=None,
                        help="model name; taken from the weights' metadata when omitted (required for .pth/.caffemodel)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="weights file, or a packaged model by name (camvid-v2); the packaged default model when omitted")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="class count, for weights without metadata; read from the classifier when omitted")
    parser.add_argument("--out", type=Path, required=True, help="destination .onnx file")
    parser.add_argument("--height", type=int, default=513, help="input height of the exported graph")
    parser.add_argument("--width", type=int, default=513, help="input width of the exported graph")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    parser.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width")
    parser.add_argument("--int8", action="store_true",
                        help="quantize the graph to int8 with NNCF (needs --calibration; pip install 'deeplab[int8]')")
    parser.add_argument("--calibration", type=Path, default=None, metavar="DIR",
                        help="with --int8: folder of calibration images (searched recursively), e.g. the training "
                             "split; never the images the model is evaluated on")
    parser.add_argument("--calibration-images", type=int, default=64, metavar="N",
                        help="with --int8: how many images of --calibration, spread evenly over its sorted listing")


def _build(args: argparse.Namespace):
    from deeplab.weights import build_from_weights, read_metadata, resolve_weights, weights_format

    weights = resolve_weights(args.weights)
    if not weights.is_file():
        raise FileNotFoundError(f"weights file not found: {weights}")
    metadata = read_metadata(weights)
    if args.model and metadata.get("model") not in (None, args.model):
        raise ValueError(f"{weights} holds a {metadata['model']!r} model, not --model {args.model!r}")
    if not args.model and not metadata.get("model"):
        raise ValueError(f"{weights}: the file does not say which model it holds (no metadata): pass --model NAME "
                         "(deeplab models --names lists the names), and --num-classes N if its classifier "
                         "cannot tell")
    overrides: dict = {"msc_scales": None}  # the graph is the single-scale network
    if args.model:
        overrides["model"] = args.model
    num_classes = args.num_classes
    if num_classes is None and not metadata.get("num_classes"):
        num_classes = _peek_num_classes(weights, weights_format(weights))
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    return build_from_weights(weights, **overrides)


def _peek_num_classes(path: Path, fmt: str) -> int | None:
    if fmt == "caffe":
        from deeplab.cli.convert import _caffe_num_classes
        from deeplab.weights import read_caffemodel

        return _caffe_num_classes(read_caffemodel(path))
    from deeplab.weights import read_state_dict
    from deeplab.weights.loading import infer_num_classes

    return infer_num_classes(read_state_dict(path)[0])


def _check_int8(args: argparse.Namespace) -> list[Path]:
    """The calibration images of --int8 (checked before the weights are loaded); [] without it."""
    if not args.int8:
        if args.calibration is not None:
            raise ValueError("--calibration is for --int8: add --int8 to quantize the graph, or drop --calibration")
        return []
    if args.calibration is None:
        raise ValueError("--int8 needs calibration images: add --calibration DIR, a folder of training images "
                         f"(--calibration-images {args.calibration_images} of them are used)")
    missing = [name for name in ("nncf", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"--int8 needs the {' and '.join(missing)} package{'s' if len(missing) > 1 else ''}: "
                         "pip install 'deeplab[int8]'")
    if args.calibration_images < 1:
        raise ValueError(f"--calibration-images must be at least 1, got {args.calibration_images}")
    from deeplab.runtime.quantize import calibration_images

    try:
        return calibration_images(args.calibration, args.calibration_images)
    except ValueError as e:
        raise ValueError(f"--calibration: {e}") from None


def run(args: argparse.Namespace) -> int:
    """Export the model (and with --int8 quantize it); returns the exit status."""
    import torch

    from deeplab.weights import export_onnx
    from deeplab.weights.onnx_export import check_opset, onnx_metadata

    try:
        if args.height < 1 or args.width < 1:
            raise ValueError(f"--height and --width must be positive, got {args.height} and {args.width}")
        check_opset(args.opset, "--opset")  # before the weights are loaded
        reason = check_output_file(args.out, ".onnx")
        if reason:
            raise ValueError(f"--out: {reason}")
        calibration = _check_int8(args)
        model, metadata = _build(args)
        props = onnx_metadata(model, metadata)
        num_classes = model.num_classes
        t0 = time.perf_counter()
        # --int8: the fp32 graph is an intermediate beside the output (same disk), removed after.
        with (tempfile.TemporaryDirectory(dir=args.out.parent, prefix=f".{args.out.name}.") if args.int8
              else contextlib.nullcontext()) as tmp:
            fp32 = Path(tmp) / "fp32.onnx" if args.int8 else args.out
            try:
                export_onnx(model, fp32, height=args.height, width=args.width, opset=args.opset,
                            dynamic=args.dynamic, metadata=props)
            except RuntimeError as e:  # the trace runs the network once on a zero image of this size
                if not (isinstance(e, torch.OutOfMemoryError) or "alloc" in str(e)):
                    raise
                raise ValueError(f"not enough memory to trace the network on a {args.height}x{args.width} input: "
                                 "reduce --height/--width (with --dynamic the exported graph still takes any "
                                 "size)") from None
            if args.int8:
                from deeplab.runtime.quantize import quantize_int8

                del model  # the quantizer runs the graph on ONNX Runtime: the torch copy is not needed
                print(f"quantizing to int8 on {len(calibration)} images of {args.calibration} ...", flush=True)
                quantize_int8(fp32, args.out, calibration)
    except (ImportError, ValueError, FileNotFoundError) as e:
        return report_error(str(e))
    except OSError as e:  # writing: permission denied, disk full ...
        return report_error(f"cannot write {args.out}: {e.strerror or e}")
    size_mb = args.out.stat().st_size / 2**20
    int8 = f", int8 calibrated on {len(calibration)} images" if args.int8 else ""
    print(f"wrote {args.out} ({size_mb:.1f} MiB, {metadata['model']}, {num_classes} classes, "
          f"input 1x3x{args.height}x{args.width}{' dynamic' if args.dynamic else ''}, "
          f"opset {args.opset}{int8}) in {time.perf_counter() - t0:.1f} s")
    return 0
