# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Classification outputs: a per-class report (precision, recall, F1, AUC, confusion matrix) and a CSV of class
probabilities per image. MONAI's ``ClassificationSaver`` is not used for the CSV: it writes no header, no class names
and no predicted class."""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.utils import IgniteInfo, min_version, optional_import

from dex_monai.engines.batch import stack_pred_label
from dex_monai.handlers.tracking import add_tracking_artifact, add_tracking_metrics
from dex_monai.engines.utils import is_rank0
from dex_monai.handlers.utils import gather_objects, output_items

__all__ = ["ClassificationReportHandler", "ClassProbabilityWriter"]

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")


class ClassificationReportHandler:
    """
    Per-class report of a classification evaluator: precision, recall, F1, support, one-vs-rest AUC and the confusion
    matrix, written to ``<output_dir>/<prefix>_report_epoch_<N>.json`` (and ``.txt``), queued as MLflow artifacts and
    as epoch metrics ``<prefix>_f1/<class>``, ``<prefix>_auc/<class>`` etc. Predictions are gathered across ranks.

    Args:
        output_dir: folder of the reports.
        class_names: names of the classes, in index order.
        prefix: metric and file name prefix.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Sequence[str],
        prefix: str = "val",
        artifact_dir: str = "reports",
        pred_key: str = "pred",
        label_key: str = "label",
        epoch_fn: Any = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.class_names = [str(c) for c in class_names]
        self.prefix = prefix
        self.artifact_dir = artifact_dir
        self.pred_key, self.label_key = pred_key, label_key
        self.epoch_fn = epoch_fn
        self.probs: list[list[float]] = []
        self.labels: list[int] = []
        self.last_report: dict | None = None
        self.logger = logging.getLogger(self.__class__.__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_started(self, engine: Engine) -> None:
        self.probs, self.labels = [], []

    def iteration_completed(self, engine: Engine) -> None:
        pred, label = stack_pred_label(engine.state.output, None, self.pred_key, self.label_key)
        self.probs += pred.detach().cpu().tolist()
        self.labels += label.detach().cpu().tolist()

    def report(self, probs: np.ndarray, labels: np.ndarray) -> dict:
        from sklearn.metrics import (
            classification_report,
            confusion_matrix,
            roc_auc_score,
        )

        n = len(self.class_names)
        pred = probs.argmax(1)
        table = classification_report(
            labels, pred, labels=list(range(n)), target_names=self.class_names, output_dict=True, zero_division=0
        )
        text = classification_report(
            labels, pred, labels=list(range(n)), target_names=self.class_names, zero_division=0
        )
        auc = {}
        for c, name in enumerate(self.class_names):
            positives = labels == c
            auc[name] = float(roc_auc_score(positives, probs[:, c])) if 0 < positives.sum() < len(labels) else None
        return {
            "classes": self.class_names,
            "num_images": int(len(labels)),
            "accuracy": float((pred == labels).mean()) if len(labels) else None,
            "per_class": {name: table[name] for name in self.class_names},
            "macro_avg": table.get("macro avg"),
            "weighted_avg": table.get("weighted avg"),
            "auc": auc,
            "confusion_matrix": confusion_matrix(labels, pred, labels=list(range(n))).tolist(),
            "text": text,
        }

    def epoch_completed(self, engine: Engine) -> None:
        probs, labels = gather_objects(self.probs), gather_objects(self.labels)
        if not is_rank0() or not labels:
            return
        report = self.report(np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64))
        epoch = int(self.epoch_fn() if callable(self.epoch_fn) else engine.state.epoch)
        report["epoch"] = epoch
        self.last_report = report
        metrics = {}
        for name, row in report["per_class"].items():
            for what in ("precision", "recall", "f1-score"):
                metrics[f"{self.prefix}_{what.split('-')[0]}/{name}"] = float(row[what])
            if report["auc"][name] is not None:
                metrics[f"{self.prefix}_auc/{name}"] = report["auc"][name]
        add_tracking_metrics(engine, metrics)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        json_path = self.output_dir / f"{self.prefix}_report_epoch_{epoch}.json"
        text_path = self.output_dir / f"{self.prefix}_report_epoch_{epoch}.txt"
        json_path.write_text(json.dumps(report, indent=2))
        matrix = "\n".join(" ".join(f"{v:5d}" for v in row) for row in report["confusion_matrix"])
        text_path.write_text(f"{report['text']}\nconfusion matrix (rows: truth, columns: prediction)\n{matrix}\n")
        for path in (json_path, text_path):
            add_tracking_artifact(engine, path, self.artifact_dir)
        self.logger.info(f"{self.prefix} per-class report, epoch {epoch}:\n{report['text']}")


class ClassProbabilityWriter:
    """
    Write one CSV row per image: ``image, predicted_index, predicted_class, prob_<class>...``, to
    ``<output_dir>/<filename>`` when the run completes. The file is never one of the inputs.

    Args:
        output_dir: folder of the CSV file (created).
        class_names: class names in index order.
        filename: CSV file name.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Sequence[str],
        filename: str = "predictions.csv",
        image_key: str = "image",
        pred_key: str = "pred",
    ) -> None:
        self.path = Path(output_dir) / filename
        self.class_names = [str(c) for c in class_names]
        self.image_key, self.pred_key = image_key, pred_key
        self.rows: list[list[Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.completed)

    def started(self, engine: Engine) -> None:
        self.rows = []

    def iteration_completed(self, engine: Engine) -> None:
        for item in output_items(engine.state.output):
            image = item.get(self.image_key)
            name = image.meta.get("filename_or_obj", "") if isinstance(image, MetaTensor) else ""
            probs = torch.as_tensor(item[self.pred_key]).detach().float().cpu().reshape(-1).tolist()
            index = int(np.argmax(probs))
            label = self.class_names[index] if index < len(self.class_names) else str(index)
            self.rows.append([str(name), index, label, *[f"{p:.6f}" for p in probs]])

    def completed(self, engine: Engine) -> None:
        rows = gather_objects(self.rows)
        if not is_rank0():
            return
        inputs = {Path(r[0]).resolve() for r in rows if r[0]}
        if self.path.resolve() in inputs:
            raise ValueError(f"refusing to overwrite the input {self.path} with the predictions CSV.")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        width = max((len(r) - 3 for r in rows), default=len(self.class_names))
        names = [self.class_names[i] if i < len(self.class_names) else str(i) for i in range(width)]
        with open(self.path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "predicted_index", "predicted_class", *[f"prob_{n}" for n in names]])
            writer.writerows(rows)
        add_tracking_artifact(engine, self.path, "predictions")
        logging.getLogger(self.__class__.__name__).info(f"wrote {len(rows)} class probabilities to {self.path}.")
