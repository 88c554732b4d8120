# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""What a comparison says about its runs: summaries (parameters, final and minimum metrics, routing artifacts), the
tables (markdown, CSV, console) and the markdown report."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dex_monai.tracking.store import (
    _CELL_CHARS,
    _MISSING,
    _ROUTING_RE,
    ROUTING_ARTIFACT_DIR,
)


@dataclass
class RunSummary:
    """What the comparison uses of one MLflow run."""

    run_id: str
    run_name: str
    experiment: str
    status: str
    start_time: str
    params: dict[str, str]
    metrics: dict[str, float]
    """Final value of every metric (MLflow's latest: largest step, then latest timestamp)."""
    metric_min: dict[str, float] = field(default_factory=dict)
    """Minimum over the history, for loss metrics."""
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """``(step, value)`` history of every loss metric, in step order."""
    routing: dict[str, np.ndarray] | None = None
    """Latest expert usage ``{modality: [L, E]}`` from the routing JSON artifact, if any."""
    routing_epoch: int | None = None
    routing_png: Path | None = None
    """Local copy of the latest routing PNG artifact, if any."""
    routing_png_epoch: int | None = None
    label: str = ""
    """Short unique name used in tables and legends."""


def _is_loss(name: str) -> bool:
    return "loss" in name.lower()


#: Loss terms the pre-training engine logs under their own names (``dex_monai.engines.PretrainKeys``; kept here as
#: text so that the command line does not import PyTorch).
LOSS_TERMS = ("loss", "mae", "alignment", "balance", "feature")

#: Prefixes of task metrics (MONAI's bundle names: ``val_mean_dice``, ``val_accuracy``, ``test_auc``...).
TASK_PREFIXES = ("val_", "test_", "train_")

#: Task metrics logged without a prefix (the transfer benchmark's runs: ``score``, ``dice``, ``auc``...).
TASK_METRICS = ("score", "dice", "auc", "accuracy", "f1", "hd95")

#: The routing summaries of :class:`~dex_monai.handlers.RoutingStatsHandler` a comparison shows (means over layers;
#: the per-layer values and the per-expert detail stay in the run and its heatmaps).
ROUTING_SUMMARIES = ("routing/load_entropy_mean", "routing/nmi_mean")


def metric_groups(names: Sequence[str]) -> dict[str, list[str]]:
    """
    The metrics a person compares, by kind: ``{"losses": [...], "task metrics": [...], "routing": [...]}`` (sorted;
    empty groups kept). Losses are names containing "loss" and the pre-training terms :data:`LOSS_TERMS`; task
    metrics start with :data:`TASK_PREFIXES` or are :data:`TASK_METRICS`; routing are :data:`ROUTING_SUMMARIES`. Everything else (learning rate
    and other schedules, gradient norms, per-layer and per-expert routing values) is left to the CSV: the groups
    never grow with the number of experts.
    """
    groups: dict[str, list[str]] = {"losses": [], "task metrics": [], "routing": []}
    for name in sorted(set(names)):
        if _is_loss(name) or name in LOSS_TERMS:
            groups["losses"].append(name)
        elif name.startswith(TASK_PREFIXES) or name in TASK_METRICS:
            groups["task metrics"].append(name)
        elif name in ROUTING_SUMMARIES:
            groups["routing"].append(name)
    return groups


def compared_metrics(names: Sequence[str]) -> list[str]:
    """The names of :func:`metric_groups`, losses first."""
    return [name for group in metric_groups(names).values() for name in group]


def _latest_routing_artifacts(client: Any, run_id: str, routing_dir: str) -> dict[str, tuple[int, str]]:
    """``{"json": (epoch, path), "png": (epoch, path)}`` of the latest routing artifacts of a run."""
    latest: dict[str, tuple[int, str]] = {}
    try:
        infos = client.list_artifacts(run_id, routing_dir)
    except Exception as e:  # artifact store unreachable: keep going without routing statistics
        print(f"warning: cannot list the artifacts of run {run_id}: {e}", file=sys.stderr)
        return latest
    for info in infos:
        if info.is_dir:
            continue
        match = _ROUTING_RE.search(info.path)
        if match is None:
            continue
        epoch, kind = int(match.group(1)), match.group(2)
        if kind not in latest or epoch > latest[kind][0]:
            latest[kind] = (epoch, info.path)
    return latest


def collect_runs(
    client: Any, runs: Sequence[Any], download_dir: str | os.PathLike, routing_dir: str = ROUTING_ARTIFACT_DIR
) -> list[RunSummary]:
    """
    Reads params, final metrics, loss histories and the latest routing artifacts of every run.

    Args:
        client: an ``mlflow.MlflowClient``.
        runs: ``mlflow.entities.Run`` objects, e.g. from :func:`select_runs`.
        download_dir: folder for downloaded artifacts.
        routing_dir: artifact folder holding ``expert_usage_epoch_<N>.json/.png``.
    """
    # no progress bars on the console for the small routing artifacts
    previous = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        summaries = _collect(client, runs, download_dir, routing_dir)
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = previous
    _assign_labels(summaries)
    return summaries


