# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Name the per-class columns of MONAI ``MetricsSaver`` reports by label instead of ``class0, class1...``.

MONAI's ``MetricsSaver`` has no way to pass class names to ``write_metrics_reports``, and with
``include_background=False`` its ``class0`` is label 1, which misleads readers of ``val_mean_dice_raw.csv``; this
handler rewrites the names in the reports it wrote, after it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from monai.utils import IgniteInfo, min_version, optional_import

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["label_metric_columns", "MetricsReportLabelHandler"]

_CLASS = re.compile(r"(?<![A-Za-z0-9_])class(\d+)(?![A-Za-z0-9_])")


def label_metric_columns(path: str | os.PathLike, names: Sequence[str]) -> bool:
    """Replace ``class<i>`` in a metrics report by ``names[i]``; returns whether the file was changed."""
    path = Path(path)
    if not path.is_file():
        return False
    text = path.read_text(encoding="utf-8")

    def name(match: re.Match) -> str:
        i = int(match.group(1))
        return names[i] if i < len(names) else match.group(0)

    new = _CLASS.sub(name, text)
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


class MetricsReportLabelHandler:
    """
    After MONAI ``MetricsSaver`` (attach it after that one), rename the class columns of its reports
    ``<save_dir>/<metric>_raw.csv`` and ``<metric>_summary.csv`` to ``<name> (<label>)``.

    Args:
        save_dir: the ``MetricsSaver`` folder.
        metrics: the metric names whose reports to rename (``metric_details`` of the saver).
        label_names: ``{label value: name}`` (e.g. the bundle metadata's ``channel_def``).
        include_background: the metric's setting: without background, ``class0`` is label 1.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        metrics: Sequence[str],
        label_names: Mapping[str | int, str],
        include_background: bool = False,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.metrics = list(metrics)
        labels = sorted((int(k), str(v)) for k, v in label_names.items())
        first = 0 if include_background else 1
        self.names = [f"{name} ({value})" for value, name in labels if value >= first]

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        for metric in self.metrics:
            for kind in ("raw", "summary"):
                label_metric_columns(self.save_dir / f"{metric}_{kind}.csv", self.names)
