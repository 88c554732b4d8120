"""M4oE's two stages on a MONAI engine: the modality of every batch handed to the modality-expert layers, and the
switch from the expert stage to the gated stage after a set number of iterations."""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events

__all__ = ["M4oEStageHandler"]


class M4oEStageHandler:
    """Hand each batch's modalities (``batch[modality_key]``: names or expert ids) to a network's M4oE layers before
    its forward, and (``expert_iterations``) run the first ``expert_iterations`` iterations in the ``"expert"``
    stage, the rest in the ``"gated"`` stage.

    Works with any network that has ``set_modality_ids`` and ``set_m4oe_stage`` (:class:`~dex_monai.networks.DEXViT`,
    :class:`~dex_monai.networks.M4oESwinUNETR`, :class:`~dex_monai.networks.M4oESwinClassifier`). The ids are cleared
    after every iteration, so another engine (a validator) never sees a stale batch's modalities; a batch without the
    key falls back to the layers' ``default_modality``. When the engine completes, the gated stage is set if
    ``expert_iterations`` was given.

    Args:
        network: the network (wrappers such as DDP are unwrapped).
        modality_key: the batch key holding the modality of every image.
        expert_iterations: iterations in the expert stage before the gated stage; None leaves the stage alone.
    """

    def __init__(self, network: torch.nn.Module, modality_key: str = "modality",
                 expert_iterations: int | None = None) -> None:
        from dex_monai.engines.utils import unwrap_network

        self.network = unwrap_network(network)
        self.modality_key = modality_key
        self.expert_iterations = expert_iterations

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self.iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def iteration_started(self, engine: Engine) -> None:
        if self.expert_iterations is not None:
            self.network.set_m4oe_stage("expert" if engine.state.iteration <= self.expert_iterations else "gated")
        batch = engine.state.batch
        modalities = batch.get(self.modality_key) if isinstance(batch, dict) else None
        if modalities is not None:
            self.network.set_modality_ids(list(modalities) if not torch.is_tensor(modalities) else modalities)

    def iteration_completed(self, engine: Engine) -> None:
        self.network.set_modality_ids(None)

    def completed(self, engine: Engine) -> None:
        if self.expert_iterations is not None:
            self.network.set_m4oe_stage("gated")
