"""Convert Caffe / PyTorch weights to the project's safetensors (with metadata).

Sources: the official DeepLab .caffemodel files (ResNet-101 init.caffemodel /
train_iter_20000.caffemodel, VGG-16 LargeFOV and ASPP), kazuto1011/deeplab-pytorch .pth files
(DeepLabV2_ResNet101_MSC), the project's own .pth/.pt/.safetensors. The weights are checked
against the named model (keys, shapes, Caffe strides and dilations); the class count is read
from the file's classifier unless --num-classes is given.

Examples:
  deeplab convert train_iter_20000.caffemodel voc_resnet101.safetensors --model deeplab_v2_resnet101
  deeplab convert init.caffemodel coco_init.safetensors --model deeplab_v2_resnet101 --num-classes 21 --partial
  deeplab convert deeplabv2_resnet101_msc-vocaug-20000.pth voc.safetensors --model deeplab_v2_resnet101 \\
      --class-names voc_classes.txt
  deeplab convert train_iter_6000.caffemodel largefov.safetensors --model deeplab_v1_largefov_vgg16
"""

from __future__ import annotations

import argparse
from pathlib import Path

from deeplab.cli.common import check_output_file, report_error

# Metadata that holds one entry per class (logit_adjustment: scripts/package_default_model.py).
_PER_CLASS_KEYS = ("class_names", "palette", "logit_adjustment")
# The Caffe releases and kazuto1011's ports feed BGR images minus the ImageNet mean, unscaled.
_CAFFE_NORMALIZATION = {"mode": "caffe_bgr", "mean": [104.008, 116.669, 122.675]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Attach the ``deeplab convert`` options."""
    parser.add_argument("src", type=Path, help="source weights: .caffemodel, .pth/.pt or .safetensors")
    parser.add_argument("dst", type=Path, help="destination .safetensors file (written atomically)")
    parser.add_argument("--model", required=True, help="model name, one of 'deeplab models --names'")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="number of classes; read from the file's classifier when omitted")
    parser.add_argument("--class-names", type=Path, default=None,
                        help="text file with one class name a line, stored in the metadata")
    storage = parser.add_mutually_exclusive_group()
    storage.add_argument("--half", action="store_true",
                         help="store float16 weights (half the file; batch-norm statistics stay float32)")
    storage.add_argument("--int8", action="store_true",
                         help="store int8 convolution weights with a scale per output channel (a quarter of "
                              "the file), the rest as --half; loading restores float32")
    parser.add_argument("--partial", action="store_true",
                        help="allow model tensors the file lacks or cannot fill (e.g. init.caffemodel "
                             "without a classifier, or another class count): they keep the fresh "
                             "initialisation (classifier N(0, 0.01)) and are listed")


def _read_class_names(path: Path, num_classes: int | None) -> list[str]:
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as e:
        raise ValueError(f"cannot read --class-names {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--class-names {path} is not UTF-8 text: save it as UTF-8, one class name a line") from None
    if num_classes is not None and len(names) != num_classes:
        raise ValueError(f"--class-names {path} lists {len(names)} names but the model has {num_classes} classes")
    return names


def _caffe_num_classes(layers) -> int | None:
    import re

    for layer in layers:
        if layer.blobs and re.match(r"^(fc1(_[a-z][a-z0-9]*)?_c0|fc8(_[a-z][a-z0-9]*)?(_1)?)$", layer.name):
            return int(layer.blobs[0].shape[0])
    return None


def _convert(args: argparse.Namespace) -> int:
    from deeplab.models import build_model
    from deeplab.weights import apply_state_dict, read_caffemodel, read_state_dict, save_weights, weights_format
    from deeplab.weights.loading import infer_num_classes
    from deeplab.weights.mapping import caffe_to_state_dict, model_key_prefix

    src: Path = args.src
    if not src.is_file():
        raise FileNotFoundError(f"source weights not found: {src}")
    if args.num_classes is not None and args.num_classes < 1:
        raise ValueError(f"--num-classes {args.num_classes} must be a positive integer")
    reason = check_output_file(args.dst, ".safetensors")
    if reason:
        raise ValueError(f"destination: {reason}")
    fmt = weights_format(src)
    metadata: dict = {}
    if fmt == "caffe":
        layers = read_caffemodel(src)
        num_classes = args.num_classes or _caffe_num_classes(layers)
        if num_classes is None:
            raise ValueError(f"{src} has no classifier to read the class count from: pass --num-classes "
                             "(and --partial, to keep a fresh classifier)")
        model = build_model(args.model, num_classes=num_classes)
        imported = caffe_to_state_dict(layers, model, source=str(src))
        result = apply_state_dict(model, imported.state_dict, source=str(src), layout="caffe",
                                  strict=not args.partial,
                                  extra_unexpected=[f"caffe:{n}" for n in imported.unused_layers])
        layout = "caffe"
    else:
        state, metadata, layout = read_state_dict(src)
        num_classes = args.num_classes or metadata.get("num_classes") or infer_num_classes(state)
        if num_classes is None:
            raise ValueError(f"cannot tell the class count of {src}: pass --num-classes")
        saved = metadata.get("model_kwargs") or {}
        kwargs = {k: tuple(v) if isinstance(v, list) else v
                  for k, v in saved.items() if k in ("output_stride", "atrous_rates") and v is not None}
        if metadata.get("model") not in (None, args.model):
            raise ValueError(f"{src} holds a {metadata['model']!r} model, not {args.model!r}")
        model = build_model(args.model, num_classes=int(num_classes), **kwargs)
        prefix = model_key_prefix(model.state_dict())
        result = apply_state_dict(model, {prefix + k: v for k, v in state.items()}, source=str(src),
                                  layout=layout, strict=not args.partial)
    # Per-class entries describe the source's classifier, not one with another class count.
    stale = [k for k in _PER_CLASS_KEYS if k in metadata and (
        metadata.get("num_classes", model.num_classes) != model.num_classes
        or (isinstance(metadata[k], list) and len(metadata[k]) != model.num_classes))]
    for key in stale:
        del metadata[key]
    if args.class_names is not None:
        metadata["class_names"] = _read_class_names(args.class_names, model.num_classes)
    if layout in ("caffe", "kazuto1011"):
        metadata.setdefault("normalization", _CAFFE_NORMALIZATION)
    metadata.update(model=args.model, num_classes=model.num_classes)
    metadata["source"] = {"file": src.name, "layout": layout}
    metadata.pop("model_kwargs", None)  # recomputed from the model by save_weights
    save_weights(model, args.dst, metadata, half=args.half, int8=args.int8)
    n = len(model.state_dict())
    print(f"wrote {args.dst}: {args.model}, {model.num_classes} classes, {n} tensors from {src.name} ({layout} layout)")
    if result.missing or result.skipped_shape:
        kept = result.missing + result.skipped_shape
        print(f"  kept the fresh initialisation for {len(kept)} tensor(s): {kept[:6]}{' ...' if len(kept) > 6 else ''}")
    if stale:
        print(f"  dropped the source's per-class metadata ({', '.join(stale)}): not for {model.num_classes} classes")
    if result.unexpected:
        print(f"  ignored {len(result.unexpected)} entr(ies) of the file: {result.unexpected[:6]}"
              f"{' ...' if len(result.unexpected) > 6 else ''}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Convert ``args.src`` to ``args.dst``; returns the exit status."""
    try:
        return _convert(args)
    except (ValueError, FileNotFoundError) as e:  # CaffeModelError / WeightsMismatchError are ValueErrors
        return report_error(str(e))
    except OSError as e:  # writing: permission denied, disk full ...
        return report_error(f"cannot write {args.dst}: {e.strerror or e}")
