# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Helpers of the DEX handlers: the items of an engine output, and objects gathered from every rank."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ignite.distributed as idist
import torch

__all__ = ["output_items", "gather_objects"]


def output_items(output: Any) -> list[Mapping]:
    """The per-image dicts of an engine output: a decollated list as it is, a batch dict split along its first axis."""
    if isinstance(output, Mapping):
        batch = None
        for value in output.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                batch = value.shape[0]
                break
        if batch is None:
            return []
        return [{k: v[i] for k, v in output.items() if isinstance(v, torch.Tensor) and v.dim() > 0} for i in range(batch)]
    if isinstance(output, (list, tuple)):
        return [o for o in output if isinstance(o, Mapping)]
    return []


def gather_objects(values: list) -> list:
    """The concatenation of ``values`` from every rank (rank order), through ``ignite.distributed``."""
    if idist.get_world_size() == 1:
        return values
    return [v for part in idist.all_gather(values) for v in (part or [])]
