"""Convert Caffe / PyTorch weights to the project's safetensors (with metadata).

Sources: the official DeepLab .caffemodel files (ResNet-101 init.caffemodel /
train_iter_20000.caffemodel, VGG-16 LargeFOV and ASPP), kazuto1011/deeplab-pytorch .pth files
(DeepLabV2_ResNet101_MSC), torchvision's deeplabv3_resnet50/101 and VainF/DeepLabV3Plus-Pytorch's
deeplabv3(plus)_resnet50/101 checkpoints, ImageNet ResNets of torchvision / timm (a backbone:
with --partial), the project's own .pth/.pt/.safetensors. The weights are checked against the
named model (keys, shapes, Caffe strides and dilations); the class count is read from the
file's classifier unless --num-classes is given. torchvision's and VainF's files name their
model by their keys (--model may be left out); they are stored with ImageNet RGB
normalisation, the VOC (21 classes) or Cityscapes (19) class names, and their own output
stride (torchvision 8, VainF 16) unless --output-stride says otherwise.

Examples:
  deeplab convert train_iter_20000.caffemodel voc_resnet101.safetensors --model deeplab_v2_resnet101
  deeplab convert init.caffemodel coco_init.safetensors --model deeplab_v2_resnet101 --num-classes 21 --partial
  deeplab convert deeplabv2_resnet101_msc-vocaug-20000.pth voc.safetensors --model deeplab_v2_resnet101 \\
      --class-names voc_classes.txt
  deeplab convert train_iter_6000.caffemodel largefov.safetensors --model deeplab_v1_largefov_vgg16
  deeplab convert deeplabv3_resnet101_coco-586e9e4e.pth tv_v3_r101.safetensors
  deeplab convert best_deeplabv3plus_resnet101_voc_os16.pth vainf_v3plus.safetensors --output-stride 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

from deeplab.cli.common import check_output_file, report_error

# Metadata that holds one entry per class (logit_adjustment: scripts/package_default_model.py).
_PER_CLASS_KEYS = ("class_names", "palette", "logit_adjustment")
# build_model options a source file's metadata (or keys) may carry.
_KWARGS = ("output_stride", "atrous_rates", "resnet_layout", "multi_grid", "decoder_convs")
# The Caffe releases and kazuto1011's ports feed BGR images minus the ImageNet mean, unscaled.
_CAFFE_NORMALIZATION = {"mode": "caffe_bgr", "mean": [104.008, 116.669, 122.675]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Attach the ``deeplab convert`` options."""
    parser.add_argument("src", type=Path, help="source weights: .caffemodel, .pth/.pt or .safetensors")
    parser.add_argument("dst", type=Path, help="destination .safetensors file (written atomically)")
    parser.add_argument("--model", default=None,
                        help="model name, one of 'deeplab models --names'; read from the keys of torchvision's "
                             "and VainF's files, required for the others")
    parser.add_argument("--output-stride", type=int, choices=(8, 16, 32), default=None,
                        help="output stride stored with the weights; unset: the file's own (torchvision 8, "
                             "VainF 16, the project's metadata), else the model's default")
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
    from deeplab.data.transforms import IMAGENET_NORMALIZATION
    from deeplab.weights.loading import (
        foreign_metadata_defaults,
        foreign_model_options,
        infer_num_classes,
        layout_warning,
    )
    from deeplab.weights.mapping import FOREIGN_LAYOUTS, caffe_to_state_dict, model_key_prefix

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
        if args.model is None:
            raise ValueError(f"{src}: a caffemodel does not name its network: pass --model "
                             "(deeplab_v2_resnet101, deeplab_v1_largefov_vgg16, ...)")
        layers = read_caffemodel(src)
        num_classes = args.num_classes or _caffe_num_classes(layers)
        if num_classes is None:
            raise ValueError(f"{src} has no classifier to read the class count from: pass --num-classes "
                             "(and --partial, to keep a fresh classifier)")
        stride = {} if args.output_stride is None else {"output_stride": args.output_stride}
        model = build_model(args.model, num_classes=num_classes, **stride)
        imported = caffe_to_state_dict(layers, model, source=str(src))
        result = apply_state_dict(model, imported.state_dict, source=str(src), layout="caffe",
                                  strict=not args.partial,
                                  extra_unexpected=[f"caffe:{n}" for n in imported.unused_layers])
        layout = "caffe"
    else:
        state, metadata, layout = read_state_dict(src)
        note = metadata.pop("import_note", None)
        saved = {k: tuple(v) if isinstance(v, list) else v
                 for k, v in (metadata.get("model_kwargs") or {}).items() if v is not None}
        if layout in FOREIGN_LAYOUTS and layout != "imagenet":
            found = foreign_model_options(state, layout)
            metadata.update(model=found.pop("model"), num_classes=found.pop("num_classes", None))
            metadata = {**foreign_metadata_defaults(metadata["num_classes"]), **metadata}
            saved.update(found)
        if args.model is None:
            args.model = metadata.get("model")
            if args.model is None:
                raise ValueError(f"{src} does not say which model it holds ({layout} layout): pass --model "
                                 "(deeplab models --names lists the names)")
        num_classes = args.num_classes or metadata.get("num_classes") or infer_num_classes(state)
        if num_classes is None:
            raise ValueError(f"cannot tell the class count of {src}: pass --num-classes")
        if metadata.get("model") not in (None, args.model):
            raise ValueError(f"{src} holds a {metadata['model']!r} model, not {args.model!r}")
        kwargs = {k: v for k, v in saved.items() if k in _KWARGS}
        if args.output_stride is not None:
            kwargs["output_stride"] = args.output_stride
        model = build_model(args.model, num_classes=int(num_classes), **kwargs)
        prefix = model_key_prefix(model.state_dict())
        result = apply_state_dict(model, {prefix + k: v for k, v in state.items()}, source=str(src),
                                  layout=layout, strict=not args.partial)
        if note:
            result.notes.append(note)
        warning = layout_warning(model, layout)
        if warning:
            result.notes.append(f"warning: {warning}")
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
    elif layout == "imagenet":
        metadata.setdefault("normalization", IMAGENET_NORMALIZATION)
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
    for note in result.notes:
        print(f"  {note}")
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
