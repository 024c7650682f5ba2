"""DataLoader construction: stacking collate, seeded workers, optional DistributedSampler."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["build_dataloader", "collate_pairs", "iter_loader", "seed_worker", "set_epoch", "unwrap_worker_error"]


def _stack(items: Sequence[Any]) -> Any:
    first = items[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.stack(list(items))
    if isinstance(first, np.ndarray):
        return torch.from_numpy(np.stack(items))
    if isinstance(first, (int, float)):
        return torch.tensor(items)
    return list(items)


def collate_pairs(batch: Sequence[Any]) -> Any:
    """Stack a list of samples field by field.

    Reads: a list of tuples ``(image, mask, ...)`` of tensors or numpy arrays of equal shapes.
    Writes: a tuple of stacked tensors (numpy arrays become tensors without a copy of their
    dtype: uint8 images stay uint8). Unequal shapes raise an error that says to crop or pad.
    """
    if not batch:
        raise ValueError("empty batch")
    if not isinstance(batch[0], (tuple, list)):
        return _stack(batch)
    fields = list(zip(*batch))
    out = []
    for k, field in enumerate(fields):
        shapes = {tuple(getattr(x, "shape", ())) for x in field}
        if len(shapes) > 1:
            raise ValueError(
                f"cannot stack field {k} of the batch: shapes {sorted(shapes)} differ; use a "
                "crop/pad transform (e.g. build_train_transforms(crop_size=...)) or batch_size=1"
            )
        out.append(_stack(field))
    return tuple(out)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy and ``random`` from the worker's torch seed.

    torch already gives each worker its own seed (derived from the loader's generator), so
    torch-based transforms are reproducible; this extends that to numpy and ``random``. It also
    pins each worker to one thread so that workers do not fight the training process for cores.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    torch.set_num_threads(1)


def build_dataloader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    num_workers: int,
    distributed: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    persistent_workers: bool = True,
    pin_memory: bool = False,
    prefetch_factor: int | None = 2,
    num_replicas: int | None = None,
    rank: int | None = None,
) -> DataLoader:
    """A DataLoader with the project's defaults.

    Args:
        dataset: a map-style data set (``ds[i]`` -> ``(image, mask)``).
        batch_size: samples per batch (per process when ``distributed``).
        shuffle: reshuffle every epoch (seeded).
        num_workers: decoding processes (0: in the main process).
        distributed: shard with a ``DistributedSampler`` (needs an initialised process group,
            or ``num_replicas``/``rank``); call :func:`set_epoch` at the start of each epoch.
        seed: seeds the shuffling and the workers' RNGs (so augmentations are reproducible).
        drop_last: drop the last incomplete batch (and, distributed, the uneven tail).
        persistent_workers: keep workers alive between epochs (when ``num_workers > 0``).
        pin_memory: page-locked batches for faster host -> GPU copies.
        prefetch_factor: batches each worker prepares ahead (``num_workers > 0`` only).
        num_replicas: world size override for the sampler (default: from the process group).
        rank: rank override for the sampler.

    Returns:
        ``torch.utils.data.DataLoader`` yielding ``(images, masks)`` stacked tensors.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    sampler = None
    if distributed:
        sampler = DistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=int(seed), drop_last=drop_last
        )
    workers = num_workers > 0
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_pairs,
        pin_memory=pin_memory,
        drop_last=drop_last,
        worker_init_fn=seed_worker if workers else None,
        generator=generator,
        persistent_workers=persistent_workers and workers,
        prefetch_factor=prefetch_factor if workers else None,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell a distributed sampler the epoch so that each epoch is shuffled differently (no-op otherwise)."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


def unwrap_worker_error(exc: BaseException) -> BaseException:
    """The error a DataLoader worker raised, without the traceback torch writes into its message.

    torch re-raises a worker's exception as ``type(exc)("Caught X in DataLoader worker process N.
    Original Traceback ...")``; the project's errors are one paragraph naming the file, so this
    rebuilds the exception from the original message (the traceback's last entry). Any other
    exception is returned unchanged.
    """
    text = str(exc)
    if not (text.startswith("Caught ") and "DataLoader worker" in text.split("\n", 1)[0]):
        return exc
    cls = type(exc)
    # The name as the traceback module writes it on the exception's line.
    name = cls.__qualname__ if cls.__module__ in ("builtins", "__main__") else f"{cls.__module__}.{cls.__qualname__}"
    at = text.rfind(f"\n{name}: ")
    if at < 0:
        return exc
    try:
        return cls(text[at + len(name) + 3 :].strip())
    except Exception:  # a constructor that does not take one message
        return exc


def iter_loader(loader: Iterable[Any]) -> Iterator[Any]:
    """Iterate ``loader``, re-raising worker errors with their own message (:func:`unwrap_worker_error`)."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception as e:
            err = unwrap_worker_error(e)
            if err is e:
                raise
            raise err from None
        yield batch