def _collect(client: Any, runs: Sequence[Any], download_dir: str | os.PathLike, routing_dir: str) -> list[RunSummary]:
    from dex_monai.analysis.modularity import expert_usage_from_json

    experiment_names: dict[str, str] = {}
    summaries = []
    for run in runs:
        info, data = run.info, run.data
        if info.experiment_id not in experiment_names:
            try:
                experiment_names[info.experiment_id] = client.get_experiment(info.experiment_id).name
            except Exception:
                experiment_names[info.experiment_id] = str(info.experiment_id)
        started = (
            datetime.fromtimestamp(info.start_time / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            if info.start_time
            else ""
        )
        summary = RunSummary(
            run_id=info.run_id,
            run_name=info.run_name or data.tags.get("mlflow.runName", "") or "",
            experiment=experiment_names[info.experiment_id],
            status=info.status,
            start_time=started,
            params=dict(data.params),
            metrics={k: float(v) for k, v in data.metrics.items()},
        )
        for key in sorted(k for k in data.metrics if _is_loss(k)):
            history = sorted(client.get_metric_history(info.run_id, key), key=lambda m: (m.step, m.timestamp))
            summary.histories[key] = [(int(m.step), float(m.value)) for m in history]
            values = np.array([m.value for m in history], dtype=np.float64)
            finite = values[np.isfinite(values)]
            summary.metric_min[key] = float(finite.min()) if finite.size else float("nan")
        latest = _latest_routing_artifacts(client, info.run_id, routing_dir)
        target = Path(download_dir) / info.run_id
        if "json" in latest:
            epoch, artifact = latest["json"]
            try:
                local = client.download_artifacts(info.run_id, artifact, str(target))
                with open(local, encoding="utf-8") as f:
                    summary.routing = expert_usage_from_json(json.load(f))
                summary.routing_epoch = epoch
            except Exception as e:
                print(f"warning: run {info.run_id}: cannot read {artifact}: {e}", file=sys.stderr)
        if "png" in latest:
            epoch, artifact = latest["png"]
            try:
                summary.routing_png = Path(client.download_artifacts(info.run_id, artifact, str(target)))
                summary.routing_png_epoch = epoch
            except Exception as e:
                print(f"warning: run {info.run_id}: cannot download {artifact}: {e}", file=sys.stderr)
        summaries.append(summary)
    return summaries


def _assign_labels(summaries: Sequence[RunSummary]) -> None:
    """Run name when unique, else ``name (id[:8])``; id[:8] for unnamed runs."""
    counts: dict[str, int] = {}
    for s in summaries:
        counts[s.run_name] = counts.get(s.run_name, 0) + 1
    seen: set[str] = set()
    for i, s in enumerate(summaries):
        if s.run_name and counts[s.run_name] == 1:
            label = s.run_name
        elif s.run_name:
            label = f"{s.run_name} ({s.run_id[:8]})"
        else:
            label = s.run_id[:8]
        if label in seen:
            label = f"{label} #{i}"
        seen.add(label)
        s.label = label


def _differing(summaries: Sequence[RunSummary], all_params: bool) -> list[str]:
    names = sorted({k for s in summaries for k in s.params})
    if all_params or len(summaries) < 2:
        return names
    return [k for k in names if len({s.params.get(k) for s in summaries}) > 1]


def build_tables(summaries: Sequence[RunSummary], all_params: bool = False) -> dict[str, Any]:
    """
    The comparison tables (pandas DataFrames).

    Args:
        summaries: from :func:`collect_runs`.
        all_params: keep every parameter; by default only those whose value differs between runs
            (a parameter missing from a run counts as a different value; with a single run, all).

    Returns:
        ``{"runs": one row per run (run_id, run_name, experiment, status, start_time),
        "params": rows = parameters, columns = run labels (strings, None when missing),
        "metrics": rows = the compared metrics of :func:`compared_metrics` (plus "<loss> (min)" rows), columns =
        run labels (NaN when missing),
        "wide": one row per run with every parameter and every metric (the CSV)}``.
    """
    import pandas as pd

    labels = [s.label for s in summaries]
    runs = pd.DataFrame(
        {
            "run_id": [s.run_id for s in summaries],
            "run_name": [s.run_name for s in summaries],
            "experiment": [s.experiment for s in summaries],
            "status": [s.status for s in summaries],
            "start_time": [s.start_time for s in summaries],
        },
        index=pd.Index(labels, name="run"),
    )
    param_names = _differing(summaries, all_params)
    params = pd.DataFrame(
        [[s.params.get(k) for s in summaries] for k in param_names],
        index=pd.Index(param_names, name="parameter"),
        columns=labels,
        dtype=object,
    )
    metric_names = sorted({k for s in summaries for k in s.metrics})
    rows, index = [], []
    for name in compared_metrics(metric_names):
        rows.append([s.metrics.get(name, np.nan) for s in summaries])
        index.append(name)
        if _is_loss(name):
            rows.append([s.metric_min.get(name, np.nan) for s in summaries])
            index.append(f"{name} (min)")
    metrics = pd.DataFrame(rows, index=pd.Index(index, name="metric"), columns=labels, dtype=np.float64)
    columns: dict[str, list] = {f"params.{k}": [s.params.get(k, "") for s in summaries] for k in param_names}
    for name in metric_names:
        columns[f"metrics.{name}"] = [s.metrics.get(name, np.nan) for s in summaries]
        if _is_loss(name):
            columns[f"metrics.{name}.min"] = [s.metric_min.get(name, np.nan) for s in summaries]
    wide = pd.concat([runs, pd.DataFrame(columns, index=runs.index)], axis=1)  # one block: no fragmented frame
    return {"runs": runs, "params": params, "metrics": metrics, "wide": wide}


def _fmt(value: Any, limit: int | None = _CELL_CHARS) -> str:
    """Table cell text: floats with 6 significant digits, "-" for missing values, long text cut."""
    if value is None:
        return _MISSING
    if isinstance(value, (float, np.floating)):
        return _MISSING if math.isnan(value) else f"{float(value):.6g}"
    text = str(value).replace("\n", " ")
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def _grid(table: Any, corner: str) -> tuple[list[str], list[list[str]]]:
    header = [corner] + [str(c) for c in table.columns]
    body = [[str(idx)] + [_fmt(v) for v in row] for idx, row in zip(table.index, table.itertuples(index=False))]
    return header, body


def _markdown(header: list[str], body: list[list[str]]) -> str:
    def esc(x: str) -> str:
        return x.replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def _text(header: list[str], body: list[list[str]], numbers_right: bool = False) -> str:
    """Plain-text table, left-aligned; with ``numbers_right`` the value columns are right-aligned."""
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    right = [numbers_right and i > 0 for i in range(len(header))]

    def line(row: list[str]) -> str:
        cells = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)]
        return "  ".join(cells).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in body])


