"""Training checkpoints: weights in safetensors, the rest of the state in a weights-only ``.pt``.

A checkpoint at iteration N is two files in ``RUN/checkpoints/``:

- ``iter_000N.safetensors``: the model's state dict (parameters and buffers, fp32) with the
  project's metadata (model name, classes, normalisation ...), usable as-is by ``deeplab segment``;
- ``iter_000N.pt``: the optimiser (momentum buffers), the lr schedule, the iteration, the RNG
  states (torch, CUDA, numpy, Python), the best validation score so far and the SHA-256 of the
  weights file, stored as plain tensors and Python types so that it loads with
  ``torch.load(weights_only=True)`` (no unpickling of arbitrary objects).

Both are written to a temporary file in the same folder and renamed into place (``os.replace``),
weights first: a ``.pt`` only exists once its weights are complete, and a crash or a full disk
leaves the previous checkpoint untouched. The data order needs no state: it is a function of the
seed and the iteration (see :mod:`deeplab.engine.train`).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deeplab.fileio import atomic_path, sha256_file

__all__ = [
    "CheckpointError",
    "atomic_write",
    "capture_rng_state",
    "find_checkpoints",
    "link_or_copy",
    "load_state_dict_file",
    "load_training_state",
    "restore_rng_state",
    "save_state_dict",
    "save_training_checkpoint",
]

_NAME = re.compile(r"^iter_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read (the message names the file and what to do)."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it to ``path``.

    Raises:
        CheckpointError: the write failed (e.g. the disk is full); ``path`` is unchanged and the
            temporary file removed.
    """
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            write(tmp)
    except OSError as e:
        raise CheckpointError(
            f"could not write {path}: {e.strerror or e} (is the disk full?); "
            "the previous checkpoint is untouched"
        ) from e


def link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` a hard link to ``src`` (a copy where links are not possible), atomically."""
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        tmp.unlink(missing_ok=True)
        atomic_write(dst, lambda p: p.write_bytes(Path(src).read_bytes()))


def save_state_dict(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, Any] | None = None) -> None:
    """Write a state dict as safetensors, atomically; metadata values are JSON-encoded strings.

    Args:
        state: name -> tensor (channels-last or other strided tensors are made contiguous).
        path: the ``.safetensors`` file.
        metadata: the project's weights metadata (``model``, ``num_classes``, ``class_names`` ...).
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    # The encoding of deeplab.weights (JSON values; "format": "pt" as safetensors tools expect).
    meta = {str(k): json.dumps(v, sort_keys=True) for k, v in (metadata or {}).items()}
    meta["format"] = "pt"
    atomic_write(Path(path), lambda p: save_file(tensors, str(p), metadata=meta))


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors state dict (int8 weights dequantized); a truncated or corrupt file raises
    :class:`CheckpointError`."""
    from safetensors.torch import load_file

    from deeplab.weights.safetensors_io import dequantize_state_dict

    try:
        return dequantize_state_dict(load_file(str(path)), path)
    except Exception as e:  # safetensors raises its own error types for truncated headers/data
        raise CheckpointError(f"cannot read weights file {path}: {e}") from e


def capture_rng_state() -> dict[str, Any]:
    """Every RNG state training touches, as tensors and plain Python types."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_state[0]), "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(
    folder: Path,
    iteration: int,
    model_state: dict[str, torch.Tensor],
    training_state: dict[str, Any],
    *,
    metadata: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write ``iter_N.safetensors`` then ``iter_N.pt`` into ``folder``; delete all but the last ``keep``.

    Args:
        folder: the run's ``checkpoints/`` folder (created if needed).
        iteration: completed iterations (the resumed run starts there).
        model_state: the model's state dict.
        training_state: optimiser / scheduler / RNG / bookkeeping (tensors and Python types only).
        metadata: weights metadata for the safetensors header.
        keep: number of checkpoints to keep.

    Returns:
        The ``.pt`` path.

    Raises:
        CheckpointError: a write failed; earlier checkpoints are untouched.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"iter_{iteration:07d}"
    weights = folder / f"{stem}.safetensors"
    pt = folder / f"{stem}.pt"
    save_state_dict(model_state, weights, metadata)
    state = dict(training_state)
    state["iteration"] = int(iteration)
    state["weights_file"] = weights.name
    state["weights_sha256"] = sha256_file(weights)
    atomic_write(pt, lambda p: torch.save(state, p))
    for old in find_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
        old.with_suffix(".safetensors").unlink(missing_ok=True)
    return pt


def find_checkpoints(folder: Path) -> list[Path]:
    """The ``iter_N.pt`` files in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_training_state(pt: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load a checkpoint written by :func:`save_training_checkpoint`: (training state, model state dict).

    Raises:
        CheckpointError: missing, truncated or mismatched files; the message names the file and,
            when there is one, the previous checkpoint to resume from instead.
    """
    pt = Path(pt)
    if pt.suffix.lower() == ".safetensors":
        # A weights file holds no optimiser / RNG state; its iter_N.pt twin does.
        twin = pt.with_suffix(".pt")
        fix = (f"resume from its training checkpoint with --resume {twin}" if twin.is_file()
               else f"to start a new run from these weights, set init_weights: {pt} in the config")
        raise CheckpointError(
            f"{pt} is a weights file, not a training checkpoint (iter_N.pt with the optimiser state): {fix}"
        )
    it = _iteration_of(pt)
    # A checkpoint under another name (a copy) has no iteration to compare: offer every one.
    older = [p for p in find_checkpoints(pt.parent) if p != pt and (it < 0 or _iteration_of(p) < it)]
    hint = (
        f"; resume from the previous checkpoint with --resume {older[-1]}"
        if older
        else "; no earlier checkpoint exists: start the run again without --resume"
    )
    try:
        state = torch.load(pt, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {pt} does not exist") from None
    except Exception as e:  # truncated zip, bad pickle opcode, foreign object...
        raise CheckpointError(f"checkpoint {pt} is unreadable (truncated or corrupt: {e}){hint}") from e
    if not isinstance(state, dict) or "weights_file" not in state or "iteration" not in state:
        raise CheckpointError(f"{pt} is not a deeplab training checkpoint{hint}")
    weights = pt.parent / state["weights_file"]
    if not weights.is_file():
        raise CheckpointError(f"the weights file {weights} of checkpoint {pt} is missing{hint}")
    if sha256_file(weights) != state.get("weights_sha256"):
        raise CheckpointError(
            f"the weights file {weights} does not match checkpoint {pt} (truncated or overwritten){hint}"
        )
    try:
        model_state = load_state_dict_file(weights)
    except CheckpointError as e:
        raise CheckpointError(f"{e}{hint}") from e
    return state, model_state


def _iteration_of(pt: Path) -> int:
    m = _NAME.match(Path(pt).name)
    return int(m.group(1)) if m else -1
