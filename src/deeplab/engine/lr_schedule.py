"""The paper's "poly" learning-rate policy and the per-group multipliers (Caffe's ``lr_mult``).

``lr(it) = base_lr * (1 - it / max_iter) ** power`` at every iteration (power 0.9), the value
Caffe's ``poly`` policy computes before the update of iteration ``it`` (so iteration 0 uses the
base rate and the rate reaches 0 at ``max_iter``). Each optimiser parameter group carries an
``lr_mult`` (1 backbone weights, 2 backbone biases, 10 classifier weights, 20 classifier biases).
"""

from __future__ import annotations

import torch

__all__ = ["PolyLR", "poly_lr"]


def poly_lr(base_lr: float, iteration: int, max_iter: int, power: float = 0.9, warmup_iter: int = 0) -> float:
    """The poly learning rate at ``iteration`` (0-based).

    Args:
        base_lr: rate at iteration 0.
        iteration: current iteration, clamped to ``[0, max_iter]``.
        max_iter: total iterations (the rate is 0 there).
        power: poly exponent (the paper: 0.9).
        warmup_iter: not in the paper (0 = off): scale the rate by ``(iteration + 1) / warmup_iter``
            for the first ``warmup_iter`` iterations, which tames the first steps of training from scratch.
    """
    if max_iter <= 0:
        raise ValueError(f"max_iter must be > 0, got {max_iter}")
    it = min(max(iteration, 0), max_iter)
    lr = base_lr * (1.0 - it / max_iter) ** power
    if warmup_iter > 0 and it < warmup_iter:
        lr *= (it + 1) / warmup_iter
    return lr


class PolyLR:
    """Sets every parameter group's ``lr`` to ``poly_lr(base_lr, it) * group["lr_mult"]``.

    Unlike ``torch.optim.lr_scheduler`` the rate is a pure function of the iteration, so resuming
    needs only the iteration (kept in :meth:`state_dict` for checking).

    Args:
        optimizer: groups may carry ``lr_mult`` (default 1).
        base_lr: rate of a group with ``lr_mult`` 1 at iteration 0.
        max_iter: total iterations.
        power: poly exponent.
        warmup_iter: linear warm-up length (0 = none, the paper), see :func:`poly_lr`.
        constant_from / constant_lr: not in the paper: from iteration ``constant_from`` on the
            base rate is ``constant_lr`` (stochastic weight averaging's constant schedule).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, base_lr: float, max_iter: int, power: float = 0.9,
                 warmup_iter: int = 0, constant_from: int | None = None,
                 constant_lr: float | None = None) -> None:
        self.optimizer = optimizer
        self.base_lr = float(base_lr)
        self.max_iter = int(max_iter)
        self.power = float(power)
        self.warmup_iter = int(warmup_iter)
        self.constant_from = constant_from if constant_lr is not None else None
        self.constant_lr = constant_lr
        self.iteration = 0
        self.step_to(0)

    def step_to(self, iteration: int) -> float:
        """Set the rates for ``iteration``; return the base (``lr_mult`` 1) rate."""
        self.iteration = int(iteration)
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr

    def get_lr(self) -> float:
        """The current base (``lr_mult`` 1) rate."""
        if self.constant_from is not None and self.iteration >= self.constant_from:
            return float(self.constant_lr)
        return poly_lr(self.base_lr, self.iteration, self.max_iter, self.power, self.warmup_iter)

    def state_dict(self) -> dict[str, float | int]:
        return {"iteration": self.iteration, "base_lr": self.base_lr, "max_iter": self.max_iter, "power": self.power,
                "warmup_iter": self.warmup_iter}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.base_lr = float(state["base_lr"])
        self.max_iter = int(state["max_iter"])
        self.power = float(state["power"])
        self.warmup_iter = int(state.get("warmup_iter", 0))
        self.step_to(int(state["iteration"]))
