# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""
Ignite handlers of DEX training: per-iteration schedules, a progress bar, routing statistics and MLflow tracking.

Conventions shared by these handlers (and reusable by other DEX bundles):

- ``engine.state.schedule``: ``{name: value}`` of the scheduled quantities of the current iteration; the
  pre-training engine copies them into its output, so StatsHandler / MLflow log them with the losses.
- ``engine.state.tracking_metrics``: ``{name: float}`` epoch-level values meant for experiment trackers only
  (too many to print), logged and cleared by :class:`DEXMLFlowHandler` at the end of each epoch.
- ``engine.state.tracking_artifacts``: ``[(local_path, artifact_dir)]`` files to upload, same life cycle.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from monai.handlers import MLFlowHandler
from monai.utils import IgniteInfo, min_version, optional_import

from dex_monai.engines.pretrain import output_scalars
from dex_monai.engines.schedules import cosine_schedule
from dex_monai.engines.utils import (
    bundle_config_snapshot,
    find_bundle_parser,
    flatten_params,
    is_dist,
    is_rank0,
    unwrap_network,
)

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = [
    "CosineScheduleHandler",
    "default_run_name",
    "plot_usage",
    "usage_to_json",
    "DEXMLFlowHandler",
    "GEMAMomentumScheduleHandler",
    "LossWeightScheduleHandler",
    "ProgressBarHandler",
    "RouterNoiseScheduleHandler",
    "RoutingStatsHandler",
    "SamplerEpochHandler",
    "TRACKING_ARTIFACTS",
    "TRACKING_METRICS",
    "add_tracking_artifact",
    "add_tracking_metrics",
]

TRACKING_METRICS = "tracking_metrics"
TRACKING_ARTIFACTS = "tracking_artifacts"


def add_tracking_metrics(engine: Engine, metrics: Mapping[str, float]) -> None:
    """Queue epoch-level values for the experiment tracker (see the module docstring)."""
    queued = getattr(engine.state, TRACKING_METRICS, None) or {}
    queued.update({str(k): float(v) for k, v in metrics.items()})
    setattr(engine.state, TRACKING_METRICS, queued)


def add_tracking_artifact(engine: Engine, path: str | os.PathLike, artifact_dir: str | None = None) -> None:
    """Queue a file for upload by the experiment tracker under ``artifact_dir``."""
    queued = getattr(engine.state, TRACKING_ARTIFACTS, None) or []
    queued.append((os.fspath(path), artifact_dir))
    setattr(engine.state, TRACKING_ARTIFACTS, queued)


# ----------------------------------------------------------------------------------------------
# schedules
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# console
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# routing statistics
# ----------------------------------------------------------------------------------------------
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


def _metric_name(text: str) -> str:
    """MLflow-safe metric path component."""
    return re.sub(r"[^0-9A-Za-z_\-. /]", "_", text).strip() or "_"


