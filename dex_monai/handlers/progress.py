# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""A progress bar over the iterations of an epoch, and the epoch hand-off to samplers."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from monai.utils import IgniteInfo, min_version, optional_import

from dex_monai.engines.pretrain import output_scalars

__all__ = ["SamplerEpochHandler", "ProgressBarHandler"]

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")


class SamplerEpochHandler:
    """
    Calls ``sampler.set_epoch(epoch)`` at every ``EPOCH_STARTED`` (MONAI engines do it only for
    ``DistributedSampler``), e.g. for :class:`dex_monai.data.ModalityBalancedSampler`, so each epoch draws a new
    order that is the same on every rank and after a resume.
    """

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler

    def attach(self, engine: Engine) -> None:
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.sampler.set_epoch(engine.state.epoch)


class ProgressBarHandler:
    """
    ignite ``ProgressBar`` showing chosen scalars of the output, attachable from a bundle's handler list.

    Args:
        output_keys: scalars to show (see :func:`~dex_monai.engines.output_scalars`); None shows them all.
        persist: keep the bar of each finished epoch.
        tqdm_kwargs: other ``tqdm`` arguments (``ncols``, ``mininterval`` ...).
    """

    def __init__(self, output_keys: Sequence[str] | None = ("loss", "mae", "lr"), persist: bool = False, **tqdm_kwargs):
        from ignite.handlers import ProgressBar

        self.output_keys = None if output_keys is None else list(output_keys)
        self.bar = ProgressBar(persist=persist, **tqdm_kwargs)

    def attach(self, engine: Engine) -> None:
        self.bar.attach(engine, output_transform=partial(output_scalars, keys=self.output_keys))
