# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""
The DEX pre-training engine: a MONAI ``SupervisedTrainer`` whose loss is
``mae + feature + lambda_co * alignment + lambda_bal * balance`` (``feature``: UMD's optional feature
reconstruction, zero unless the network enables it; computed by :class:`~dex_monai.networks.DEXMaskedAutoEncoder`),
with gradient clipping and non-finite step skipping.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer
from torch.optim import Optimizer

from dex_monai.engines.utils import is_dist, unwrap_network

__all__ = ["DEXPretrainTrainer", "PretrainKeys", "output_scalars"]


class PretrainKeys:
    """Keys of the pre-training engine output (every one is also a key of each decollated item)."""

    LOSS = "loss"
    MAE = "mae"
    ALIGNMENT = "alignment"
    BALANCE = "balance"
    FEATURE = "feature"
    GRAD_NORM = "grad_norm"
    LR = "lr"
    LAMBDA_CO = "lambda_co"
    LAMBDA_BAL = "lambda_bal"
    SKIPPED = "skipped"
    SKIPPED_STEPS = "skipped_steps"
    MODALITY = "modality"

    #: the scalars logged at every iteration by default (the schedule handlers add theirs, e.g. ``gema_momentum``)
    SCALARS = (LOSS, MAE, ALIGNMENT, BALANCE, FEATURE, GRAD_NORM, LR, LAMBDA_BAL, SKIPPED_STEPS)


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        return float(value.detach().item()) if value.numel() == 1 else None
    if isinstance(value, (int, float)):  # bool included
        return float(value)
    return None


def output_scalars(output: Any, keys: Sequence[str] | None = None) -> dict[str, float] | None:
    """
    ``{name: float}`` of the scalar entries of a pre-training engine output (a dict, or a decollated list of
    dicts whose scalars are replicated). Use as ``output_transform`` of ``StatsHandler``/``MLFlowHandler``
    (in a bundle config: ``{"_target_": "dex_monai.engines.output_scalars", "_mode_": "callable"}``).

    Args:
        output: ``engine.state.output``.
        keys: names to keep; None keeps every scalar entry.
    """
    if isinstance(output, (list, tuple)):
        if not output:
            return None
        output = output[0]
    if not isinstance(output, Mapping):
        return None
    names = list(output) if keys is None else list(keys)
    result = {}
    for name in names:
        if name not in output:
            continue
        value = _scalar(output[name])
        if value is not None:
            result[str(name)] = value
    return result or None