class RoutingStatsHandler:
    """
    Counts, over each epoch, which experts every modality chose in every DEX layer, from the batch routing
    record ``engine.state.routing`` of :class:`~dex_monai.engines.DEXPretrainTrainer` (``{"modality": [B],
    "routing": [per layer {"indices": [B, K], ...}]}``), or, when an engine has no such record, from
    ``routing`` / ``modality`` entries of its output (a batch dict or a decollated list).

    At the end of each epoch it

    - queues tracker metrics ``expert_load/layer_<l>/expert_<e>`` (the network's EMA expert load) and
      ``expert_usage/<modality>/layer_<l>/expert_<e>`` (share of the modality's choices in that layer);
    - on rank 0 writes ``<output_dir>/routing/expert_usage_epoch_<N>.json`` (``{"modalities", "layers",
      "num_experts", "usage": {modality: [[share per expert] per layer]}}``) and the heatmap
      ``expert_usage_epoch_<N>.png`` (layers x experts, one panel per modality), queued as tracker artifacts
      under ``routing/``;
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
        experts = self.num_experts() or [int(idx.max()) + 1 for idx in layers]
        width = max(experts) if experts else 0
        local: dict[str, np.ndarray] = {}
        if not layers:
            return local
        labels = np.asarray(names)
        for name in sorted(set(names)):
            rows = torch.from_numpy(np.nonzero(labels == name)[0])
            table = np.zeros((len(layers), width), dtype=np.int64)
            for layer, idx in enumerate(layers):
                chosen = idx.index_select(0, rows).reshape(-1)
                table[layer] = torch.bincount(chosen, minlength=width)[:width].numpy()
            local[name] = table
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
        metrics: dict[str, float] = {}
        for layer, load in enumerate(self.expert_load()):
            for e, value in enumerate(load.tolist()):
                metrics[f"expert_load/layer_{layer}/expert_{e}"] = float(value)
        for name, share in usage.items():
            for layer in range(share.shape[0]):
                for e in range(experts[layer] if layer < len(experts) else share.shape[1]):
                    metrics[f"expert_usage/{_metric_name(name)}/layer_{layer}/expert_{e}"] = float(share[layer, e])
        add_tracking_metrics(engine, metrics)
        if usage and is_rank0():
            summary = ", ".join(
                f"{name}: " + "/".join(str(int(np.nanargmax(share[layer]))) for layer in range(share.shape[0]))
                for name, share in usage.items()
            )
            self.logger.info(f"epoch {epoch} most chosen expert per layer by modality - {summary}")
        if usage and self.write_files and self.output_dir is not None and is_rank0():
            for path in self.save(usage, epoch, experts):
                add_tracking_artifact(engine, path, self.artifact_dir)
        self.last_usage = usage
        self.counts = {}

    def save(self, usage: Mapping[str, np.ndarray], epoch: int, num_experts: Sequence[int]) -> list[Path]:
        """Write ``expert_usage_epoch_<epoch>.json`` and ``.png`` into ``<output_dir>/routing``."""
        folder = self.output_dir / "routing"  # type: ignore[operator]
        folder.mkdir(parents=True, exist_ok=True)
        json_path = folder / f"expert_usage_epoch_{epoch}.json"
        png_path = folder / f"expert_usage_epoch_{epoch}.png"
        record = usage_to_json(usage, num_experts)
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


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def usage_to_json(usage: Mapping[str, np.ndarray], num_experts: Sequence[int]) -> dict:
    """The ``expert_usage_epoch_<N>.json`` record (same format as :mod:`dex_monai.analysis.modularity`)."""
    try:
        from dex_monai.analysis.modularity import expert_usage_to_json

        return dict(expert_usage_to_json(usage, list(num_experts) or None))
    except ImportError:
        pass
    names = [str(m) for m in usage]
    layers = next(iter(usage.values())).shape[0] if usage else 0
    counts = list(num_experts) or [next(iter(usage.values())).shape[1]] * layers
    return {
        "modalities": names,
        "layers": layers,
        "num_experts": [int(c) for c in counts],
        "usage": {
            str(m): [[float(v) if np.isfinite(v) else 0.0 for v in share[l, : counts[l]]] for l in range(layers)]
            for m, share in usage.items()
        },
    }


def plot_usage(usage: Mapping[str, np.ndarray], path: str | os.PathLike, title: str | None = None) -> Path:
    """Heatmap PNG, layers x experts, one panel per modality (uses :mod:`dex_monai.analysis` when present)."""
    try:
        from dex_monai.analysis.modularity import plot_modality_expert_heatmaps
    except ImportError:
        plot_modality_expert_heatmaps = None
    if plot_modality_expert_heatmaps is not None:
        plot_modality_expert_heatmaps(dict(usage), path, title=title)
        return Path(path)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(usage)
    fig = Figure(figsize=(3.0 * max(1, len(names)), 3.0))
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, max(1, len(names)), i + 1)
        image = ax.imshow(np.ma.masked_invalid(usage[name]), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(str(name))
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
    fig.colorbar(image, ax=fig.axes, shrink=0.8)
    if title:
        fig.suptitle(title)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=100)
    return Path(path)


# ----------------------------------------------------------------------------------------------
# MLflow
# ----------------------------------------------------------------------------------------------
class DEXMLFlowHandler(MLFlowHandler):
    """
    MONAI's ``MLFlowHandler`` with the DEX logging conventions:

    - every iteration, the scalars of the engine output (losses, learning rate, schedules, skipped steps), by
      default through :func:`~dex_monai.engines.output_scalars`;
    - every epoch, ``engine.state.metrics`` plus the queued ``engine.state.tracking_metrics`` and
      ``engine.state.tracking_artifacts`` (e.g. the routing heatmaps of :class:`RoutingStatsHandler`);
    - at start, the bundle config: ``config/config.json`` (merged config with command-line overrides),
      ``config/resolved_config.json`` (top-level values as resolved), the resolved scalars as run parameters,
      and tags ``start_iteration`` / ``world_size``;
    - on a resumed training (``engine.state.tracking_run_id`` restored from the checkpoint, see
      :class:`~dex_monai.engines.DEXPretrainTrainer`), the interrupted MLflow run is continued rather than a new
      one started (tags ``resumed_at_iteration_<i>``; the config is logged again as ``config_resumed_at_<i>.json``).

    Args:
        tracking_uri: MLflow tracking URI (a SQLite URI for local tracking: MLflow no longer has a file store).
        experiment_name: MLflow experiment.
        run_name: MLflow run name (None: ``run_<timestamp>``).
        output_transform: maps the engine output to ``{name: scalar}``.
        iteration_log, epoch_log: as in ``MLFlowHandler`` (bool or event filter).
        config: the config to record (a dict, or ``(raw, resolved)``); None finds the running bundle config.
        log_config: record the config at start.
        tags: extra run tags.
        continue_run: continue the MLflow run recorded in ``engine.state.tracking_run_id`` when resuming.
        close_on_complete: end the run when training completes.
        kwargs: other ``MLFlowHandler`` arguments.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str = "dex_pretrain",
        run_name: str | None = None,
        output_transform: Callable = output_scalars,
        iteration_log: bool | Callable[[Engine, int], bool] = True,
        epoch_log: bool | Callable[[Engine, int], bool] = True,
        config: Mapping | tuple | None = None,
        log_config: bool = True,
        tags: Mapping[str, Any] | None = None,
        continue_run: bool = True,
        close_on_complete: bool = True,
        optimizer_param_names: str | Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(
            tracking_uri=tracking_uri,
            experiment_name=experiment_name,
            run_name=run_name,
            output_transform=output_transform,
            iteration_log=iteration_log,
            epoch_log=epoch_log,
            close_on_complete=close_on_complete,
            optimizer_param_names=optimizer_param_names,
            **kwargs,
        )
        self.tags = dict(tags or {})
        self.continue_run = continue_run
        self.log_config = log_config
        self._config = config
        self._parser = find_bundle_parser() if (log_config and config is None) else None

    def attach(self, engine: Engine) -> None:
        # before MONAI's close at COMPLETED: a run with failed inputs ends FAILED; an exception ends it FAILED too
        engine.add_event_handler(Events.COMPLETED, self._set_finish_status)
        super().attach(engine)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)

    def _set_finish_status(self, engine: Engine) -> None:
        failed = bool(getattr(engine.state, "failures", None))
        self.run_finish_status = "FAILED" if failed else "FINISHED"
        if failed and self.cur_run is not None:
            self.client.set_tag(self.run_id, "failed_inputs", str(len(engine.state.failures)))

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        """End the MLflow run as FAILED (it would stay RUNNING), then let the exception go on."""
        if self.cur_run is not None:
            self.run_finish_status = "FAILED"
            self.client.set_tag(self.run_id, "error", f"{type(e).__name__}: {e}"[:4000])
            self.close()
        raise e

    # run id of the active run, for other components that want to log into it
    @property
    def run_id(self) -> str | None:
        return None if self.cur_run is None else self.cur_run.info.run_id

    def start(self, engine: Engine) -> None:
        previous = getattr(engine.state, "tracking_run_id", None) if self.continue_run else None
        if previous and self.cur_run is None:
            self._reopen_run(str(previous))
        super().start(engine)
        iteration = int(engine.state.iteration)
        tags = {"world_size": dist.get_world_size() if is_dist() else 1}
        if iteration == 0:
            tags["start_iteration"] = 0
        else:
            tags[f"resumed_at_iteration_{iteration}"] = getattr(engine.state, "resumed_from", "")
            tags["last_resumed_at_iteration"] = iteration
        tags.update(self.tags)
        for key, value in tags.items():
            self.client.set_tag(self.run_id, str(key), str(value))
        if hasattr(engine.state, "tracking_run_id") or self.continue_run:
            engine.state.tracking_run_id = self.run_id
        if self.log_config:
            self._log_config(suffix="" if iteration == 0 else f"_resumed_at_{iteration}")

    def _reopen_run(self, run_id: str) -> None:
        """Continue the MLflow run of the interrupted training (same experiment), marking it running again."""
        try:
            self._set_experiment()
            run = self.client.get_run(run_id)
        except Exception:  # the run is gone or the store changed: start a new one
            return
        if run.info.experiment_id != self.experiment.experiment_id or run.info.lifecycle_stage != "active":
            return
        self.client.update_run(run_id, status="RUNNING")
        self.cur_run = self.client.get_run(run_id)

    def _log_config(self, suffix: str = "") -> None:
        if isinstance(self._config, tuple):
            raw, resolved = self._config
        elif isinstance(self._config, Mapping):
            raw, resolved = dict(self._config), {}
        else:
            snapshot = bundle_config_snapshot(self._parser)
            if snapshot is None:
                return
            raw, resolved = snapshot
        params = flatten_params({k.replace("#", "."): v for k, v in resolved.items() if not k.startswith("_")})
        self._delete_exist_param_in_dict(params)
        if params:
            self._log_params(params)
        with tempfile.TemporaryDirectory() as tmp:
            for name, content in ((f"config{suffix}.json", raw), (f"resolved_config{suffix}.json", resolved)):
                path = Path(tmp, name)
                path.write_text(json.dumps(content, indent=2, default=str))
                self.client.log_artifact(self.run_id, str(path), artifact_path="config")

    def epoch_completed(self, engine: Engine) -> None:
        super().epoch_completed(engine)
        if self.cur_run is None:
            return
        step = self.global_epoch_transform(engine.state.epoch)
        metrics = getattr(engine.state, TRACKING_METRICS, None) or {}
        if metrics:
            self._log_metrics(dict(metrics), step=step)
        setattr(engine.state, TRACKING_METRICS, {})
        for path, artifact_dir in getattr(engine.state, TRACKING_ARTIFACTS, None) or []:
            if os.path.isfile(path):
                self.client.log_artifact(self.run_id, path, artifact_path=artifact_dir)
        setattr(engine.state, TRACKING_ARTIFACTS, [])


def default_run_name(prefix: str = "pretrain") -> str:
    """``<prefix>_<YYYYmmdd_HHMMSS>``."""
    return f"{prefix}_{time.strftime('%Y%m%d_%H%M%S')}"
