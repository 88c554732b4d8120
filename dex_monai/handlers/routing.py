# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Routing statistics of DEX layers: expert load and per-modality expert use, as JSON + heatmaps per epoch and a
few summary metrics."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from monai.utils import IgniteInfo, min_version, optional_import

from dex_monai.engines.utils import (
    is_dist,
    is_rank0,
    unwrap_network,
)
from dex_monai.handlers.tracking import add_tracking_artifact, add_tracking_metrics

__all__ = ["RoutingStatsHandler", "routing_summary", "usage_to_json", "plot_usage"]

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")


def _as_names(value: Any, size: int, names: Sequence[str] | None) -> list[str]:
    if value is None:
        return ["all"] * size
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1).tolist()
    if isinstance(value, (str, int)):
        value = [value] * size
    result = []
    for v in value:
        if isinstance(v, torch.Tensor):
            v = v.item()
        if isinstance(v, (int, np.integer)) and names is not None and 0 <= int(v) < len(names):
            v = names[int(v)]
        result.append(str(v))
    return result


class RoutingStatsHandler:
    """
    Counts, over each epoch, which experts every modality chose in every DEX layer, from the batch routing
    record ``engine.state.routing`` of :class:`~dex_monai.engines.DEXPretrainTrainer` (``{"modality": [B],
    "routing": [per layer {"indices": [B, K], ...}]}``), or, when an engine has no such record, from
    ``routing`` / ``modality`` entries of its output (a batch dict or a decollated list).

    At the end of each epoch it

    - queues a few tracker metrics whose number depends on the layers only, never on the experts or modalities
      (see :func:`routing_summary`): ``routing/load_entropy/layer_<l>`` (entropy of the network's EMA expert load
      over ``log E``: 1 = balanced), ``routing/nmi/layer_<l>`` (modality-expert NMI of the epoch's choices, from
      :func:`dex_monai.analysis.count_table_nmi`) and their means ``routing/load_entropy_mean``,
      ``routing/nmi_mean``;
    - on rank 0 writes ``<output_dir>/routing/expert_usage_epoch_<N>.json`` (``{"modalities", "layers",
      "num_experts", "usage": {modality: [[share per expert] per layer]}, "expert_load": [[load per expert] per
      layer], "summary": {metric: value}, "epoch"}``) and the heatmap ``expert_usage_epoch_<N>.png`` (layers x
      experts, one panel per modality), queued as tracker artifacts under ``routing/``: the per-expert detail
      lives there;
    - keeps the usage of the finished epoch in ``self.last_usage`` and resets the counts.

    Every image adds one count per chosen expert per layer (top-k routing: k counts). Under
    ``torch.distributed`` the counts of each iteration are gathered from all ranks, so every rank holds the
    global statistics (and a checkpoint written by rank 0 has them all); this handler must therefore be
    attached on every rank. The counts are part of :meth:`state_dict`, so a resumed epoch keeps them.

    Args:
        network: the DEX network (wrapped or not); gives the experts per layer and the expert load.
        output_dir: folder receiving ``routing/``; None writes no files.
        modality_names: names of integer modality labels (optional).
        output_transform: maps the record (``engine.state.routing``, else ``engine.state.output``) before reading;
            identity by default.
        write_files: write the JSON and PNG files on rank 0.
        artifact_dir: tracker folder of the files.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        output_dir: str | os.PathLike | None = None,
        modality_names: Sequence[str] | None = None,
        output_transform: Callable[[Any], Any] = lambda x: x,
        write_files: bool = True,
        artifact_dir: str = "routing",
    ) -> None:
        self.network = network
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.modality_names = None if modality_names is None else [str(m) for m in modality_names]
        self.output_transform = output_transform
        self.write_files = write_files
        self.artifact_dir = artifact_dir
        self.counts: dict[str, np.ndarray] = {}
        self.last_usage: dict[str, np.ndarray] = {}
        self.logger = logging.getLogger(self.__class__.__name__)

    # -- network facts ---------------------------------------------------------------------------
    def num_experts(self) -> list[int]:
        """Experts per DEX layer (from the encoder's DEX layers, else from the length of each expert-load vector)."""
        net = unwrap_network(self.network)
        encoder = getattr(net, "encoder", net)
        if hasattr(encoder, "dex_layers"):
            return [int(layer.num_experts) for layer in encoder.dex_layers()]
        return [int(load.shape[0]) for load in self.expert_load()]

    def expert_load(self) -> list[np.ndarray]:
        net = unwrap_network(self.network)
        if not hasattr(net, "expert_load"):
            return []
        return [np.asarray(load.detach().float().cpu()) for load in net.expert_load()]

    # -- ignite ----------------------------------------------------------------------------------
    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self.iteration_completed, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        if not engine.has_event_handler(self.epoch_completed, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def _records(self, output: Any) -> tuple[list[str], list[torch.Tensor]]:
        """Modality name per image and, per layer, the chosen expert ids ``[B, choices]``."""
        if isinstance(output, Mapping):
            routing = output.get("routing") or []
            layers = [torch.as_tensor(r["indices"]) for r in routing]
            batch = layers[0].shape[0] if layers else 0
            names = _as_names(output.get("modality"), batch, self.modality_names)
        elif isinstance(output, (list, tuple)) and output and isinstance(output[0], Mapping):
            per_item = [item.get("routing") or [] for item in output]
            n_layers = len(per_item[0])
            layers = [torch.stack([torch.as_tensor(r[layer]["indices"]) for r in per_item]) for layer in range(n_layers)]
            names = [_as_names(item.get("modality"), 1, self.modality_names)[0] for item in output]
        else:
            return [], []
        layers = [idx.detach().reshape(idx.shape[0], -1).to(device="cpu", dtype=torch.long) for idx in layers]
        return names, layers

    def _count(self, names: list[str], layers: list[torch.Tensor]) -> dict[str, np.ndarray]:
        """``{modality: [L, E_max]}`` choice counts, from :func:`dex_monai.analysis.modality_expert_counts`."""
        from dex_monai.analysis.modularity import modality_expert_counts

        if not layers:
            return {}
        labels, experts, tables = modality_expert_counts([idx.numpy() for idx in layers], names,
                                                         self.num_experts() or None)
        width = max(experts)
        local: dict[str, np.ndarray] = {}
        for m, name in enumerate(labels):
            table = np.zeros((len(layers), width), dtype=np.int64)
            for layer, counts in enumerate(tables):
                table[layer, : counts.shape[1]] = counts[m]
            local[str(name)] = table
        return local

    def _merge(self, tables: Mapping[str, np.ndarray]) -> None:
        for name, table in tables.items():
            current = self.counts.get(name)
            if current is None:
                self.counts[name] = np.array(table, dtype=np.int64)
                continue
            shape = tuple(max(a, b) for a, b in zip(current.shape, table.shape))
            merged = np.zeros(shape, dtype=np.int64)
            merged[: current.shape[0], : current.shape[1]] += current
            merged[: table.shape[0], : table.shape[1]] += table
            self.counts[name] = merged

    def iteration_completed(self, engine: Engine) -> None:
        record = getattr(engine.state, "routing", None)
        if record is None:
            record = engine.state.output
        names, layers = self._records(self.output_transform(record))
        local = self._count(names, layers)
        if is_dist():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)
            for tables in gathered:
                self._merge(tables or {})
        else:
            self._merge(local)

    def usage(self) -> dict[str, np.ndarray]:
        """Share of each expert in each modality's choices, ``{modality: [L, E_max]}`` (NaN beyond ``E_l``)."""
        experts = self.num_experts()
        result = {}
        for name in sorted(self.counts):
            table = self.counts[name].astype(np.float64)
            totals = table.sum(axis=1, keepdims=True)
            share = np.divide(table, totals, out=np.zeros_like(table), where=totals > 0)
            for layer, count in enumerate(experts[: share.shape[0]]):
                share[layer, count:] = np.nan
            result[name] = share
        return result

    def epoch_completed(self, engine: Engine) -> None:
        epoch = int(engine.state.epoch)
        usage = self.usage()
        experts = self.num_experts()
        load = self.expert_load()
        metrics = routing_summary(load, self.counts)
        add_tracking_metrics(engine, metrics)
        if usage and is_rank0():
            summary = ", ".join(
                f"{name}: " + "/".join(str(int(np.nanargmax(share[layer]))) for layer in range(share.shape[0]))
                for name, share in usage.items()
            )
            self.logger.info(f"epoch {epoch} most chosen expert per layer by modality - {summary}")
        if usage and self.write_files and self.output_dir is not None and is_rank0():
            for path in self.save(usage, epoch, experts, load, metrics):
                add_tracking_artifact(engine, path, self.artifact_dir)
        self.last_usage = usage
        self.counts = {}

    def save(self, usage: Mapping[str, np.ndarray], epoch: int, num_experts: Sequence[int],
             expert_load: Sequence[np.ndarray] = (), summary: Mapping[str, float] | None = None) -> list[Path]:
        """Write ``expert_usage_epoch_<epoch>.json`` and ``.png`` into ``<output_dir>/routing``."""
        folder = self.output_dir / "routing"  # type: ignore[operator]
        folder.mkdir(parents=True, exist_ok=True)
        json_path = folder / f"expert_usage_epoch_{epoch}.json"
        png_path = folder / f"expert_usage_epoch_{epoch}.png"
        record = usage_to_json(usage, num_experts)
        record["expert_load"] = [[float(v) for v in np.asarray(layer).reshape(-1)] for layer in expert_load]
        record["summary"] = {k: (float(v) if np.isfinite(v) else None) for k, v in (summary or {}).items()}
        record["epoch"] = epoch
        _atomic_write_text(json_path, json.dumps(record, indent=2))
        try:
            plot_usage(usage, png_path, title=f"expert usage, epoch {epoch}")
        except Exception as e:  # a plotting problem must never stop training
            self.logger.warning(f"could not draw the expert usage heatmap: {e}")
            return [json_path]
        return [json_path, png_path]

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"counts": {name: torch.from_numpy(table.copy()) for name, table in self.counts.items()}}

    def load_state_dict(self, state_dict: Mapping) -> None:
        self.counts = {str(k): np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v, dtype=np.int64)
                       for k, v in state_dict.get("counts", {}).items()}


