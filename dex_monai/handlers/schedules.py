# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Per-iteration schedules of DEX pre-training (GEMA momentum, router noise, loss weights): pure functions of the
iteration, published in ``engine.state.schedule`` so that StatsHandler / MLflow log them with the losses."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from monai.utils import IgniteInfo, min_version, optional_import

from dex_monai.engines.schedules import cosine_schedule
from dex_monai.engines.utils import (
    unwrap_network,
)

__all__ = ["CosineScheduleHandler", "GEMAMomentumScheduleHandler", "RouterNoiseScheduleHandler", "LossWeightScheduleHandler"]

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")


class CosineScheduleHandler:
    """
    Sets a value from a half-cosine schedule before every iteration (``Events.ITERATION_STARTED``).

    The value at ignite iteration ``i`` (1-based) is ``cosine_schedule((i - 1) / (max_epochs * epoch_length),
    start, end)``: a pure function of the iteration, so a resumed run continues the same curve. The current
    value is published in ``engine.state.schedule[name]``.

    Args:
        name: name of the value (key in ``engine.state.schedule`` and in the engine output).
        start: value at the first iteration.
        end: value reached at the end of the run.
        setter: ``setter(engine, value)`` applying the value; None only publishes it.
    """

    def __init__(
        self, name: str, start: float, end: float, setter: Callable[[Engine, float], None] | None = None
    ) -> None:
        self.name = name
        self.start = float(start)
        self.end = float(end)
        self.setter = setter
        self.value: float | None = None

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.ITERATION_STARTED):
            engine.add_event_handler(Events.ITERATION_STARTED, self)

    @staticmethod
    def progress(engine: Engine) -> float:
        """Fraction of the run done before the current iteration."""
        total = (engine.state.max_epochs or 1) * (engine.state.epoch_length or 1)
        return (engine.state.iteration - 1) / max(1, total)

    def value_at(self, progress: float) -> float:
        return cosine_schedule(progress, self.start, self.end)

    def apply(self, engine: Engine, value: float) -> None:
        if self.setter is not None:
            self.setter(engine, value)

    def __call__(self, engine: Engine) -> None:
        self.value = self.value_at(self.progress(engine))
        self.apply(engine, self.value)
        schedule = getattr(engine.state, "schedule", None)
        if schedule is None:
            schedule = engine.state.schedule = {}
        schedule[self.name] = self.value


class GEMAMomentumScheduleHandler(CosineScheduleHandler):
    """GEMA momentum of the directors, cosine from ``start`` (0.99) up to ``end`` (0.999), set on the network."""

    def __init__(self, network: torch.nn.Module, start: float = 0.99, end: float = 0.999, name: str = "gema_momentum"):
        super().__init__(name=name, start=start, end=end)
        self.network = network

    def apply(self, engine: Engine, value: float) -> None:
        unwrap_network(self.network).set_schedule_values(gema_momentum=value)


class RouterNoiseScheduleHandler(CosineScheduleHandler):
    """Standard deviation of the routers' exploration noise, cosine from ``start`` (1) to ``end`` (0)."""

    def __init__(self, network: torch.nn.Module, start: float = 1.0, end: float = 0.0, name: str = "noise_std"):
        super().__init__(name=name, start=start, end=end)
        self.network = network

    def apply(self, engine: Engine, value: float) -> None:
        unwrap_network(self.network).set_schedule_values(noise_std=value)


class LossWeightScheduleHandler(CosineScheduleHandler):
    """
    A loss weight attribute of the engine (default ``lambda_bal``) cosine-decayed from ``start`` to ``end``.

    Args:
        start: starting weight; None takes the engine attribute's value when attached.
        end: final weight.
        attr: engine attribute to set.
    """

    def __init__(self, start: float | None = None, end: float = 0.0, attr: str = "lambda_bal") -> None:
        super().__init__(name=attr, start=0.0 if start is None else start, end=end)
        self.attr = attr
        self._start_from_engine = start is None

    def attach(self, engine: Engine) -> None:
        if self._start_from_engine:
            self.start = float(getattr(engine, self.attr))
        super().attach(engine)

    def apply(self, engine: Engine, value: float) -> None:
        setattr(engine, self.attr, value)
