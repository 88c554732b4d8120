# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""
Inference that survives bad inputs: every input is tried, each failure is named, the good ones are predicted.

- :class:`TolerantEvaluator`: MONAI ``SupervisedEvaluator`` that takes the failures set aside by
  :func:`dex_monai.data.failures.collate_skipping_failures` (inputs that could not be read or preprocessed), and
  records a batch whose inference or postprocessing (e.g. writing) raises as failed instead of stopping;
- :class:`FailureReportHandler`: logs each failure, writes ``failed.csv`` (path, stage, reason) into the output
  folder, queues the counts and the report for MLflow (:class:`~dex_monai.engines.DEXMLFlowHandler` then ends the run
  ``FAILED``);
- :class:`InferenceProgressHandler`: one line per batch with its inputs and time;
- :func:`exit_on_failures`: the last step of an inference config: a non-zero exit status when anything failed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator
from monai.utils import IgniteInfo, min_version, optional_import

from dex_monai.data.failures import (
    FAILED_CSV,
    FAILURE_KEY,
    describe_failure,
    failed_paths,
    write_failures,
)
from dex_monai.handlers.tracking import add_tracking_artifact, add_tracking_metrics

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["TolerantEvaluator", "FailureReportHandler", "InferenceProgressHandler", "exit_on_failures", "batch_inputs"]

logger = logging.getLogger(__name__)

#: engine state attribute holding the failure records of the run
FAILURES_STATE = "failures"


def batch_inputs(batch: Any, image_key: str = "image") -> list[str]:
    """The input file names of a collated batch (from the image's metadata, else the item field)."""
    if not isinstance(batch, Mapping):
        return []
    image = batch.get(image_key)
    if isinstance(image, MetaTensor):
        names = image.meta.get("filename_or_obj")
        if names is not None:
            return [str(n) for n in (names if isinstance(names, (list, tuple)) else [names])]
    if isinstance(image, (list, tuple)):
        return [str(v) for v in image]
    return [] if image is None else [str(image)]


class TolerantEvaluator(SupervisedEvaluator):
    """
    ``SupervisedEvaluator`` over a loader built with :class:`~dex_monai.data.failures.FailureTolerantDataset` and
    :func:`~dex_monai.data.failures.collate_skipping_failures`: failed inputs are recorded in
    ``engine.state.failures`` (dicts ``path, stage, reason``) and the run goes on. A batch whose network pass or
    postprocessing raises is recorded with stage ``inference`` (use batch size 1 so that only the culprit is lost).
    Iterations without a usable input return an empty output, which the DEX handlers skip.
    """

    def _register_failures(self, records: Sequence[Mapping[str, str]]) -> None:
        found = getattr(self.state, FAILURES_STATE, None)
        if found is None:
            found = []
            setattr(self.state, FAILURES_STATE, found)
        for record in records:
            found.append(dict(record))
            logger.error(f"input failed ({record['stage']}): {record['path']}: {record['reason']}")

    def _iteration(self, engine: Any, batchdata: dict) -> dict:
        if isinstance(batchdata, dict) and FAILURE_KEY in batchdata:
            batchdata = dict(batchdata)
            self._register_failures(batchdata.pop(FAILURE_KEY))
        if not batchdata:
            return {}
        try:
            return super()._iteration(engine, batchdata)
        except Exception as e:
            names = batch_inputs(batchdata) or ["<batch>"]
            self._register_failures([describe_failure(e, name, stage="inference") for name in names])
            return {}


class FailureReportHandler:
    """
    At the end of the run, report the inputs that failed (``engine.state.failures``): one log line each, the file
    ``<output_dir>/failed.csv`` (path, stage, reason; written only when something failed, and an older report from a
    previous run in the same folder is replaced), and the metrics ``failed_inputs`` / ``predicted_inputs`` plus the
    report as an MLflow artifact. Attach it before :class:`~dex_monai.engines.DEXMLFlowHandler`.

    Args:
        output_dir: the run's output folder.
        filename: report file name.
    """

    def __init__(self, output_dir: str | os.PathLike, filename: str = FAILED_CSV) -> None:
        self.path = Path(output_dir) / filename
        self.logger = logging.getLogger(self.__class__.__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def started(self, engine: Engine) -> None:
        setattr(engine.state, FAILURES_STATE, [])

    def epoch_completed(self, engine: Engine) -> None:
        failures = list(getattr(engine.state, FAILURES_STATE, None) or [])
        total = len(engine.state.dataloader.dataset) if hasattr(engine.state.dataloader, "dataset") else None
        failed = failed_paths(failures)
        predicted = None if total is None else total - len(failed)
        metrics = {"failed_inputs": float(len(failed))}
        if predicted is not None:
            metrics["predicted_inputs"] = float(predicted)
        add_tracking_metrics(engine, metrics)
        if not failures:
            if self.path.is_file():
                self.path.unlink()  # our own report of an earlier run in this output folder, now out of date
            self.logger.info(f"all {total if total is not None else ''} inputs processed; no failures.")
            return
        write_failures(failures, self.path)
        add_tracking_artifact(engine, self.path, "failures")
        of_total = f" of {total}" if total is not None else ""
        self.logger.error(f"{len(failed)}{of_total} inputs failed; see {self.path}:")
        for record in failures:
            self.logger.error(f"  {record['path']}  [{record['stage']}] {record['reason']}")


class InferenceProgressHandler:
    """One log line per iteration: ``[i/N] <input names> (<seconds> s, <elapsed> s in all)``."""

    def __init__(self, image_key: str = "image") -> None:
        self.image_key = image_key
        self.logger = logging.getLogger(self.__class__.__name__)
        self._start = self._iter_start = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_STARTED, self.iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)

    def started(self, engine: Engine) -> None:
        self._start = time.perf_counter()

    def iteration_started(self, engine: Engine) -> None:
        self._iter_start = time.perf_counter()

    def iteration_completed(self, engine: Engine) -> None:
        now = time.perf_counter()
        batch = engine.state.batch
        names = [os.path.basename(n.rstrip("/")) for n in batch_inputs(batch, self.image_key)]
        if not names and isinstance(batch, list):  # decollated
            names = [os.path.basename(n.rstrip("/")) for b in batch for n in batch_inputs(b, self.image_key)]
        failed = batch.get(FAILURE_KEY, []) if isinstance(batch, Mapping) else []
        names += [f"{os.path.basename(f['path'].rstrip('/'))} FAILED ({f['stage']})" for f in failed]
        what = ", ".join(names) if names else "(nothing)"
        total = engine.state.epoch_length
        self.logger.info(
            f"[{engine.state.iteration}/{total}] {what} ({now - self._iter_start:.1f} s, {now - self._start:.1f} s in all)"
        )


def exit_on_failures(engine: Any) -> None:
    """Exit with status 1 and a one-line message when the run recorded failed inputs (the last step of an
    inference config; the predictions of the good inputs are written by then)."""
    failures = getattr(engine.state, FAILURES_STATE, None) or []
    if failures:
        raise SystemExit(f"{len(failed_paths(failures))} inputs failed; see the log and {FAILED_CSV} in the output folder.")
