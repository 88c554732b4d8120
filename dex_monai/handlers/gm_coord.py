# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Hands each batch's modalities to UMD's GM-Coord loss (:class:`dex_monai.losses.GMCoordLoss`) and publishes its
coefficients as ``gm_coef_<modality>`` in ``engine.state.metrics``."""

from __future__ import annotations

from dex_monai.losses.gm_coord import GMCoordLoss

__all__ = ["GMCoordHandler"]


class GMCoordHandler:
    """Ignite handler: feeds each batch's modalities to a :class:`GMCoordLoss` and publishes its coefficients.

    Args:
        loss: the trainer's :class:`GMCoordLoss`.
        modality_key: batch key holding the modality name of every item.
        enabled: attach nothing when false (lets bundle configs switch GM-Coord with one key).
    """

    def __init__(self, loss: GMCoordLoss, modality_key: str = "modality", enabled: bool = True) -> None:
        self.loss = loss
        self.modality_key = modality_key
        self.enabled = enabled

    def attach(self, engine) -> None:
        from ignite.engine import Events

        if not self.enabled:
            return
        if not isinstance(self.loss, GMCoordLoss):
            raise TypeError(f"GMCoordHandler needs a GMCoordLoss, got {type(self.loss).__name__}.")
        engine.add_event_handler(Events.ITERATION_STARTED, self._set_modalities)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._publish)

    def _set_modalities(self, engine) -> None:
        batch = engine.state.batch
        modalities = batch.get(self.modality_key) if isinstance(batch, dict) else None
        if modalities is None:
            raise KeyError(
                f"GM-Coord needs the modality of every item under batch key '{self.modality_key}' "
                "(add it to the datalist entries)."
            )
        self.loss.set_modalities(list(modalities))

    def _publish(self, engine) -> None:
        for name, value in self.loss.coefficients.items():
            engine.state.metrics[f"gm_coef_{name}"] = value