def routing_summary(expert_load: Sequence[np.ndarray], counts: Mapping[str, np.ndarray]) -> dict[str, float]:
    """
    The routing metrics of one epoch, ``2 L + 2`` keys for ``L`` layers whatever the number of experts and
    modalities: ``routing/load_entropy/layer_<l>`` (:func:`dex_monai.analysis.normalized_entropy` of the layer's
    expert load ``[E]``), ``routing/nmi/layer_<l>`` (:func:`dex_monai.analysis.count_table_nmi` of the layer's
    modality x expert choice counts; ``counts`` is ``{modality: [L, E]}``), and the mean of each over the layers
    (NaN layers left out). Keys of a kind with no data (no load, no counts) are absent.
    """
    from dex_monai.analysis.modularity import count_table_nmi, normalized_entropy

    metrics: dict[str, float] = {}
    entropies = [normalized_entropy(load) for load in expert_load]
    names = sorted(counts)
    n_layers = min((counts[m].shape[0] for m in names), default=0)
    width = max((counts[m].shape[1] for m in names), default=0)  # tables grow with the experts a modality reached
    tables = {m: np.pad(counts[m][:n_layers], ((0, 0), (0, width - counts[m].shape[1]))) for m in names}
    nmis = [count_table_nmi(np.stack([tables[m][layer] for m in names])) for layer in range(n_layers)]
    for kind, values in (("load_entropy", entropies), ("nmi", nmis)):
        for layer, value in enumerate(values):
            metrics[f"routing/{kind}/layer_{layer}"] = float(value)
        finite = [v for v in values if np.isfinite(v)]
        if finite:
            metrics[f"routing/{kind}_mean"] = float(np.mean(finite))
    return metrics


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def usage_to_json(usage: Mapping[str, np.ndarray], num_experts: Sequence[int]) -> dict:
    """The ``expert_usage_epoch_<N>.json`` record (:func:`dex_monai.analysis.modularity.expert_usage_to_json`)."""
    from dex_monai.analysis.modularity import expert_usage_to_json

    return dict(expert_usage_to_json(usage, list(num_experts) or None))


def plot_usage(usage: Mapping[str, np.ndarray], path: str | os.PathLike, title: str | None = None) -> Path:
    """Heatmap PNG, layers x experts, one panel per modality
    (:func:`dex_monai.analysis.modularity.plot_modality_expert_heatmaps`)."""
    from dex_monai.analysis.plots import plot_modality_expert_heatmaps

    plot_modality_expert_heatmaps(dict(usage), path, title=title)
    return Path(path)
