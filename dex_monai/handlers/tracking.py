# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Experiment tracking of the DEX engines: MLflow through MONAI's ``MLFlowHandler``, and the queue other handlers
fill with epoch-level values and files for it.

- ``engine.state.tracking_metrics``: ``{name: float}`` epoch-level values meant for experiment trackers only
  (too many to print), logged and cleared by :class:`DEXMLFlowHandler` at the end of each epoch;
- ``engine.state.tracking_artifacts``: ``[(local_path, artifact_dir)]`` files to upload, same life cycle."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from monai.handlers import MLFlowHandler
from monai.utils import IgniteInfo, min_version, optional_import

from dex_monai.data.failures import failed_paths
from dex_monai.engines.pretrain import output_scalars
from dex_monai.engines.utils import (
    bundle_config_snapshot,
    find_bundle_parser,
    flatten_params,
    is_dist,
)
from dex_monai.tracking.models import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND

__all__ = ["TRACKING_METRICS", "TRACKING_ARTIFACTS", "add_tracking_metrics", "add_tracking_artifact", "DEXMLFlowHandler"]

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")


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
    - at start, the datasets of ``dataset_dict`` (``{context: MONAI dataset or datalist}``) as run inputs with
      their source, digest and items per modality (:func:`dex_monai.tracking.inputs.log_datalist_inputs`), and
      the experiment tag ``mlflow.experimentKind`` (``experiment_kind``; MLflow 3 otherwise may open the
      experiment on its GenAI pages);
    - when training completes, ``model`` as an MLflow model with signature and input example of shape
      ``model_input_shape``, registered as ``registered_model_name`` where the store has a registry
      (:func:`dex_monai.tracking.models.log_network`);
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
        dataset_dict: ``{"training": dataset, "validation": dataset}`` (MONAI datasets or datalists) to log as
            run inputs; None logs none.
        dataset_name: MLflow name prefix of the datasets (``<dataset_name>_<context>``).
        dataset_source: where the data is (folder, datalist file or URI).
        default_modality: modality of datalist items without a ``"modality"`` entry.
        model: the network to log as an MLflow model when training completes; None logs none.
        model_input_shape: input example shape ``[B, C, *spatial]`` (needed with ``model``).
        registered_model_name: model registry name of ``model`` (None: not registered).
        experiment_kind: value of the experiment tag ``mlflow.experimentKind`` (None: left alone).
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
        dataset_dict: Mapping[str, Any] | None = None,
        dataset_name: str | None = None,
        dataset_source: str | os.PathLike | None = None,
        default_modality: str | None = None,
        model: torch.nn.Module | None = None,
        model_input_shape: Sequence[int] | None = None,
        registered_model_name: str | None = None,
        experiment_kind: str | None = MODEL_TRAINING_KIND,
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
            dataset_dict=dataset_dict,
            **kwargs,
        )
        if model is not None and model_input_shape is None:
            raise ValueError("model_input_shape is needed to log the model (its input example and signature).")
        self.dataset_name = dataset_name or experiment_name
        self.dataset_source = dataset_source
        self.default_modality = default_modality
        self.model = model
        self.model_input_shape = None if model_input_shape is None else [int(s) for s in model_input_shape]
        self.registered_model_name = registered_model_name
        self.experiment_kind = experiment_kind
        self.tags = dict(tags or {})
        self.continue_run = continue_run
        self.log_config = log_config
        self._config = config
        self._parser = find_bundle_parser() if (log_config and config is None) else None

    def attach(self, engine: Engine) -> None:
        # before MONAI's close at COMPLETED: a run with failed inputs ends FAILED; an exception ends it FAILED too
        engine.add_event_handler(Events.COMPLETED, self._set_finish_status)
        if self.model is not None:  # before the run is closed
            engine.add_event_handler(Events.COMPLETED, self.log_model)
        super().attach(engine)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)

    def _set_finish_status(self, engine: Engine) -> None:
        failed = failed_paths(getattr(engine.state, "failures", None) or [])
        self.run_finish_status = "FAILED" if failed else "FINISHED"
        if failed and self.cur_run is not None:
            self.client.set_tag(self.run_id, "failed_inputs", str(len(failed)))

    def log_model(self, engine: Engine | None = None) -> None:
        """Log (and register) ``self.model`` into the run; a failure is logged as a warning, never raised."""
        if self.cur_run is None or self.model is None:
            return
        from dex_monai.tracking.models import log_network

        try:
            info = log_network(self.model, self.run_id, self.client.tracking_uri, self.model_input_shape or [],
                               registered_model_name=self.registered_model_name)
            self.client.set_tag(self.run_id, "logged_model_uri", info.model_uri)
        except Exception as e:  # a tracking problem must not fail a finished training
            logging.getLogger(__name__).warning(f"could not log the model to MLflow: {type(e).__name__}: {e}")

    def _default_dataset_log(self, dataset_dict: Mapping[str, Any] | None) -> None:
        """Log the datasets as run inputs with source, digest and items per modality (see the class docstring)."""
        if not dataset_dict or self.cur_run is None:
            return
        from dex_monai.tracking.inputs import log_datalist_inputs

        source = self.dataset_source if self.dataset_source not in (None, "") else "unknown"
        log_datalist_inputs(self.client, self.run_id, dataset_dict, source, self.dataset_name,
                            default_modality=self.default_modality)

    def _tag_experiment_kind(self) -> None:
        if not self.experiment_kind or self.experiment is None:
            return
        tags = self.client.get_experiment(self.experiment.experiment_id).tags
        if EXPERIMENT_KIND_TAG not in tags:
            self.client.set_experiment_tag(self.experiment.experiment_id, EXPERIMENT_KIND_TAG, self.experiment_kind)

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
        self._tag_experiment_kind()
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
