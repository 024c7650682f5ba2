"""Training with the paper's protocol, on one process or many (``torchrun``).

The protocol (DeepLab v2, Caffe): SGD with momentum 0.9 and weight decay 5e-4; the poly
learning rate ``base_lr * (1 - it / max_iter) ** 0.9`` set at every iteration; backbone biases
at 2x the rate without decay (Caffe ``lr_mult: 2, decay_mult: 0``), the classifier's weights at
10x and biases at 20x; frozen batch norm (optional: it is on for the paper's configs, which start
from ImageNet / COCO weights, and must be off for training from scratch); ``iter_size`` forward /
backward passes accumulated per step; the loss on the stride-8 logits with labels shrunk by
nearest neighbour, ignoring 255, and with multi-scale inputs the 4-term MSC loss.

Same result however the global batch is split. The global batch of a step is
``batch_size * iter_size * world_size`` images, taken from one global sample stream (a seeded
permutation per epoch): step ``it`` consumes stream positions ``[it * G, (it + 1) * G)``, each
process and each accumulation pass a contiguous slice of it. Augmentation draws are seeded by the
stream position, not by a worker's RNG. The cross-entropy is summed over the valid pixels of the
whole global batch and divided by their number (gathered from every pass and process), so one
process with batch 10, one with 5 x ``iter_size`` 2 and two with 5 each compute the same gradient
(up to floating-point rounding; batch norm in training mode sees per-pass statistics unless it is
frozen or synchronised). For the same reason the data order and augmentations of a resumed run
are those of an uninterrupted one.

Entry point: :func:`train` (what ``deeplab train`` calls).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from deeplab.data.balance import CLASS_WEIGHTINGS, class_frequencies
from deeplab.data.loader import iter_loader
from deeplab.engine import checkpoint as ckpt
from deeplab.engine.config import TrainConfig, resolve_data_root, save_config
from deeplab.engine.distributed import DistInfo, all_reduce_sum, barrier, cleanup, init_distributed
from deeplab.engine.losses import lovasz_softmax, msc_cross_entropy, valid_weight
from deeplab.engine.lr_schedule import PolyLR
from deeplab.models.inference import resolve_precision
from deeplab.models.zoo import set_output_stride
from deeplab.weights.default import resolve_weights
from deeplab.weights.loading import WeightsMismatchError, apply_state_dict

__all__ = [
    "TrainingDiverged",
    "TrainingError",
    "build_param_groups",
    "train",
    "train_step",
]


# The config's way to skip bad samples (deeplab train has no flag for it).
_SKIP_BAD_HINT = " (or skip bad samples with data.options: {skip_bad: true} in the config)"


class TrainingError(RuntimeError):
    """A problem the user can fix (bad data root, existing run folder, unreadable checkpoint ...)."""


class TrainingDiverged(TrainingError):
    """The loss became NaN or infinite; the message names the iteration and the last good checkpoint."""


# ----------------------------------------------------------------------------------------------
# parameter groups


def _norm_parameter_ids(model: nn.Module) -> set[int]:
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    return {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}


def build_param_groups(
    model: nn.Module,
    *,
    weight_decay: float,
    bias_lr_mult: float = 2.0,
    classifier_lr_mult: float = 10.0,
    classifier_bias_lr_mult: float = 20.0,
) -> list[dict[str, Any]]:
    """The paper's optimiser groups, each with a ``name``, an ``lr_mult`` and its ``weight_decay``.

    - ``backbone_weights``: lr x1, decay (convolution weights of the backbone);
    - ``backbone_biases``: lr x``bias_lr_mult`` (2), no decay (Caffe ``lr_mult: 2, decay_mult: 0``);
    - ``norm``: trainable batch-norm scale and shift (from-scratch training only): lr x1, no decay;
    - ``classifier_weights``: lr x``classifier_lr_mult`` (10), decay;
    - ``classifier_biases``: lr x``classifier_bias_lr_mult`` (20), no decay.

    The classifier is ``model.classifier_parameters()`` (ResNet: the ASPP convolutions; VGG: the
    fc8 layers). Frozen parameters (``requires_grad=False``) are left out; empty groups are dropped.

    Args:
        model: a ``deeplab.models`` network (optionally MSC-wrapped), not wrapped in DDP.
        weight_decay: decay of the weight groups (the paper: 5e-4).
        bias_lr_mult / classifier_lr_mult / classifier_bias_lr_mult: rate multipliers.
    """
    classifier = {id(p) for p in model.classifier_parameters()}
    norm = _norm_parameter_ids(model)
    groups: dict[str, dict[str, Any]] = {
        "backbone_weights": {"lr_mult": 1.0, "weight_decay": weight_decay},
        "backbone_biases": {"lr_mult": bias_lr_mult, "weight_decay": 0.0},
        "norm": {"lr_mult": 1.0, "weight_decay": 0.0},
        "classifier_weights": {"lr_mult": classifier_lr_mult, "weight_decay": weight_decay},
        "classifier_biases": {"lr_mult": classifier_bias_lr_mult, "weight_decay": 0.0},
    }
    members: dict[str, list[nn.Parameter]] = {k: [] for k in groups}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_bias = p.ndim == 1
        if id(p) in classifier:
            key = "classifier_biases" if is_bias else "classifier_weights"
        elif id(p) in norm:
            key = "norm"
        else:
            key = "backbone_biases" if is_bias else "backbone_weights"
        members[key].append(p)
    return [{"name": k, "params": members[k], **groups[k]} for k in groups if members[k]]


# ----------------------------------------------------------------------------------------------
# data: one global sample stream


def _mix(seed: int, value: int) -> int:
    # splitmix64: unrelated seeds for neighbouring (seed, position) pairs.
    z = (seed * 0x9E3779B97F4A7C15 + value + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


class _StreamSampler(torch.utils.data.Sampler):
    """Yields this process's ``(stream position, sample index)`` pairs for iterations [start, stop).

    Position ``p`` is sample ``perm_e[p % n]`` with ``e = p // n`` and ``perm_e`` a permutation
    seeded by (seed, e). Iteration ``it``, accumulation pass ``k``, process ``r`` take positions
    ``it*G + (k*world + r)*b + [0, b)``: the global batch of a step is the same set of positions
    whatever (batch_size, iter_size, world_size) split it.
    """

    def __init__(self, n: int, *, seed: int, batch_size: int, iter_size: int, rank: int, world_size: int,
                 start: int, stop: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.b, self.k = n, seed, batch_size, iter_size
        self.rank, self.world = rank, world_size
        self.start, self.stop, self.shuffle = start, stop, shuffle

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.k * self.b

    def _perm(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(_mix(self.seed, epoch))
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g_batch = self.b * self.k * self.world
        epoch, perm = -1, []
        for it in range(self.start, self.stop):
            for k in range(self.k):
                first = it * g_batch + (k * self.world + self.rank) * self.b
                for p in range(first, first + self.b):
                    e = p // self.n
                    if e != epoch:
                        epoch, perm = e, self._perm(e)
                    yield p, perm[p % self.n]


class _TrainSet(torch.utils.data.Dataset):
    """Applies the training transforms with a generator seeded by the stream position."""

    def __init__(self, dataset: Any, *, seed: int, crop_size: int | Sequence[int], scale_range: Sequence[float],
                 flip: bool, normalization: dict, ignore_index: int, focus_classes: Sequence[int] = (),
                 focus_prob: float = 0.0, color_jitter: float = 0.0) -> None:
        self.dataset = dataset
        self.seed = seed
        self._kwargs = dict(crop_size=crop_size, scale_range=None if scale_range[0] == scale_range[1] == 1.0
                            else tuple(scale_range), flip=flip, normalization=normalization,
                            ignore_index=ignore_index, focus_classes=tuple(focus_classes), focus_prob=focus_prob,
                            color_jitter=color_jitter)
        self._transforms = None
        self._generator: torch.Generator | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self._transforms is None:  # built lazily: generators do not travel to worker processes
            from deeplab.data.transforms import build_train_transforms

            self._generator = torch.Generator()
            self._transforms = build_train_transforms(generator=self._generator, **self._kwargs)
        position, index = key
        image, mask = self.dataset[index]
        self._generator.manual_seed(_mix(self.seed, position))
        return self._transforms(image, mask)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_transforms"] = state["_generator"] = None
        return state


# ----------------------------------------------------------------------------------------------
# helpers


@dataclass
class _Run:
    """Paths of a run folder."""

    out: Path

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.jsonl"


def _select_device(name: str, dist_info: DistInfo | None = None) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TrainingError("device: cuda was asked for but no CUDA device is available; use device: cpu")
        return torch.device("cuda", dist_info.local_rank if dist_info else 0)
    return torch.device("cpu")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _load_init_weights(model: nn.Module, path: Path, log) -> None:
    from deeplab.weights import load_weights, weights_format

    try:
        fmt = weights_format(path)
    except ValueError:
        fmt = None
    if fmt not in ("safetensors", "torch"):
        raise TrainingError(
            f"init_weights {path}: expected a .safetensors file or a PyTorch state dict (.pth / .pt: the "
            f"project's, torchvision's, timm's or VainF's); convert Caffe weights first with "
            f"'deeplab convert {path} OUT.safetensors'"
        )
    if not path.is_file():
        raise TrainingError(f"init_weights {path} does not exist")
    notes: list[str] = []
    if fmt == "torch":
        # Foreign layouts (an ImageNet ResNet, a torchvision / VainF model) are renamed by the loader.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the layout warning is logged below as a note
                result = load_weights(model, path, strict=False)
        except (ValueError, FileNotFoundError) as e:
            raise TrainingError(f"init_weights: {e}") from None
        notes = result.notes
    else:
        try:
            loaded = ckpt.load_state_dict_file(path)
        except ckpt.CheckpointError as e:
            raise TrainingError(str(e)) from None
        try:
            result = apply_state_dict(model, loaded, source=str(path), strict=False)
        except WeightsMismatchError as e:  # not one tensor fits: another model altogether
            raise TrainingError(f"init_weights: {e}") from None
    msg = f"init_weights: {result.loaded} tensors loaded from {path}"
    if result.layout != "deeplab":
        msg += f" ({result.layout} layout)"
    if result.skipped_shape:
        msg += f"; {len(result.skipped_shape)} skipped for their shape ({', '.join(result.skipped_shape[:4])})"
    if result.missing:
        more = " ..." if len(result.missing) > 4 else ""
        msg += f"; {len(result.missing)} left at their initialisation ({', '.join(result.missing[:4])}{more})"
    log(msg)
    for note in notes:
        log(f"init_weights: {note}")


def _weights_metadata(cfg: TrainConfig, model: nn.Module, dataset: Any, num_classes: int,
                      iteration: int) -> dict[str, Any]:
    from deeplab.models.zoo import model_build_kwargs

    meta: dict[str, Any] = {
        "model": cfg.model.name,
        "num_classes": num_classes,
        "normalization": dict(cfg.data.normalization),
        "model_kwargs": model_build_kwargs(model),
        "dataset": cfg.data.dataset,
        "iteration": iteration,
        "source": "deeplab train",
    }
    names = getattr(dataset, "class_names", None)
    if names is not None and len(names) == num_classes:
        meta["class_names"] = [str(n) for n in names]
    palette = getattr(dataset, "palette", None)
    if palette is not None and len(palette) == num_classes:
        meta["palette"] = [[int(c) for c in rgb] for rgb in np.asarray(palette).tolist()]
    return meta


def stage_settings(cfg: TrainConfig, iteration: int) -> tuple[int | None, float]:
    """``(output_stride, lovasz_weight)`` in force at ``iteration``: the run's, replaced by each
    stage whose ``start`` it has reached (in order)."""
    output_stride, lovasz = cfg.model.output_stride, cfg.solver.lovasz_weight
    for stage in cfg.stages:
        if stage.start > iteration:
            break
        if stage.output_stride is not None:
            output_stride = stage.output_stride
        if stage.lovasz_weight is not None:
            lovasz = stage.lovasz_weight
    return output_stride, lovasz


class _WeightAverage:
    """Float64 running sums of the weights (stochastic weight averaging); its state goes into the
    checkpoints so that a resumed run averages exactly what an uninterrupted one does."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            if value.is_floating_point():
                v = value.detach().to("cpu", torch.float64)
                if key in self.sums:
                    self.sums[key] += v
                else:
                    self.sums[key] = v.clone()
        self.count += 1

    def average(self, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The mean of the added weights in ``like``'s dtypes (integer buffers taken from ``like``)."""
        return {k: (self.sums[k] / self.count).to(v.dtype) if k in self.sums else v.clone() for k, v in like.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "sums": self.sums}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:
            self.count = int(state["count"])
            self.sums = dict(state["sums"])


def _finish(cfg: TrainConfig, core: nn.Module, averager: _WeightAverage, train_ds: Any, *, device: torch.device,
            precision: str, out: Path, main: bool, log, meta, validate) -> str:
    """The recipe's last steps: the weight average, its batch-norm statistics on the whole training
    images, ``final.safetensors`` (and ``final.json`` with its validation)."""
    import copy

    avg = cfg.averaging
    model = copy.deepcopy(core)
    extra: dict[str, Any] = {}
    if averager.count:
        model.load_state_dict(averager.average(core.state_dict()))
        extra["weight_average"] = {"start": avg.start, "interval": avg.interval, "count": averager.count,
                                   "lr": avg.lr}
        log(f"averaging: the mean of {averager.count} weights (every {avg.interval} iterations from {avg.start})")
    elif avg.start is not None:
        log("averaging: no weights reached the average (averaging.start is after the last iteration); "
            "final.safetensors holds the last weights")
    if avg.recalibrate_bn:
        from deeplab.engine.calibrate import recalibrate_bn

        try:
            info = recalibrate_bn(model, train_ds, normalization=cfg.data.normalization,
                                  batch_size=avg.bn_batch_size, precision=precision, device=device)
        except ValueError as e:  # frozen batch norm: nothing to re-estimate
            log(f"averaging.recalibrate_bn: skipped ({e})")
        else:
            extra["bn_calibration"] = {"dataset": cfg.data.dataset, "split": cfg.data.train_split, **info}
            log(f"batch norm re-estimated on {info['images']} whole training images ({info['layers']} layers)")
    model.eval()
    path = out / "final.safetensors"
    if main:
        ckpt.save_state_dict(model.state_dict(), path, {**meta(cfg.solver.max_iter), **extra})
    barrier()
    metrics = validate(cfg.solver.max_iter, model)
    if metrics is not None and main:
        text = json.dumps({"iteration": cfg.solver.max_iter, **extra, **metrics}, indent=1)
        ckpt.atomic_write(out / "final.json", lambda p: p.write_text(text))
        log(f"final weights: val mIoU {100 * float(metrics.get('miou') or 0.0):.2f}% -> {path}")
    return str(path)

def _gather_rng_states() -> list[dict[str, Any]]:
    state = ckpt.capture_rng_state()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, state)
        return out
    return [state]


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drop log lines written after ``iteration`` by a killed run (they are about to be redone)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line).get("iteration", 0)) <= iteration:
                keep.append(line)
        except (ValueError, AttributeError):
            continue
    text = "".join(line + "\n" for line in keep)
    ckpt.atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _plain_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    skip = {"per_image", "examples"}
    out = {}
    for k, v in metrics.items():
        if k in skip:
            continue
        if isinstance(v, float) and math.isnan(v):
            v = None
        elif isinstance(v, list):
            v = [None if isinstance(x, float) and math.isnan(x) else x for x in v]
        elif isinstance(v, (np.floating, np.integer)):
            v = v.item()
        elif isinstance(v, torch.Tensor):
            v = v.tolist()
        out[k] = v
    return out


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    precision: str = "auto",
    ignore_index: int = 255,
    class_weights: torch.Tensor | None = None,
    loss_resolution: str = "logits",
    lovasz_weight: float = 0.0,
    step: bool = True,
) -> torch.Tensor:
    """One optimiser step over ``iter_size`` micro-batches (gradient accumulation), DDP-aware.

    The loss of every logits map (one, or the MSC model's scales and fused map) is the sum of
    the pixel cross-entropies divided by the number of valid pixels of the *global* batch (all
    micro-batches of all processes, gathered before the first backward), so the gradient is that
    of one big batch. Under DDP the gradient all-reduce happens on the last micro-batch only.

    Args:
        model: the network (optionally wrapped in ``DistributedDataParallel``), in training mode.
        optimizer: its optimiser (gradients are zeroed here first).
        micro_batches: ``iter_size`` pairs (images (B,3,H,W) on the model's device, labels (B,H,W)),
            all crops of the same size.
        precision: ``"auto"`` (bf16 where the images' device computes it natively, else fp32),
            ``"bf16"`` (autocast on the images' device; the loss in fp32) or ``"fp32"``.
        ignore_index: label that does not count.
        class_weights: optional (C,) class weights on the device.
        loss_resolution: ``"logits"`` (the paper: labels shrunk to each logits map) or
            ``"labels"`` (each logits map upsampled bilinearly to the labels' size first).
        lovasz_weight: not in the paper (0 = off): adds this times the Lovasz-softmax loss of
            every logits map; unlike the cross-entropy it is not a sum over pixels, so it is
            computed per micro-batch and averaged over micro-batches and processes.
        step: call ``optimizer.step()`` at the end (the trainer checks the loss first).

    Returns:
        The global loss (float64 scalar tensor, identical on every process).
    """
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    world = torch.distributed.get_world_size() if ddp else 1
    device = micro_batches[0][0].device
    bf16 = resolve_precision(precision, device) == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    optimizer.zero_grad(set_to_none=True)
    normalizers: list[float] | None = None
    sizes: list[tuple[int, ...]] = []
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    last = len(micro_batches) - 1
    for k, (images, labels) in enumerate(micro_batches):
        sync = model.no_sync() if (ddp and k < last) else contextlib.nullcontext()
        with sync:
            with autocast:
                outputs = model(images)
            maps = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
            if loss_resolution == "labels":
                maps = [F.interpolate(o.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
                        for o in maps]
            if normalizers is None:
                # The valid pixels of the whole global batch at each logits' size.
                sizes = [tuple(o.shape[-2:]) for o in maps]
                counts = torch.stack([
                    sum(valid_weight(lab, size, ignore_index=ignore_index, weight=class_weights)
                        for _, lab in micro_batches)
                    for size in sizes
                ]).to(device=device, dtype=torch.float64)
                normalizers = all_reduce_sum(counts).tolist()
            elif [tuple(o.shape[-2:]) for o in maps] != sizes:
                raise TrainingError("the training crops of one step must share a size")
            loss = msc_cross_entropy(maps, labels, ignore_index=ignore_index, weight=class_weights,
                                     normalizers=normalizers)
            if lovasz_weight:
                lovasz = sum(lovasz_softmax(o, labels, ignore_index=ignore_index) for o in maps)
                loss = loss + lovasz * (lovasz_weight / (len(micro_batches) * world))
            # DDP averages gradients over processes; the loss is already a global mean.
            (loss * world).backward()
        loss_sum += loss.detach().double()
    all_reduce_sum(loss_sum)
    if step:
        optimizer.step()
    return loss_sum


# ----------------------------------------------------------------------------------------------
# the training loop


def train(
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool | str | os.PathLike = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a model as ``cfg`` says and write the run folder.

    The run folder holds ``config.yaml`` (the fully resolved config), ``checkpoints/iter_N.{safetensors,pt}``
    (the last ``keep_checkpoints``), ``last.safetensors`` (the latest weights), ``best.safetensors`` and
    ``best.json`` (the best validation mIoU so far), ``metrics.jsonl`` (one JSON object per log
    line and per validation) and, with ``tensorboard: true``, ``tensorboard/``.

    Run under ``torchrun`` to train on several processes (``batch_size`` is per process).

    Args:
        cfg: the configuration (see :mod:`deeplab.engine.config`).
        out_dir: the run folder (created; an existing run there needs ``resume``).
        resume: ``True`` continues from the newest checkpoint in ``out_dir``; a path continues from
            that ``iter_N.pt``; ``False`` starts a new run.
        progress: show a progress bar on the main process.

    Returns:
        A summary: ``iteration``, ``loss`` (of the last step), ``best_miou``, ``best_iteration``,
        ``last_weights`` and ``seconds``.

    Raises:
        TrainingError: a problem with the data, the run folder or a checkpoint (message says which).
        TrainingDiverged: the loss became NaN / infinite.
        TypeError: ``cfg`` is not a :class:`TrainConfig` (e.g. a plain dict).
    """
    if not isinstance(cfg, TrainConfig):
        # Typed config in, translated at the edge: a dict goes through parse_config's checks.
        raise TypeError(
            f"train() needs a TrainConfig, got {type(cfg).__name__}: build it with "
            "deeplab.engine.config.parse_config(your_dict) or load_config('config.yaml')"
        )
    device = _select_device(cfg.device)
    dist_info = init_distributed(device.type)
    try:
        if device.type == "cuda":
            device = torch.device("cuda", dist_info.local_rank)
        return _train(cfg, Path(out_dir), resume=resume, progress=progress, device=device, dist_info=dist_info)
    finally:
        cleanup()


def _train(cfg: TrainConfig, out: Path, *, resume: bool | str | os.PathLike, progress: bool,
           device: torch.device, dist_info: DistInfo) -> dict[str, Any]:
    from tqdm import tqdm

    from deeplab.data import build_dataset
    from deeplab.models import build_model, freeze_batchnorm

    main = dist_info.is_main
    run = _Run(out)
    s, d, m = cfg.solver, cfg.data, cfg.model

    def log(msg: str) -> None:
        if main:
            tqdm.write(msg, file=sys.stderr)

    # ---- run folder ------------------------------------------------------------------------
    existing = ckpt.find_checkpoints(run.checkpoints)
    resume_from: Path | None = None
    if resume:
        if resume is True:
            if not existing:
                raise TrainingError(f"--resume: no checkpoint in {run.checkpoints}; start the run without --resume")
            resume_from = existing[-1]
        else:
            resume_from = Path(resume)
    elif existing:
        raise TrainingError(
            f"{out} already holds a run ({existing[-1].name}): continue it with --resume or choose another --out"
        )
    tb_writer = None
    if cfg.tensorboard and main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrainingError(
                "tensorboard: true needs the tensorboard package: pip install 'deeplab[tensorboard]' "
                "(or set tensorboard: false)"
            ) from None
    if main:
        run.checkpoints.mkdir(parents=True, exist_ok=True)
    barrier()

    # ---- data ------------------------------------------------------------------------------
    root = resolve_data_root(d.root)
    if not root.exists():
        raise TrainingError(f"data.root {root} does not exist (from {d.root!r}); fix it in the config or with --set data.root=PATH")
    try:
        train_ds = build_dataset(d.dataset, root, d.train_split, **d.options)
        val_ds = build_dataset(d.dataset, root, d.val_split, **{**d.options, **d.val_options}) if d.val_split else None
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise TrainingError(f"cannot load data set {d.dataset!r} from {root}: {e}") from None
    if len(train_ds) == 0:
        raise TrainingError(f"the {d.train_split!r} split of {root} is empty")
    skip_hint = "" if d.options.get("skip_bad") else _SKIP_BAD_HINT
    ds_ignore = int(getattr(train_ds, "ignore_index", 255))
    if d.ignore_index != ds_ignore:
        raise TrainingError(f"data.ignore_index is {d.ignore_index} but the {d.dataset} masks mark ignored pixels "
                            f"with {ds_ignore}: set data.ignore_index: {ds_ignore}")
    num_classes = m.num_classes or int(train_ds.num_classes)
    if num_classes != int(train_ds.num_classes):
        raise TrainingError(
            f"model.num_classes is {num_classes} but the {d.dataset} data set has {train_ds.num_classes} classes"
        )

    weight = None
    if d.class_weights is not None:
        # The record later steps read (package_default_model.py, logit_adjustment.py), and the
        # cache of named weights, which cost a pass over the training masks.
        record = out / "class_weights.json"
        kind = d.class_weights if isinstance(d.class_weights, str) else "list"  # a name checked by the config
        cached = json.loads(record.read_text()) if kind != "list" and record.is_file() else {}
        # Files written before "kind" existed hold median-frequency weights.
        if cached and cached.get("kind", "median_freq") == kind:
            weights_list = cached["weights"]
        else:
            if kind == "list":
                weights_list = list(d.class_weights)
            else:
                log(f"computing {kind} class weights from the training masks ...")
                weights_list = CLASS_WEIGHTINGS[kind](class_frequencies(train_ds)).tolist()
            if main:
                text = json.dumps({"kind": kind, "weights": weights_list}, indent=1)
                ckpt.atomic_write(record, lambda p: p.write_text(text))
        if len(weights_list) != num_classes:
            raise TrainingError(f"data.class_weights has {len(weights_list)} values for {num_classes} classes")
        weight = torch.tensor(weights_list, dtype=torch.float32, device=device)
        log("class weights: " + ", ".join(f"{w:.3g}" for w in weights_list))

    # ---- model -----------------------------------------------------------------------------
    # Resolved once, for every step and validation; "auto" differs between machines, so the log says.
    precision = resolve_precision(cfg.precision, device)
    if cfg.precision == "auto":
        log(f"precision: auto -> {precision} on this {device.type}")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    # Built at the first stage's stride; the loop switches (in place) when a stage says so.
    output_stride, _ = stage_settings(cfg, 0)
    try:
        model = build_model(m.name, num_classes=num_classes, output_stride=output_stride,
                            atrous_rates=m.atrous_rates, msc_scales=m.msc_scales,
                            resnet_layout=m.resnet_layout, multi_grid=m.multi_grid,
                            decoder_convs=m.decoder_convs)
    except (KeyError, ValueError) as e:
        raise TrainingError(f"cannot build model {m.name!r}: {e}") from None
    if cfg.init_weights and resume_from is None:
        _load_init_weights(model, resolve_weights(cfg.init_weights), log)
    # Frozen batch norm keeps statistics that only loaded weights have; a random network's are
    # mean 0 / variance 1 and must be learnt (a frozen one diverged within 8 iterations).
    freeze = m.freeze_bn if m.freeze_bn is not None else bool(cfg.init_weights)
    if freeze:
        if not cfg.init_weights:
            log("warning: model.freeze_bn is true but no init_weights are loaded: batch norm stays at its "
                "initial statistics (mean 0, variance 1) while the network is random, which usually diverges; "
                "set model.freeze_bn: null (frozen only with init_weights) or false")
        freeze_batchnorm(model)
    log(f"batch norm: {'frozen' if freeze else 'trained'}"
        + (" (model.freeze_bn: null -> " + ("init_weights are loaded)" if freeze else "no init_weights)")
           if m.freeze_bn is None else ""))
    if m.sync_bn and dist_info.is_distributed:
        if device.type != "cuda":
            raise TrainingError("model.sync_bn needs CUDA devices (PyTorch's SyncBatchNorm is GPU-only); "
                                "set model.sync_bn: false or freeze batch norm on CPUs")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    core = model

    groups = build_param_groups(core, weight_decay=s.weight_decay, bias_lr_mult=s.bias_lr_mult,
                                classifier_lr_mult=s.classifier_lr_mult,
                                classifier_bias_lr_mult=s.classifier_bias_lr_mult)
    optimizer = torch.optim.SGD(groups, lr=s.base_lr, momentum=s.momentum, weight_decay=s.weight_decay)
    avg = cfg.averaging
    scheduler = PolyLR(optimizer, base_lr=s.base_lr, max_iter=s.max_iter, power=s.lr_power,
                       warmup_iter=s.warmup_iter, constant_from=avg.start, constant_lr=avg.lr)
    averager = _WeightAverage()
    global_batch = s.batch_size * s.iter_size * dist_info.world_size

    # ---- resume ----------------------------------------------------------------------------
    start = 0
    best = {"miou": -1.0, "iteration": -1}
    if resume_from is not None:
        try:
            state, model_state = ckpt.load_training_state(resume_from)
        except ckpt.CheckpointError as e:
            raise TrainingError(str(e)) from None
        try:
            apply_state_dict(core, model_state, source=resume_from.name, layout="checkpoint")
        except WeightsMismatchError as e:
            raise TrainingError(
                f"checkpoint {resume_from} (model {state.get('model', '?')!r}) does not fit model {m.name!r} "
                f"of this config: {e}; resume with the config the run was started with "
                f"({resume_from.parent.parent / 'config.yaml'}) or start a new run in another --out"
            ) from None
        optimizer.load_state_dict(state["optimizer"])
        averager.load_state_dict(state.get("averaging"))
        start = int(state["iteration"])
        best = dict(state.get("best", best))
        if state.get("global_batch") != global_batch or state.get("seed") != cfg.seed:
            log(f"note: the checkpoint was written with global batch {state.get('global_batch')} and seed "
                f"{state.get('seed')}; this run uses {global_batch} and {cfg.seed}: the data order differs "
                "from an uninterrupted run")
        rng = state["rng"]
        mine = rng[dist_info.rank] if len(rng) == dist_info.world_size else rng[0]
        ckpt.restore_rng_state(mine)
        log(f"resumed from {resume_from} at iteration {start}")
        if main:
            _truncate_metrics(run.metrics, start)
    else:
        # Each process its own dropout stream (the weights were initialised identically above).
        torch.manual_seed(_mix(cfg.seed, 1 + dist_info.rank))
    scheduler.step_to(start)
    if main:  # only now: a resume refused above leaves the run's own config.yaml as it was
        save_config(cfg, out / "config.yaml")

    if dist_info.is_distributed:
        ddp_kwargs: dict[str, Any] = {"device_ids": [device.index]} if device.type == "cuda" else {}
        model = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)

    if cfg.tensorboard and main:
        from torch.utils.tensorboard import SummaryWriter

        tb_writer = SummaryWriter(str(out / "tensorboard"), purge_step=start)

    sampler = _StreamSampler(len(train_ds), seed=cfg.seed, batch_size=s.batch_size, iter_size=s.iter_size,
                             rank=dist_info.rank, world_size=dist_info.world_size, start=start, stop=s.max_iter)
    train_set = _TrainSet(train_ds, seed=cfg.seed, crop_size=d.crop_size, scale_range=d.scale_range,
                          flip=d.flip, normalization=d.normalization, ignore_index=d.ignore_index,
                          focus_classes=d.focus_classes, focus_prob=d.focus_prob, color_jitter=d.color_jitter)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=s.batch_size, sampler=sampler, num_workers=d.num_workers,
        pin_memory=device.type == "cuda", drop_last=False,
        # Its own generator: creating the loader must not draw from the global RNG, which a
        # resumed run restores and dropout then uses.
        generator=torch.Generator().manual_seed(cfg.seed),
        persistent_workers=False, prefetch_factor=4 if d.num_workers > 0 else None,
    )

    meta = lambda it: _weights_metadata(cfg, core, train_ds, num_classes, it)  # noqa: E731

    def save_checkpoint(iteration: int) -> Path:
        rng = _gather_rng_states()
        path = run.checkpoints / f"iter_{iteration:07d}.pt"
        if main:
            state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng,
                "best": dict(best),
                "seed": cfg.seed,
                "global_batch": global_batch,
                "world_size": dist_info.world_size,
                "model": m.name,
                "averaging": averager.state_dict(),
            }
            ckpt.save_training_checkpoint(run.checkpoints, iteration, core.state_dict(), state,
                                                 metadata=meta(iteration), keep=cfg.keep_checkpoints)
            ckpt.link_or_copy(path.with_suffix(".safetensors"), out / "last.safetensors")
        barrier()
        return path

    def validate(iteration: int, net: nn.Module | None = None) -> dict[str, Any] | None:
        if val_ds is None:
            return None
        from deeplab.engine.evaluate import evaluate

        net = core if net is None else net
        was_training = core.training
        try:
            metrics = evaluate(net, val_ds, normalization=d.normalization, precision=precision,
                               limit=d.val_max_images, device=device, optimize=True, num_workers=0)
        except ValueError as e:  # BadSampleError / ImageReadError, naming the file
            raise TrainingError(f"validation data: {e}{skip_hint}") from None
        core.train(was_training)
        return _plain_metrics(metrics)

    # ---- loop ------------------------------------------------------------------------------
    model.train()
    bar = tqdm(total=s.max_iter, initial=start, disable=not (progress and main), unit="it",
               dynamic_ncols=True, file=sys.stderr)
    batches = iter_loader(loader)  # a worker's error keeps its own message
    last_ckpt = ckpt.find_checkpoints(run.checkpoints)
    last_good = str(last_ckpt[-1]) if last_ckpt else None
    t_window, n_window = time.perf_counter(), 0
    t_start = time.perf_counter()
    loss_value = float("nan")
    try:
        for it in range(start, s.max_iter):
            lr = scheduler.step_to(it)
            stage_stride, lovasz_weight = stage_settings(cfg, it)
            if stage_stride is not None and stage_stride != core.output_stride:
                set_output_stride(core, stage_stride)
                log(f"iteration {it}: output stride {stage_stride} from here on (stages)")
            try:
                micro = [next(batches) for _ in range(s.iter_size)]
            except ValueError as e:  # BadSampleError / ImageReadError, naming the file
                raise TrainingError(f"training data: {e}{skip_hint}") from None
            micro = [(img.to(device, non_blocking=True).contiguous(memory_format=memory_format),
                      lab.to(device, non_blocking=True)) for img, lab in micro]
            loss_sum = train_step(model, optimizer, micro, precision=precision,
                                  ignore_index=d.ignore_index, class_weights=weight,
                                  loss_resolution=s.loss_resolution, lovasz_weight=lovasz_weight,
                                  step=False)
            loss_value = float(loss_sum)
            if not math.isfinite(loss_value):
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                fix = ("Lower solver.base_lr, check the labels (values >= num_classes other than "
                       f"{d.ignore_index}) or use precision: fp32")
                if freeze and not cfg.init_weights:
                    fix = ("Batch norm is frozen (model.freeze_bn: true) but no init_weights were loaded, so it "
                           "keeps the statistics of a random network: set model.freeze_bn: null or false")
                raise TrainingDiverged(f"the loss is {loss_value} at iteration {it}: training diverged; {where}. {fix}")
            optimizer.step()
            done = it + 1
            if avg.start is not None and done > avg.start and (done - avg.start) % avg.interval == 0:
                averager.add(core.state_dict())
            n_window += 1
            bar.update(1)
            if main and (done % max(cfg.log_interval, 1) == 0 or done == s.max_iter or done == start + 1):
                now = time.perf_counter()
                ips = n_window * global_batch / max(now - t_window, 1e-9)
                t_window, n_window = now, 0
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.3g}", img_s=f"{ips:.2f}")
                if not progress:
                    log(f"iteration {done}/{s.max_iter}: loss {loss_value:.4f}, lr {lr:.3g}, {ips:.2f} images/s")
                _append_jsonl(run.metrics, {"iteration": done, "loss": loss_value, "lr": lr,
                                            "images_per_s": ips, "time": time.time()})
                if tb_writer is not None:
                    tb_writer.add_scalar("train/loss", loss_value, done)
                    tb_writer.add_scalar("train/lr", lr, done)
                    tb_writer.add_scalar("train/images_per_s", ips, done)
            is_last = done == s.max_iter
            if (cfg.val_interval and done % cfg.val_interval == 0) or (is_last and val_ds is not None):
                metrics = validate(done)
                if metrics is not None and main:
                    miou = float(metrics.get("miou") or 0.0)
                    _append_jsonl(run.metrics, {"iteration": done, "val": metrics, "time": time.time()})
                    improved = miou > best["miou"]
                    if improved:
                        best = {"miou": miou, "iteration": done}
                    log(f"iteration {done}: val mIoU {100 * miou:.2f}% "
                        f"(best {100 * best['miou']:.2f}% at iteration {best['iteration']})")
                    if tb_writer is not None:
                        tb_writer.add_scalar("val/miou", miou, done)
                    if improved:
                        ckpt.save_state_dict(core.state_dict(), out / "best.safetensors",
                                             {**meta(done), "miou": miou})
                        text = json.dumps({"iteration": done, **metrics}, indent=1)
                        ckpt.atomic_write(out / "best.json", lambda p: p.write_text(text))
                if dist_info.is_distributed:
                    holder = [best]
                    torch.distributed.broadcast_object_list(holder, src=0)
                    best = holder[0]
                t_window = time.perf_counter()  # validation time is not training throughput
            if (cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0) or is_last:
                last_good = str(save_checkpoint(done))
                t_window = time.perf_counter()
        final = _finish(cfg, core, averager, train_ds, device=device, precision=precision, out=out, main=main,
                        log=log, meta=meta, validate=validate) if (avg.start is not None or avg.recalibrate_bn) else None
    finally:
        bar.close()
        if tb_writer is not None:
            tb_writer.close()
    return {
        "final_weights": final,
        "iteration": s.max_iter,
        "loss": loss_value,
        "best_miou": best["miou"] if best["iteration"] >= 0 else None,
        "best_iteration": best["iteration"] if best["iteration"] >= 0 else None,
        "last_weights": str(out / "last.safetensors"),
        "seconds": time.perf_counter() - t_start,
    }