class DEXPretrainTrainer(SupervisedTrainer):
    """
    MAE pre-training of a DEX network.

    Each iteration runs ``recon, out = network(images)`` through the inferer, takes
    ``loss = out["mae"] + lambda_co * out["alignment"] + lambda_bal * out["balance"]``, back-propagates, clips the
    gradient norm, and steps the optimiser only when the loss and every gradient are finite; otherwise the step
    is dropped and ``engine.state.skipped_steps`` counts it. Under ``torch.distributed`` the decision is agreed
    by all ranks (one small all-reduce that also averages the logged losses), so no rank steps alone.
    ``skipped_steps`` and ``tracking_run_id`` (the experiment-tracker run that a resumed training continues) are
    part of the engine ``state_dict``, hence of checkpoints.

    The GEMA update of the directors and its cross-rank reduction happen inside the network's forward; the
    schedule handlers of :mod:`dex_monai.engines.handlers` set ``lambda_bal`` on the trainer and GEMA momentum /
    router noise on the network before each iteration, and publish their values in ``engine.state.schedule``.

    The output (``engine.state.output``, decollated into a list of per-image dicts when ``decollate=True``, as
    in MONAI) holds the scalars ``loss``, ``mae``, ``alignment``, ``balance``, ``grad_norm``, ``lr``,
    ``lambda_co``, ``lambda_bal``, ``skipped`` (this step), ``skipped_steps`` (total), every value of
    ``engine.state.schedule`` and the ``modality`` of each image (when the batch has it). The routing of the
    batch is kept undecollated in ``engine.state.routing``: ``{"modality": [B names], "routing": [per DEX layer
    {"indices": [B, K], "gates": [B, K]}]}`` (what :class:`~dex_monai.engines.RoutingStatsHandler` reads).

    Args:
        device: device of the computation.
        max_epochs: epochs to run.
        train_data_loader: loader of dict batches with ``image_key`` (and optionally ``modality_key``).
        network: a :class:`~dex_monai.networks.DEXMaskedAutoEncoder` (possibly wrapped in DDP).
        optimizer: optimiser of the network parameters.
        lambda_co: weight of the alignment (co-training) loss.
        lambda_bal: starting weight of the balance loss (see ``LossWeightScheduleHandler``).
        max_grad_norm: clip the total gradient norm to this value; ``None`` or ``<= 0`` only measures it.
        image_key: batch key of the images ``[B, C, *spatial]``.
        modality_key: batch key of the modality names, copied into the output; None disables.
        epoch_length: iterations per epoch (default: length of the loader).
        non_blocking: non-blocking host-to-device copies.
        inferer: MONAI inferer calling the network (default ``SimpleInferer``).
        train_handlers: handlers to attach.
        amp: mixed precision (CUDA autocast + GradScaler).
        amp_kwargs: ``torch.autocast`` arguments, e.g. ``{"dtype": torch.bfloat16}``.
        decollate: decollate the output into per-image dicts (MONAI convention); False keeps one batch dict.
        optim_set_to_none: ``zero_grad(set_to_none=...)``.
        kwargs: other ``SupervisedTrainer`` arguments (``event_names``, ``to_kwargs`` ...).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: torch.nn.Module,
        optimizer: Optimizer,
        lambda_co: float = 0.01,
        lambda_bal: float = 0.01,
        max_grad_norm: float | None = 1.0,
        image_key: str = "image",
        modality_key: str | None = "modality",
        epoch_length: int | None = None,
        non_blocking: bool = False,
        inferer: Inferer | None = None,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        amp_kwargs: dict | None = None,
        decollate: bool = True,
        optim_set_to_none: bool = True,
        **kwargs: Any,
    ) -> None:
        # set before the base class attaches the handlers (the schedule handlers read lambda_bal)
        self.lambda_co = float(lambda_co)
        self.lambda_bal = float(lambda_bal)
        self.max_grad_norm = None if max_grad_norm is None or max_grad_norm <= 0 else float(max_grad_norm)
        self.image_key = image_key
        self.modality_key = modality_key
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=self._no_loss,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            inferer=inferer,
            train_handlers=train_handlers,
            amp=amp,
            amp_kwargs=amp_kwargs,
            decollate=decollate,
            optim_set_to_none=optim_set_to_none,
            **kwargs,
        )
        # counters kept in the engine state and in its state_dict (so checkpoints carry them)
        self.state.skipped_steps = 0
        self.state.tracking_run_id = None
        self.state.schedule = {}
        for key in ("skipped_steps", "tracking_run_id"):
            if key not in self.state_dict_user_keys:
                self.state_dict_user_keys.append(key)

    @staticmethod
    def _no_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("DEXPretrainTrainer computes its loss from the network output; no loss_function is used.")

    def _parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    def _iteration(self, engine: DEXPretrainTrainer, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        if not isinstance(batchdata, Mapping):
            raise ValueError(f"DEXPretrainTrainer expects dict batches, got {type(batchdata).__name__}.")
        images = batchdata[engine.image_key]
        if hasattr(images, "as_tensor"):
            images = images.as_tensor()
        images = images.to(engine.state.device, non_blocking=engine.non_blocking, **engine.to_kwargs)

        encoder = getattr(unwrap_network(engine.network), "encoder", None)
        if encoder is not None and hasattr(encoder, "m4oe_layers") and encoder.m4oe_layers():
            # M4oE expert stage: each image trains its own modality's expert
            modalities = batchdata.get(engine.modality_key) if engine.modality_key is not None else None
            encoder.set_modality_ids(list(modalities) if modalities is not None else None)

        engine.state.output = output = {}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)

        use_scaler = engine.amp and engine.scaler is not None
        if use_scaler:
            with torch.autocast("cuda", **engine.amp_kwargs):
                _, out = engine.inferer(images, engine.network)
        else:
            _, out = engine.inferer(images, engine.network)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        mae, alignment, balance = out["mae"].float(), out["alignment"].float(), out["balance"].float()
        # UMD feature reconstruction (already weighted by the network; zero unless enabled)
        feature = out["feature"].float() if "feature" in out else torch.zeros_like(mae)
        loss = mae + feature + engine.lambda_co * alignment + engine.lambda_bal * balance
        output.update({"loss": loss.detach(), "mae": mae.detach(), "alignment": alignment.detach()})
        output["balance"] = balance.detach()
        output["feature"] = feature.detach()
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

        if use_scaler:
            engine.scaler.scale(loss).backward()
        else:
            loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)

        if use_scaler:
            engine.scaler.unscale_(engine.optimizer)
        params = engine._parameters()
        if params:
            if engine.max_grad_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, engine.max_grad_norm)
            else:
                grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        else:
            grad_norm = torch.zeros((), device=loss.device)

        # agree on finiteness (and average the logged values) across ranks with a single reduction
        bad = (~torch.isfinite(loss.detach())) | (~torch.isfinite(grad_norm.detach()))
        stats = torch.stack([loss.detach(), mae.detach(), alignment.detach(), balance.detach(), bad.float()])
        if is_dist():
            dist.all_reduce(stats)
            stats[:4] /= dist.get_world_size()
        skipped = bool(stats[4].item() > 0)
        output.update({"loss": stats[0], "mae": stats[1], "alignment": stats[2], "balance": stats[3]})

        # the learning rate this step uses (set before the step by the lr scheduler of the previous iteration)
        lr = float(engine.optimizer.param_groups[0]["lr"])
        if skipped:
            engine.optimizer.zero_grad(set_to_none=True)
            engine.state.skipped_steps = int(getattr(engine.state, "skipped_steps", 0)) + 1
            engine.logger.warning(
                f"iteration {engine.state.iteration}: non-finite loss or gradient "
                f"(loss={stats[0].item():.4g}, grad_norm={grad_norm.item():.4g}); step skipped "
                f"({engine.state.skipped_steps} so far)."
            )
            if use_scaler:
                engine.scaler.update()
        else:
            if use_scaler:
                engine.scaler.step(engine.optimizer)
                engine.scaler.update()
            else:
                engine.optimizer.step()

        output.update(
            {
                "grad_norm": grad_norm.detach().float(),
                "lr": lr,
                "lambda_co": engine.lambda_co,
                "lambda_bal": engine.lambda_bal,
                "skipped": int(skipped),
                "skipped_steps": int(engine.state.skipped_steps),
            }
        )
        for name, value in getattr(engine.state, "schedule", {}).items():
            output.setdefault(name, float(value))
        modality = batchdata.get(engine.modality_key) if engine.modality_key is not None else None
        if modality is not None:
            output["modality"] = modality
        engine.state.routing = {
            "modality": modality,
            "routing": [{"indices": r["indices"].detach(), "gates": r["gates"].detach()} for r in out.get("routing", [])],
        }
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