def _runs_grid(tables: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    runs = tables["runs"]
    header = ["run", "run id", "name", "experiment", "status", "started"]
    body = [[str(label)] + [_fmt(v, None) for v in row] for label, row in zip(runs.index, runs.itertuples(index=False))]
    return header, body


def format_text_tables(tables: Mapping[str, Any]) -> str:
    """The runs, parameters and metrics tables as aligned plain text (for the console)."""
    parts = ["Runs", _text(*_runs_grid(tables))]
    params = tables["params"]
    parts += ["", "Parameters" + ("" if len(params) else " (none differ)")]
    if len(params):
        parts.append(_text(*_grid(params, "parameter")))
    metrics = tables["metrics"]
    parts += ["", "Final metrics" + ("" if len(metrics) else " (none logged)")]
    if len(metrics):
        parts.append(_text(*_grid(metrics, "metric"), numbers_right=True))
    return "\n".join(parts)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def _markdown_report(
    summaries: Sequence[RunSummary],
    tables: Mapping[str, Any],
    uri: str,
    selection: str,
    all_params: bool,
    files: Mapping[str, Path],
    out_dir: Path,
) -> str:
    now = datetime.now(tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [
        f"# Comparison of {len(summaries)} MLflow run{'s' if len(summaries) != 1 else ''}",
        "",
        f"- tracking store: `{uri}`",
        f"- selection: {selection}",
        f"- written: {now}",
        "",
        "## Runs",
        "",
        _markdown(*_runs_grid(tables)),
        "",
    ]
    params = tables["params"]
    n_all = len({k for s in summaries for k in s.params})
    what = "all parameters" if all_params or len(summaries) < 2 else "parameters that differ between the runs"
    lines += [f"## Parameters ({what}: {len(params)} of {n_all})", ""]
    lines += [_markdown(*_grid(params, "parameter")) if len(params) else "_All parameters are equal._", ""]
    lines += [
        "## Final metrics",
        "",
        "Last logged value of the losses, task metrics and routing summaries; `(min)` rows give the minimum of each"
        " loss over its history. Every other metric (schedules, per-layer routing values) is in the CSV.",
        "",
    ]
    metrics = tables["metrics"]
    lines += [_markdown(*_grid(metrics, "metric")) if len(metrics) else "_No metrics logged._", ""]
    lines += ["## Routing: expert usage by modality", ""]
    for s in summaries:
        if s.routing:
            lines.append(f"- {s.label}: epoch {s.routing_epoch}, modalities {', '.join(s.routing)}")
    missing = [s.label for s in summaries if not s.routing]
    if missing:
        lines.append("- runs without routing statistics: " + ", ".join(missing))
    lines += ["", "## Figures", ""]
    captions = {
        "loss_curves": "Loss curves",
        "final_metrics": "Final metrics",
        "expert_usage": "Expert usage by modality",
    }
    for key, caption in captions.items():
        if key in files:
            lines.append(f"![{caption}]({files[key].relative_to(out_dir).as_posix()})")
            lines.append("")
    for key, path in files.items():
        if key.startswith("run_heatmap:"):
            rel = path.relative_to(out_dir).as_posix()
            lines.append(f"- routing heatmap logged by {key.split(':', 1)[1]}: `{rel}`")
    return "\n".join(lines).rstrip() + "\n"
