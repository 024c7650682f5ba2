"""Weight averaging: the mean of several checkpoints of one network (SWA, "model soups").

Stochastic weight averaging (Izmailov et al. 2018) averages the weights a run visits at a
constant learning rate; the mean lies nearer the centre of the flat region those iterates
wander in. It is written here rather than taken from ``torch.optim.swa_utils.AveragedModel``
because that class averages a live model during training, while a finished run's saved
checkpoints are what there is to average afterwards; the mean itself is one line.

The batch-norm statistics of the inputs are averaged like every other tensor, but the mean
of statistics is not the statistics of the mean weights: re-estimate them on training images
(``deeplab calibrate-bn``, SWA's final step) before using the result.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from deeplab.weights.safetensors_io import read_safetensors

__all__ = ["average_weight_files", "has_batch_norm_statistics"]

_PER_FILE_KEYS = ("bn_calibration", "record")


def has_batch_norm_statistics(state_dict: dict[str, torch.Tensor]) -> bool:
    """True if the state dict holds batch-norm running statistics (they need re-estimating)."""
    return any(k.endswith("running_var") for k in state_dict)


def average_weight_files(paths: Sequence[str | os.PathLike[str]]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The element-wise mean of two or more project weights files of one network.

    Floating tensors are averaged in float64 and stored in the first file's dtype for that
    tensor (float16 files stay float16). Integer tensors (batch norm's ``num_batches_tracked``)
    are not weights: the last file's are kept. The metadata is the last file's, with
    ``weight_average`` (the count and the file names) added and ``bn_calibration`` and ``record``
    (true of that file's tensors only) dropped.

    Args:
        paths: ``.safetensors`` files written by this project (``deeplab train``, ``convert``),
            all of the same model: same ``model`` name, tensor names and shapes.

    Raises:
        ValueError: fewer than two files, a file that is not the project's safetensors, or a
            file of another model (the message names it and the first differing tensor).
    """
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise ValueError(f"averaging needs at least two weights files, got {len(paths)}")
    total: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    metadata: dict[str, Any] = {}
    model_name = None
    for i, path in enumerate(paths):
        if path.suffix.lower() != ".safetensors":
            raise ValueError(f"{path}: only the project's .safetensors files can be averaged: "
                             "convert other formats first with deeplab convert")
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        state, metadata = read_safetensors(path)
        name = metadata.get("model")
        if not name:
            raise ValueError(f"{path} has no 'model' metadata: convert it with deeplab convert --model NAME first")
        if i == 0:
            model_name, reference = name, state
            total = {k: v.double() if v.is_floating_point() else v.clone() for k, v in state.items()}
            continue
        if name != model_name:
            raise ValueError(f"{path} holds a {name} but {paths[0]} a {model_name}: "
                             "only checkpoints of one network can be averaged")
        if state.keys() != reference.keys():
            odd = sorted(state.keys() ^ reference.keys())
            raise ValueError(f"{path} and {paths[0]} have different tensors ({len(odd)} differ, first: "
                             f"{odd[0]}): only checkpoints of one network can be averaged")
        for key, value in state.items():
            if value.shape != reference[key].shape:
                raise ValueError(f"{path}: {key} has shape {tuple(value.shape)} but {tuple(reference[key].shape)} "
                                 f"in {paths[0]}: only checkpoints of one network can be averaged")
            if value.is_floating_point():
                total[key] += value.double()
            else:
                total[key] = value.clone()
    n = len(paths)
    averaged = {k: (v / n).to(reference[k].dtype) if v.is_floating_point() else v for k, v in total.items()}
    # What described one input's tensors no longer holds for the mean: its recalibrated statistics
    # and its measured figures.
    metadata = {k: v for k, v in metadata.items() if k not in _PER_FILE_KEYS}
    metadata["weight_average"] = {"count": n, "sources": [p.name for p in paths]}
    return averaged, metadata
