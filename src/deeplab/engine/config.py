"""Training configuration: a YAML file read into a typed dataclass tree.

The tree is only read at the edge (``deeplab train``): :func:`deeplab.engine.train.train` takes
the dataclasses, every other function takes plain typed arguments. Unknown keys and values of the
wrong type are errors that name the offending key path (``solver.bse_lr``) and list the valid
keys, so that a misspelt option never silently falls back to a default.

Example::

    cfg = load_config("configs/camvid_resnet18.yaml", overrides=["solver.max_iter=200"])
    save_config(cfg, "runs/x/config.yaml")    # the fully resolved config
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from deeplab.data import dataset_options
from deeplab.data.balance import CLASS_WEIGHTINGS
from deeplab.data.transforms import check_normalization

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "SolverConfig",
    "StageConfig",
    "AveragingConfig",
    "TrainConfig",
    "config_to_dict",
    "load_config",
    "parse_config",
    "save_config",
]

# The paper's Caffe preprocessing: BGR channel order, mean subtracted, no division.
CAFFE_BGR_MEAN: dict[str, Any] = {"mode": "caffe_bgr", "mean": [104.008, 116.669, 122.675]}


class ConfigError(ValueError):
    """A configuration file or override that cannot be used (the message says why and where)."""


@dataclass
class ModelConfig:
    """Which network to build (arguments of :func:`deeplab.models.build_model`).

    Args:
        name: a name from ``deeplab models`` (e.g. ``deeplab_v2_resnet101``).
        num_classes: number of classes; ``null`` takes the data set's.
        output_stride: 8 (the v2 paper), 16 (where the v3 / v3+ papers train) or 32; ``null`` =
            the model's default (v1 / v2: 8, v3 / v3+: 16).
        atrous_rates: ASPP rates at output stride 8 (ASPP-S (2, 4, 8, 12), ASPP-L (6, 12, 18, 24),
            v3 (12, 24, 36)); ``null`` = the model's default.
        msc_scales: extra input scales for multi-scale training (the paper: [0.5, 0.75]); ``null`` = none.
        freeze_bn: freeze batch-norm statistics and affine parameters (the paper, with ImageNet /
            COCO initialisation); ``null`` (the default) = frozen exactly when ``init_weights``
            loads weights: a random network's batch norm (mean 0, variance 1) must learn.
        sync_bn: synchronise batch-norm statistics across processes (distributed runs, BN not frozen).
        resnet_layout: ``caffe`` or ``torchvision`` (ImageNet weights of torchvision / timm need
            it); ``null`` = the model's default (v2: caffe, v3 / v3+: torchvision).
        multi_grid: v3 / v3+: unit rates of the last stage, e.g. [1, 2, 4]; ``null`` = none.
        decoder_convs: v3+: the decoder's 3x3 convolutions, 2 (the paper) or 1 (VainF); ``null`` = 2.
    """

    name: str = "deeplab_v2_resnet101"
    num_classes: int | None = None
    output_stride: int | None = None
    atrous_rates: list[int] | None = None
    msc_scales: list[float] | None = None
    freeze_bn: bool | None = None
    sync_bn: bool = False
    resnet_layout: str | None = None
    multi_grid: list[int] | None = None
    decoder_convs: int | None = None


@dataclass
class DataConfig:
    """Training and validation data, augmentation and loss weighting.

    Args:
        dataset: a name from :func:`deeplab.data.list_datasets` (``voc12_aug``, ``camvid`` ...).
        root: the data set's folder; relative paths are taken from the current directory;
            ``$VARS`` and ``~`` are expanded.
        train_split / val_split: split names (``val_split: null`` skips validation).
        crop_size: training crop, an int or ``[height, width]`` (the paper: 321).
        scale_range: random scale range (the paper: [0.5, 1.5]); ``[1, 1]`` turns scaling off.
        flip: random horizontal flip.
        normalization: ``{mode: caffe_bgr, mean: [...]}`` or ``{mode: rgb, mean: [...], std: [...]}``.
        ignore_index: label excluded from the loss and the metrics.
        class_weights: ``null`` (none), ``median_freq`` (SegNet's median frequency balancing),
            ``sqrt_median_freq`` (its square root, milder), ``enet`` (ENet's
            ``1 / ln(1.02 + share)``), all computed from the training masks, or one weight per class.
        focus_classes / focus_prob: not in the paper: with probability ``focus_prob`` a training
            crop is placed around a random pixel of one of ``focus_classes`` (class ids) present
            in the image, so thin and rare classes are seen more often (0: the paper's crops).
        color_jitter: not in the paper: random brightness, contrast and saturation factors in
            ``[1 - color_jitter, 1 + color_jitter]`` (0: none).
        num_workers: DataLoader worker processes per training process.
        val_max_images: validate on the first N validation images only (``null`` = all).
        val_options: options that replace ``options``' values for the validation split only, e.g.
            ``{sequences: [0006R0]}`` with ``options: {exclude_sequences: [0006R0]}`` to validate
            on a CamVid drive held out of training.
        options: the data set's own keyword options, for both splits (``build_dataset``), e.g.
            ``{mask_suffix: _mask.png, label_map: {0: 0, 255: 1}}`` for ``folder``,
            ``{sbd_root: ...}`` for ``voc12_aug``, ``{skip_bad: true}`` for any.
    """

    dataset: str = "voc12_aug"
    root: str = "data/VOCdevkit/VOC2012"
    train_split: str = "train_aug"
    val_split: str | None = "val"
    crop_size: int | list[int] = 321
    scale_range: list[float] = field(default_factory=lambda: [0.5, 1.5])
    flip: bool = True
    normalization: dict[str, Any] = field(default_factory=lambda: dict(CAFFE_BGR_MEAN))
    ignore_index: int = 255
    class_weights: str | list[float] | None = None
    focus_classes: list[int] = field(default_factory=list)
    focus_prob: float = 0.0
    color_jitter: float = 0.0
    num_workers: int = 2
    val_max_images: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    val_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SolverConfig:
    """The optimiser and schedule (the paper's: SGD, momentum 0.9, weight decay 5e-4, poly 0.9).

    Args:
        base_lr: learning rate of the backbone weights at iteration 0.
        momentum / weight_decay: SGD's.
        lr_power: poly exponent: ``lr = base_lr * (1 - iter / max_iter) ** lr_power``.
        warmup_iter: not in the paper (0 = off): a linear warm-up of the rate over the first
            iterations, for training from scratch.
        max_iter: number of optimiser steps.
        batch_size: images per forward pass *per process*.
        iter_size: forward/backward passes accumulated per step (Caffe's ``iter_size``); the
            global batch is ``batch_size * iter_size * world_size``.
        bias_lr_mult: backbone biases' lr multiplier (Caffe ``lr_mult: 2``, no decay).
        classifier_lr_mult / classifier_bias_lr_mult: the classifier's weights (10) and biases (20).
        loss_resolution: ``"logits"`` (the paper: labels shrunk to the stride-8 logits by nearest
            neighbour) or ``"labels"`` (not in the paper: logits upsampled bilinearly to the
            labels' size), which keeps thin objects such as poles in the loss.
        lovasz_weight: not in the paper (0 = off, the paper's loss): adds this times the
            Lovasz-softmax loss (Berman et al. 2018, a surrogate of mean IoU) to the cross-entropy.
    """

    base_lr: float = 2.5e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_power: float = 0.9
    warmup_iter: int = 0
    max_iter: int = 20000
    batch_size: int = 5
    iter_size: int = 2
    bias_lr_mult: float = 2.0
    classifier_lr_mult: float = 10.0
    classifier_bias_lr_mult: float = 20.0
    loss_resolution: str = "logits"
    lovasz_weight: float = 0.0


@dataclass
class StageConfig:
    """A stage of the recipe: from iteration ``start`` on, these settings replace the run's.

    Args:
        start: the first iteration of the stage (0-based; stages in increasing order).
        output_stride: the network's output stride from here on (the same weights: only the
            strides and dilations change, e.g. train at 16, fine-tune at 8); ``null`` = unchanged.
        lovasz_weight: the Lovasz-softmax weight from here on (a loss schedule); ``null`` = unchanged.
    """

    start: int = 0
    output_stride: int | None = None
    lovasz_weight: float | None = None


@dataclass
class AveragingConfig:
    """Stochastic weight averaging (Izmailov et al. 2018) and the batch-norm statistics of the result.

    Args:
        start: the first iteration whose weights enter the average (``null``: no averaging).
        interval: the weights after every ``interval`` iterations from ``start`` on are averaged
            (float64 sums; the state is in the checkpoints, so a resumed run averages the same).
        lr: a constant learning rate from ``start`` on (the SWA schedule); ``null`` keeps the poly
            schedule.
        recalibrate_bn: after the last iteration, re-estimate the batch-norm statistics of the
            final weights (the average, or the last weights) on the whole training images
            (``deeplab calibrate-bn``'s exact moments).
        bn_batch_size: images per forward pass of that re-estimation.
    """

    start: int | None = None
    interval: int = 100
    lr: float | None = None
    recalibrate_bn: bool = False
    bn_batch_size: int = 8


@dataclass
class TrainConfig:
    """A whole training run.

    Args:
        model / data / solver: the sections above.
        precision: ``auto`` (bf16 where the device computes it natively: GPUs from Ampere on,
            x86 CPUs with AVX512_BF16 or AMX; else fp32), ``bf16`` (autocast on CPU and CUDA;
            the loss in fp32) or ``fp32``.
        channels_last: NHWC memory format (faster convolutions with bf16 on CPUs and GPUs).
        init_weights: a ``.safetensors`` file to start from (e.g. ``deeplab convert init.caffemodel``)
            or a PyTorch state dict (.pth): the project's, an ImageNet ResNet of torchvision / timm
            (``fc`` dropped; the backbone only) or a torchvision / VainF DeepLab v3(+) model;
            tensors whose name or shape do not match (a classifier with another class count)
            are skipped and listed.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        seed: seeds the initialisation, the data order and the augmentation.
        val_interval / checkpoint_interval / log_interval: in iterations (0 = only at the end).
        keep_checkpoints: how many periodic checkpoints to keep (older ones are deleted).
        tensorboard: also log to TensorBoard (``pip install deeplab[tensorboard]``).
        stages: the recipe's stages (:class:`StageConfig`): output-stride switches and the loss
            schedule, applied at their ``start`` iteration, in the trainer (a resumed run
            rebuilds the stage it is in).
        averaging: weight averaging and the final batch-norm re-estimation (:class:`AveragingConfig`);
            with either, the run ends with ``final.safetensors``.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    channels_last: bool = True
    init_weights: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    val_interval: int = 1000
    checkpoint_interval: int = 1000
    log_interval: int = 20
    keep_checkpoints: int = 2
    tensorboard: bool = False
    stages: list[StageConfig] = field(default_factory=list)
    averaging: AveragingConfig = field(default_factory=AveragingConfig)


# ----------------------------------------------------------------------------------------------
# dict <-> dataclass with type checking


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return repr(tp).replace("typing.", "")
    return getattr(tp, "__name__", repr(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float, tuple -> list)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        deeper: list[ConfigError] = []
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, path)
            except ConfigError as e:
                # An arm that got inside the value (a list item, a section) knows better.
                if not str(e).startswith(f"{path}:"):
                    deeper.append(e)
        if len(deeper) == 1:
            raise deeper[0]
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}: expected null, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{path}: expected one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "1e-3" (no dot) as a string: accept it, it is what the user meant.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    raise TypeError(f"unsupported annotation {tp!r} at {path}")  # a bug in this module


def _from_dict(cls: type, data: Any, path: str) -> Any:
    where = path or "the top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in valid]
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ConfigError(f"unknown config key {key!r}; valid keys at {where}: {', '.join(valid)}")
    kwargs = {}
    for name in valid:
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{path}.{name}" if path else name)
    return cls(**kwargs)


def _validate(cfg: TrainConfig) -> None:
    s, d, m = cfg.solver, cfg.data, cfg.model
    positive = {
        "solver.base_lr": s.base_lr,
        "solver.max_iter": s.max_iter,
        "solver.batch_size": s.batch_size,
        "solver.iter_size": s.iter_size,
    }
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key} must be > 0, got {value!r}")
    for key, value in {
        "val_interval": cfg.val_interval,
        "checkpoint_interval": cfg.checkpoint_interval,
        "log_interval": cfg.log_interval,
        "data.num_workers": d.num_workers,
        "solver.weight_decay": s.weight_decay,
        "solver.momentum": s.momentum,
        "solver.warmup_iter": s.warmup_iter,
        "solver.lovasz_weight": s.lovasz_weight,
    }.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value!r}")
    if not 0.0 <= d.color_jitter < 1.0:
        raise ConfigError(f"data.color_jitter must be in [0, 1), got {d.color_jitter!r}")
    if not 0.0 <= d.focus_prob <= 1.0:
        raise ConfigError(f"data.focus_prob must be in [0, 1], got {d.focus_prob!r}")
    if d.focus_prob > 0 and not d.focus_classes:
        raise ConfigError("data.focus_prob > 0 needs data.focus_classes (class ids to seek out)")
    if any(c < 0 or c == d.ignore_index for c in d.focus_classes):
        raise ConfigError(f"data.focus_classes must be class ids (>= 0, not the ignore label), got {d.focus_classes}")
    if s.loss_resolution not in ("logits", "labels"):
        raise ConfigError(f"solver.loss_resolution must be 'logits' or 'labels', got {s.loss_resolution!r}")
    if cfg.keep_checkpoints < 1:
        raise ConfigError(f"keep_checkpoints must be >= 1, got {cfg.keep_checkpoints}")
    crop = [d.crop_size] * 2 if isinstance(d.crop_size, int) else d.crop_size
    if len(crop) != 2 or min(crop) < 1:
        raise ConfigError(f"data.crop_size must be an int or [height, width] > 0, got {d.crop_size!r}")
    if len(d.scale_range) != 2 or not 0 < d.scale_range[0] <= d.scale_range[1]:
        raise ConfigError(f"data.scale_range must be [low, high] with 0 < low <= high, got {d.scale_range!r}")
    if isinstance(d.class_weights, str) and d.class_weights not in CLASS_WEIGHTINGS:
        names = ", ".join(repr(n) for n in CLASS_WEIGHTINGS)
        raise ConfigError(f"data.class_weights must be null, {names} or a list of numbers, got {d.class_weights!r}")
    try:
        valid_options = dataset_options(d.dataset)
    except ValueError as e:
        raise ConfigError(f"data.dataset: {e}") from None
    unknown = sorted((set(d.options) | set(d.val_options)) - set(valid_options))
    if unknown:
        raise ConfigError(f"data.options: {d.dataset!r} has no option(s) {unknown}; valid: {', '.join(valid_options)}")
    try:
        check_normalization(d.normalization)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"data.normalization: {e}") from None
    if m.output_stride not in (None, 8, 16, 32):
        raise ConfigError(f"model.output_stride must be 8, 16, 32 or null, got {m.output_stride}")
    if m.resnet_layout not in (None, "caffe", "torchvision"):
        raise ConfigError(f"model.resnet_layout must be caffe, torchvision or null, got {m.resnet_layout!r}")
    if m.num_classes is not None and m.num_classes < 1:
        raise ConfigError(f"model.num_classes must be >= 1 or null, got {m.num_classes}")
    if m.msc_scales is not None and any(not 0 < x <= 4 for x in m.msc_scales):
        raise ConfigError(f"model.msc_scales must be in (0, 4], got {m.msc_scales}")
    previous = -1
    for i, stage in enumerate(cfg.stages):
        if not 0 <= stage.start < s.max_iter or stage.start <= previous:
            raise ConfigError(f"stages[{i}].start={stage.start} must be in [0, solver.max_iter) and after the "
                              f"previous stage's start ({previous})")
        previous = stage.start
        if stage.output_stride not in (None, 8, 16, 32):
            raise ConfigError(f"stages[{i}].output_stride must be 8, 16, 32 or null, got {stage.output_stride}")
        if stage.lovasz_weight is not None and stage.lovasz_weight < 0:
            raise ConfigError(f"stages[{i}].lovasz_weight must be >= 0, got {stage.lovasz_weight}")
    a = cfg.averaging
    if a.start is not None and not 0 <= a.start < s.max_iter:
        raise ConfigError(f"averaging.start={a.start} must be in [0, solver.max_iter) or null")
    if a.interval < 1 or a.bn_batch_size < 1:
        raise ConfigError("averaging.interval and averaging.bn_batch_size must be >= 1")
    if a.lr is not None and not a.lr > 0:
        raise ConfigError(f"averaging.lr must be > 0 or null, got {a.lr}")
    if a.lr is not None and a.start is None:
        raise ConfigError("averaging.lr is the constant rate of weight averaging: set averaging.start too")
    if m.sync_bn and m.freeze_bn is True:
        raise ConfigError("model.sync_bn needs trainable batch norm: set model.freeze_bn: false")


def _set_path(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_config(data: dict[str, Any] | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Build a validated :class:`TrainConfig` from a mapping plus ``key.sub=value`` overrides.

    Args:
        data: the parsed YAML mapping (``None`` = every default).
        overrides: strings ``section.key=value``; values are parsed as YAML (``1e-3``, ``[1, 2]``, ``null``).

    Raises:
        ConfigError: unknown key (the message lists the valid ones), wrong type or bad value.
    """
    tree = dict(data or {})
    tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tree.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None
        _set_path(tree, key, value)
    cfg = _from_dict(TrainConfig, tree, "")
    _validate(cfg)
    return cfg


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config file, apply ``key=value`` overrides and validate it.

    Args:
        path: the YAML file.
        overrides: ``section.key=value`` strings (as ``deeplab train --set``).

    Raises:
        ConfigError: unreadable file, invalid YAML, unknown key, wrong type.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}): "
                          "give a YAML file, saved as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return parse_config(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain Python types (what :func:`save_config` writes)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the fully resolved config as YAML, atomically (temporary file + rename)."""
    from deeplab.fileio import atomic_open

    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    with atomic_open(Path(path), "w") as f:
        f.write(text)


def resolve_data_root(root: str) -> Path:
    """Expand ``~`` and ``$VARS`` in a configured data root; relative to the current directory."""
    return Path(os.path.expandvars(os.path.expanduser(root))).resolve()
