# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""
Schedules of DEX pre-training as pure functions of training progress.

All schedules are defined per iteration; ``progress`` is the fraction of the run already done,
``(iteration - 1) / total_iterations`` for the 1-based ignite iteration being run, so a run resumed at
iteration ``i`` gets exactly the values an uninterrupted run had at ``i``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["cosine_schedule", "linear_scaled_lr", "warmup_cosine_factor", "warmup_cosine_lambda", "warmup_cosine_scheduler"]


def cosine_schedule(progress: float, start: float, end: float) -> float:
    """Half-cosine from ``start`` (progress 0) to ``end`` (progress 1); progress is clamped to [0, 1]."""
    p = min(max(float(progress), 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * p))


def linear_scaled_lr(base_lr: float, batch_size: int, world_size: int = 1, reference_batch: int = 512) -> float:
    """The linear scaling rule of MAE/DEX: ``base_lr * global_batch / reference_batch``."""
    return float(base_lr) * int(batch_size) * int(world_size) / float(reference_batch)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_factor: float = 0.0) -> float:
    """
    Multiplier of the peak learning rate for optimiser step ``step`` (0-based): linear warm-up over
    ``warmup_steps`` steps (``(step + 1) / warmup_steps``), then a half-cosine down to ``min_factor`` at
    ``total_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return cosine_schedule((step - warmup_steps) / span, 1.0, min_factor)


def warmup_cosine_lambda(warmup_steps: int, total_steps: int, min_factor: float = 0.0) -> Callable[[int], float]:
    """
    ``lr_lambda`` for ``torch.optim.lr_scheduler.LambdaLR``. It is a plain function on purpose: LambdaLR does not
    put plain functions into its ``state_dict``, so a resumed run keeps the lengths of its own config.
    """
    warmup_steps, total_steps, min_factor = int(warmup_steps), int(total_steps), float(min_factor)

    def lr_lambda(step: int) -> float:
        return warmup_cosine_factor(step, warmup_steps, total_steps, min_factor)

    return lr_lambda


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_epochs: float | None = None,
    epoch_length: int | None = None,
    min_factor: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """
    Warm-up + cosine ``LambdaLR`` stepped once per iteration (e.g. by MONAI's ``LrScheduleHandler`` with
    ``epoch_level=False``).

    Args:
        optimizer: optimiser whose ``lr`` is the peak learning rate.
        total_steps: iterations of the whole run.
        warmup_steps: warm-up iterations (used when ``warmup_epochs`` is None).
        warmup_epochs: warm-up in epochs, converted with ``epoch_length``.
        epoch_length: iterations per epoch, needed with ``warmup_epochs``.
        min_factor: final learning rate as a fraction of the peak.
    """
    if warmup_epochs is not None:
        if epoch_length is None:
            raise ValueError("`epoch_length` is needed to convert `warmup_epochs` into iterations.")
        warmup_steps = int(round(float(warmup_epochs) * int(epoch_length)))
    warmup_steps = min(int(warmup_steps), int(total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine_lambda(warmup_steps, total_steps, min_factor))
