# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""
Side-by-side comparison of MLflow runs (pre-training, fine-tuning, baselines).

Runs are selected from one tracking store by experiment name(s), by tags and/or by run ids; the
comparison is written to a folder and logged as the artifacts of a new "comparison" run:

* ``comparison.md`` -- markdown report: the runs, the parameters that differ, the final metrics
  (last logged value; the minimum too for every metric whose name contains "loss"), the figures;
* ``comparison.csv`` -- one row per run: ``run_id, run_name, experiment, status, start_time,
  params.<name>..., metrics.<name>..., metrics.<name>.min...``;
* ``loss_curves.png`` -- one panel per loss metric, one line per run, x = step;
* ``final_metrics.png`` -- one bar chart per metric (final value), one bar per run;
* ``expert_usage_by_run.png`` -- one row per run, one panel per modality (layers x experts, shared
  colour scale), from the latest ``routing/expert_usage_epoch_<N>.json`` artifact of each run;
* ``run_heatmaps/<run>_epoch_<N>.png`` -- copies of the latest ``routing/expert_usage_epoch_<N>.png``
  the runs logged themselves;
* ``selection.json`` -- the store, the selection and the compared run ids.

Command line (see ``docs/compare.md``)::

    python -m dex_monai.compare --experiment dex-pretrain --tag stage=pretrain --out eval/comparison
    python -m dex_monai.compare 1f0c... 9ab2... --tracking-uri bundles/dex_pretrain/eval/mlruns.db

Tracking store: ``--tracking-uri`` (a URI, or a plain path to an SQLite ``.db`` file or to the
folder holding ``mlruns.db``); without it ``$MLFLOW_TRACKING_URI``, else ``./eval/mlruns.db`` (where
a MONAI bundle run from its root keeps its runs), else ``./mlruns.db`` (the default of MONAI's
``MLFlowHandler``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import numpy as np

__all__ = [
    "COMPARISON_TAG",
    "COMPARED_RUN_IDS_TAG",
    "ComparisonError",
    "ComparisonResult",
    "DEFAULT_COMPARISON_EXPERIMENT",
    "DEFAULT_OUT_DIR",
    "RunSummary",
    "build_tables",
    "collect_runs",
    "compare_runs",
    "connect",
    "format_text_tables",
    "main",
    "parse_tags",
    "plot_final_metrics",
    "plot_loss_curves",
    "plot_routing_heatmaps",
    "resolve_tracking_uri",
    "select_runs",
]

DEFAULT_COMPARISON_EXPERIMENT = "dex-comparisons"
"""Experiment receiving the comparison runs."""
DEFAULT_OUT_DIR = os.path.join("eval", "comparison")
"""Output folder of the command line, relative to the working directory."""
COMPARISON_TAG = "dex.comparison"
"""Tag (value ``"true"``) set on comparison runs; such runs are skipped when searching."""
COMPARED_RUN_IDS_TAG = "dex.compared_run_ids"
"""Tag of a comparison run: comma-separated ids of the compared runs."""
COMPARED_RUN_NAMES_TAG = "dex.compared_run_names"
ROUTING_ARTIFACT_DIR = "routing"
_ROUTING_RE = re.compile(r"expert_usage_epoch_(\d+)\.(json|png)$")
_SCHEMES_WITHOUT_SLASHES = ("databricks", "databricks-uc", "uc")
_MAX_TAG_CHARS = 7900
_CELL_CHARS = 48
_MISSING = "-"


class ComparisonError(RuntimeError):
    """Raised for problems the user can fix: unknown experiment, no runs matched, unreachable store."""


# ----------------------------------------------------------------------------------------------
# tracking store
# ----------------------------------------------------------------------------------------------
def _sqlite_db_path(uri: str) -> Path | None:
    """Database file of an ``sqlite:///...`` URI (``None`` for in-memory databases)."""
    rest = uri.split(":", 1)[1]
    if not rest.startswith("///"):
        return None
    rest = unquote(rest[3:].split("?", 1)[0])
    return Path(rest) if rest else None


def _path_to_sqlite_uri(path: str | os.PathLike) -> str:
    """
    Same result as ``monai.utils.path_to_sqlite_uri`` (absolute POSIX path, percent-encoded), without
    importing MONAI (and PyTorch), which would slow the command line down by seconds.
    """
    return f"sqlite:///{quote(Path(path).absolute().as_posix(), safe='/:')}"


def resolve_tracking_uri(tracking_uri: str | os.PathLike | None = None, cwd: str | os.PathLike | None = None) -> str:
    """
    Turns the user's ``--tracking-uri`` into a URI MLflow accepts, checking local stores exist.

    Args:
        tracking_uri: a URI (``sqlite:///...``, ``http(s)://...``, ``databricks``...), or a plain path to
            an SQLite database file, or to a folder holding ``mlruns.db``.  ``None`` or ``""`` picks
            ``$MLFLOW_TRACKING_URI``, else ``<cwd>/eval/mlruns.db``, else ``<cwd>/mlruns.db``.
        cwd: base folder of the defaults (default: the working directory).

    Raises:
        ComparisonError: file store URIs (unsupported by MLflow 3), missing database files, no default
            store found.
    """
    base = Path(cwd) if cwd is not None else Path.cwd()
    if tracking_uri is None or str(tracking_uri) == "":
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if env:
            return resolve_tracking_uri(env, cwd=base)
        candidates = [base / "eval" / "mlruns.db", base / "mlruns.db"]
        for candidate in candidates:
            if candidate.is_file():
                return _path_to_sqlite_uri(candidate)
        raise ComparisonError(
            "no tracking store given and none found: looked for "
            + " and ".join(str(c) for c in candidates)
            + "; pass --tracking-uri (a URI or the path of an mlruns.db file)."
        )
    uri = str(tracking_uri)
    if "://" in uri or uri.split(":", 1)[0] in _SCHEMES_WITHOUT_SLASHES:
        scheme = uri.split(":", 1)[0].lower()
        if scheme == "file":
            raise ComparisonError(
                f"tracking store {uri}: MLflow 3 no longer supports the file store; use an SQLite "
                "database (sqlite:///<path>/mlruns.db) or a tracking server URI."
            )
        if scheme.startswith("sqlite"):
            db = _sqlite_db_path(uri)
            if db is not None and not db.is_file():
                raise ComparisonError(f"tracking store {uri} is unreachable: database file {db} does not exist.")
        return uri
    path = Path(uri).expanduser()
    if not path.is_absolute():
        path = base / path
    if path.is_dir():
        if (path / "mlruns.db").is_file():
            path = path / "mlruns.db"
        else:
            raise ComparisonError(
                f"tracking store {uri}: {path} is a folder without mlruns.db (the MLflow file store is no "
                "longer supported; point to an SQLite .db file or a server URI)."
            )
    if not path.is_file():
        raise ComparisonError(f"tracking store {uri} is unreachable: no such database file {path}.")
    return _path_to_sqlite_uri(path)


def connect(tracking_uri: str) -> Any:
    """
    An ``mlflow.MlflowClient`` for ``tracking_uri`` after a first request that proves the store answers.

    Raises:
        ComparisonError: the store cannot be reached or read (the message names the URI).
    """
    import mlflow

    try:
        client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        client.search_experiments(max_results=1)
    except Exception as e:  # connection refused, bad database, unknown scheme...
        raise ComparisonError(f"cannot reach the MLflow tracking store {tracking_uri}: {type(e).__name__}: {e}") from e
    return client


# ----------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------
def parse_tags(tags: Mapping[str, str] | Sequence[str] | None) -> dict[str, str]:
    """``{"k": "v"}`` from a mapping or from ``["k=v", ...]`` strings (the value may contain ``=``)."""
    if tags is None:
        return {}
    if isinstance(tags, Mapping):
        return {str(k): str(v) for k, v in tags.items()}
    out = {}
    for item in tags:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ComparisonError(f"tag filter {item!r} is not of the form key=value.")
        out[key.strip()] = value
    return out


def _tag_filter(tags: Mapping[str, str]) -> str:
    """MLflow filter string for the tags it can express (the others are checked afterwards)."""
    clauses = []
    for key, value in tags.items():
        if "`" in key:
            continue
        if "'" not in value:
            clauses.append(f"tags.`{key}` = '{value}'")
        elif '"' not in value:
            clauses.append(f'tags.`{key}` = "{value}"')
    return " and ".join(clauses)


def _all_experiment_ids(client: Any) -> list[str]:
    ids: list[str] = []
    token = None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        ids += [e.experiment_id for e in page]
        token = getattr(page, "token", None)
        if not token:
            return ids


def _describe_selection(experiments: Sequence[str], tags: Mapping[str, str], run_ids: Sequence[str]) -> str:
    parts = []
    if experiments:
        parts.append("experiments " + ", ".join(repr(e) for e in experiments))
    if tags:
        parts.append("tags " + ", ".join(f"{k}={v}" for k, v in tags.items()))
    if run_ids:
        parts.append("run ids " + ", ".join(run_ids))
    return "; ".join(parts) or "nothing"


def select_runs(
    client: Any,
    experiments: Sequence[str] = (),
    tags: Mapping[str, str] | Sequence[str] | None = None,
    run_ids: Sequence[str] = (),
    max_runs: int = 100,
    include_comparisons: bool = False,
) -> list[Any]:
    """
    The MLflow runs to compare.

    Runs given by id come first, in the given order; then the runs found by searching the named
    experiments (all experiments when only tags are given) for runs carrying all the tags, oldest
    first.  Deleted runs and, unless ``include_comparisons``, earlier comparison runs (tag
    :data:`COMPARISON_TAG`) are left out of the search.  Duplicates are dropped.

    Args:
        client: an ``mlflow.MlflowClient``.
        experiments: experiment names.
        tags: required tags, ``{"key": "value"}`` or ``["key=value"]`` (all must match).
        run_ids: run ids.
        max_runs: cap on the number of searched runs (a warning is printed when more matched).
        include_comparisons: keep comparison runs in search results.

    Raises:
        ComparisonError: unknown experiment or run id, or nothing matched.
    """
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    uri = getattr(client, "tracking_uri", "the tracking store")
    tag_map = parse_tags(tags)
    experiments = list(experiments)
    run_ids = [r for r in run_ids if r]
    if not experiments and not tag_map and not run_ids:
        raise ComparisonError("nothing to compare: give experiment names, --tag key=value filters or run ids.")
    runs: list[Any] = []
    for run_id in run_ids:
        try:
            runs.append(client.get_run(run_id))
        except MlflowException as e:
            raise ComparisonError(f"run {run_id} not found in the tracking store {uri}.") from e
    if experiments or tag_map:
        if experiments:
            exp_ids = []
            for name in experiments:
                exp = client.get_experiment_by_name(name)
                if exp is None or exp.lifecycle_stage != "active":
                    known = sorted(e.name for e in client.search_experiments(max_results=200))
                    raise ComparisonError(
                        f"unknown experiment {name!r} in the tracking store {uri}; known experiments: "
                        + (", ".join(repr(k) for k in known) or "none")
                    )
                exp_ids.append(exp.experiment_id)
        else:
            exp_ids = _all_experiment_ids(client)
        found: list[Any] = []
        token = None
        while exp_ids:
            page = client.search_runs(
                exp_ids,
                filter_string=_tag_filter(tag_map),
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=min(1000, max_runs + 1),
                order_by=["attributes.start_time ASC"],
                page_token=token,
            )
            for run in page:
                run_tags = run.data.tags
                if any(run_tags.get(k) != v for k, v in tag_map.items()):
                    continue
                if not include_comparisons and run_tags.get(COMPARISON_TAG) == "true":
                    continue
                found.append(run)
            token = getattr(page, "token", None)
            if not token or len(found) > max_runs:
                break
        if len(found) > max_runs:
            print(
                f"warning: more than {max_runs} runs matched; comparing the first {max_runs} (see --max-runs).",
                file=sys.stderr,
            )
            found = found[:max_runs]
        runs += found
    unique: dict[str, Any] = {}
    for run in runs:
        unique.setdefault(run.info.run_id, run)
    if not unique:
        raise ComparisonError(
            f"no runs matched {_describe_selection(experiments, tag_map, run_ids)} in the tracking store {uri}."
        )
    return list(unique.values())


# ----------------------------------------------------------------------------------------------
# run contents
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------
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
        "metrics": rows = metrics (plus "<loss> (min)" rows), columns = run labels (NaN when missing),
        "wide": one row per run with every column (the CSV)}``.
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
    for name in metric_names:
        rows.append([s.metrics.get(name, np.nan) for s in summaries])
        index.append(name)
        if _is_loss(name):
            rows.append([s.metric_min.get(name, np.nan) for s in summaries])
            index.append(f"{name} (min)")
    metrics = pd.DataFrame(rows, index=pd.Index(index, name="metric"), columns=labels, dtype=np.float64)
    wide = runs.copy()
    for k in param_names:
        wide[f"params.{k}"] = [s.params.get(k, "") for s in summaries]
    for name in metric_names:
        wide[f"metrics.{name}"] = [s.metrics.get(name, np.nan) for s in summaries]
        if _is_loss(name):
            wide[f"metrics.{name}.min"] = [s.metric_min.get(name, np.nan) for s in summaries]
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


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------
def _grid_figure(n_panels: int, ncols: int, panel_size: tuple[float, float]) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, n_panels))
    nrows = int(math.ceil(n_panels / ncols))
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, format="png")
    return path


def _colour(i: int) -> Any:
    from matplotlib import colormaps

    return colormaps["tab10"](i % 10)


def plot_loss_curves(summaries: Sequence[RunSummary], path: str | os.PathLike) -> Path | None:
    """
    One panel per metric whose name contains "loss", one line per run (x = step).

    Returns:
        the PNG path, or ``None`` when no run logged a loss metric.
    """
    names = sorted({k for s in summaries for k in s.histories})
    if not names:
        return None
    fig, axes = _grid_figure(len(names), 3, (5.0, 3.4))
    for ax, name in zip(axes, names):
        for i, s in enumerate(summaries):
            history = s.histories.get(name)
            if not history:
                continue
            steps, values = zip(*history)
            ax.plot(steps, values, label=s.label, color=_colour(i), marker="o" if len(steps) < 30 else None, ms=3)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Loss curves")
    return _save(fig, Path(path))


def plot_final_metrics(summaries: Sequence[RunSummary], path: str | os.PathLike) -> Path | None:
    """
    One bar chart per metric (final value), one bar per run.

    Returns:
        the PNG path, or ``None`` when no run logged a metric.
    """
    names = sorted({k for s in summaries for k in s.metrics})
    if not names:
        return None
    width = max(3.2, 0.6 * len(summaries) + 1.5)
    fig, axes = _grid_figure(len(names), 4, (width, 3.0))
    positions = np.arange(len(summaries))
    for ax, name in zip(axes, names):
        values = [s.metrics.get(name, np.nan) for s in summaries]
        ax.bar(positions, values, color=[_colour(i) for i in range(len(summaries))])
        for x, v in zip(positions, values):
            if np.isfinite(v):
                ax.annotate(f"{v:.4g}", (x, v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(positions)
        ax.set_xticklabels([s.label for s in summaries], rotation=30, ha="right", fontsize=7)
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Final metrics (last logged value)")
    return _save(fig, Path(path))


def plot_routing_heatmaps(summaries: Sequence[RunSummary], path: str | os.PathLike) -> Path | None:
    """
    Expert usage by modality of every run side by side: one row per run (latest routing JSON), one
    panel per modality (layers x experts), one colour scale for all; runs without routing statistics
    are named under the figure.

    Returns:
        the PNG path, or ``None`` when no run has routing statistics.
    """
    from dex_monai.analysis.modularity import plot_expert_usage_grid

    with_routing = [s for s in summaries if s.routing]
    if not with_routing:
        return None
    missing = [s.label for s in summaries if not s.routing]
    rows = {f"{s.label}\n(epoch {s.routing_epoch})": s.routing for s in with_routing}
    footnote = ("No routing statistics: " + ", ".join(missing)) if missing else None
    return plot_expert_usage_grid(
        rows, path, title="Expert usage by modality (latest epoch of each run)", footnote=footnote
    )


# ----------------------------------------------------------------------------------------------
# the whole comparison
# ----------------------------------------------------------------------------------------------
@dataclass
class ComparisonResult:
    """What :func:`compare_runs` produced."""

    tracking_uri: str
    out_dir: Path
    run_ids: list[str]
    labels: list[str]
    tables: dict[str, Any]
    """See :func:`build_tables`."""
    text: str
    """The console tables."""
    files: dict[str, Path]
    """``{"markdown", "csv", "selection", "loss_curves", "final_metrics", "expert_usage"}`` (figures only
    when there was something to draw) plus ``"run_heatmap:<label>"`` for copied run PNGs."""
    runs_without_routing: list[str]
    """Labels of the runs that have no routing JSON artifact."""
    comparison_run_id: str | None = None
    comparison_experiment_id: str | None = None


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
        "Last logged value of every metric; `(min)` rows give the minimum of each loss over its history.",
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


def _artifact_location(uri: str) -> str | None:
    """Artifact root of a new experiment: ``<db folder>/mlruns`` for SQLite stores (like MLFlowHandler)."""
    if uri.lower().startswith("sqlite"):
        db = _sqlite_db_path(uri)
        if db is not None:
            return (db.resolve().parent / "mlruns").as_uri()
    return None


def _log_comparison(
    client: Any,
    uri: str,
    experiment: str,
    run_name: str | None,
    summaries: Sequence[RunSummary],
    files: Mapping[str, Path],
    out_dir: Path,
    selection: str,
    note: str,
) -> tuple[str, str]:
    """Creates the comparison run, logs the files as artifacts; returns ``(run_id, experiment_id)``."""
    from mlflow.entities import RunStatus

    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        exp_id = client.create_experiment(experiment, artifact_location=_artifact_location(uri))
    elif exp.lifecycle_stage != "active":
        raise ComparisonError(
            f"comparison experiment {experiment!r} is deleted in {uri}; restore it or pass --comparison-experiment."
        )
    else:
        exp_id = exp.experiment_id
    ids = ",".join(s.run_id for s in summaries)
    tags = {
        COMPARISON_TAG: "true",
        COMPARED_RUN_IDS_TAG: ids[:_MAX_TAG_CHARS],
        COMPARED_RUN_NAMES_TAG: ",".join(s.run_name or s.run_id for s in summaries)[:_MAX_TAG_CHARS],
        "dex.compared_experiments": ",".join(sorted({s.experiment for s in summaries}))[:_MAX_TAG_CHARS],
        "dex.selection": selection[:_MAX_TAG_CHARS],
        "mlflow.note.content": note[:_MAX_TAG_CHARS],
    }
    name = run_name or f"compare-{len(summaries)}-runs-{time.strftime('%Y%m%d-%H%M%S')}"
    run = client.create_run(exp_id, tags=tags, run_name=name)
    run_id = run.info.run_id
    try:
        client.log_param(run_id, "num_compared_runs", len(summaries))
        for path in files.values():
            rel = path.relative_to(out_dir).parent.as_posix()
            client.log_artifact(run_id, str(path), None if rel in ("", ".") else rel)
    except Exception:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    return run_id, exp_id


_OUTPUT_NAMES = (
    "comparison.md",
    "comparison.csv",
    "selection.json",
    "loss_curves.png",
    "final_metrics.png",
    "expert_usage_by_run.png",
)


def compare_runs(
    experiments: Sequence[str] = (),
    tags: Mapping[str, str] | Sequence[str] | None = None,
    run_ids: Sequence[str] = (),
    tracking_uri: str | os.PathLike | None = None,
    out_dir: str | os.PathLike = DEFAULT_OUT_DIR,
    all_params: bool = False,
    comparison_experiment: str = DEFAULT_COMPARISON_EXPERIMENT,
    run_name: str | None = None,
    log_comparison: bool = True,
    max_runs: int = 100,
    include_comparisons: bool = False,
    routing_dir: str = ROUTING_ARTIFACT_DIR,
) -> ComparisonResult:
    """
    Compares MLflow runs: writes tables and figures to ``out_dir`` and logs them as a new run.

    Args:
        experiments: experiment names to search.
        tags: required tags (``{"k": "v"}`` or ``["k=v"]``), all must match.
        run_ids: runs to include explicitly.
        tracking_uri: URI or path of the store, see :func:`resolve_tracking_uri`.
        out_dir: output folder (created; earlier outputs of the same names are replaced).
        all_params: list every parameter, not only the differing ones.
        comparison_experiment: experiment of the comparison run (created when missing).
        run_name: name of the comparison run (default ``compare-<n>-runs-<time>``).
        log_comparison: create the comparison run (``False`` only writes the files).
        max_runs: cap on searched runs.
        include_comparisons: also compare earlier comparison runs found by the search.
        routing_dir: artifact folder of the routing statistics in the compared runs.

    Raises:
        ComparisonError: unreachable store, unknown experiment or run, no runs matched.
    """
    uri = resolve_tracking_uri(tracking_uri)
    client = connect(uri)
    tag_map = parse_tags(tags)
    runs = select_runs(
        client, experiments, tag_map, run_ids, max_runs=max_runs, include_comparisons=include_comparisons
    )
    selection = _describe_selection(list(experiments), tag_map, list(run_ids))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in _OUTPUT_NAMES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "run_heatmaps", ignore_errors=True)

    with tempfile.TemporaryDirectory(prefix="dex-compare-") as tmp:
        summaries = collect_runs(client, runs, tmp, routing_dir=routing_dir)
        tables = build_tables(summaries, all_params=all_params)
        files: dict[str, Path] = {}
        tables["wide"].to_csv(out / "comparison.csv", index_label="run")
        files["csv"] = out / "comparison.csv"
        for key, fn, fname in (
            ("loss_curves", plot_loss_curves, "loss_curves.png"),
            ("final_metrics", plot_final_metrics, "final_metrics.png"),
            ("expert_usage", plot_routing_heatmaps, "expert_usage_by_run.png"),
        ):
            written = fn(summaries, out / fname)
            if written is not None:
                files[key] = written
        for s in summaries:
            if s.routing_png is not None:
                dst = out / "run_heatmaps" / f"{_safe_name(s.label)}_epoch_{s.routing_png_epoch}.png"
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(s.routing_png, dst)
                files[f"run_heatmap:{s.label}"] = dst
    missing = [s.label for s in summaries if not s.routing]
    selection_record = {
        "tracking_uri": uri,
        "selection": selection,
        "runs": [
            {"run_id": s.run_id, "label": s.label, "run_name": s.run_name, "experiment": s.experiment,
             "routing_epoch": s.routing_epoch}
            for s in summaries
        ],
        "runs_without_routing": missing,
    }
    (out / "selection.json").write_text(json.dumps(selection_record, indent=2), encoding="utf-8")
    files["selection"] = out / "selection.json"
    markdown = _markdown_report(summaries, tables, uri, selection, all_params, files, out)
    (out / "comparison.md").write_text(markdown, encoding="utf-8")
    files = {"markdown": out / "comparison.md", **files}

    result = ComparisonResult(
        tracking_uri=uri,
        out_dir=out,
        run_ids=[s.run_id for s in summaries],
        labels=[s.label for s in summaries],
        tables=tables,
        text=format_text_tables(tables),
        files=files,
        runs_without_routing=missing,
    )
    if log_comparison:
        result.comparison_run_id, result.comparison_experiment_id = _log_comparison(
            client, uri, comparison_experiment, run_name, summaries, files, out, selection, markdown
        )
    return result


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dex_monai.compare",
        description="Compare MLflow runs: parameter/metric tables, loss curves, final-metric bars and "
        "expert-by-modality heatmaps, logged as a new comparison run.",
    )
    p.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="run ids to compare")
    p.add_argument("--run-id", action="append", default=[], dest="extra_run_ids", metavar="ID",
                   help="run id to compare (repeatable)")
    p.add_argument("--experiment", "-e", action="append", default=[], metavar="NAME",
                   help="experiment name to search (repeatable)")
    p.add_argument("--tag", "-t", action="append", default=[], metavar="KEY=VALUE",
                   help="only runs with this tag value (repeatable, all must match)")
    p.add_argument("--tracking-uri", default=None, metavar="URI_OR_PATH",
                   help="tracking URI or path of an SQLite .db file (default: $MLFLOW_TRACKING_URI, "
                   "else ./eval/mlruns.db, else ./mlruns.db)")
    p.add_argument("--out", default=DEFAULT_OUT_DIR, metavar="DIR", help=f"output folder (default {DEFAULT_OUT_DIR})")
    p.add_argument("--all-params", action="store_true", help="list all parameters, not only the differing ones")
    p.add_argument("--comparison-experiment", default=DEFAULT_COMPARISON_EXPERIMENT, metavar="NAME",
                   help=f"experiment of the comparison run (default {DEFAULT_COMPARISON_EXPERIMENT})")
    p.add_argument("--run-name", default=None, help="name of the comparison run")
    p.add_argument("--no-log", action="store_true", help="only write the files, create no comparison run")
    p.add_argument("--max-runs", type=int, default=100, help="cap on the number of searched runs (default 100)")
    p.add_argument("--include-comparisons", action="store_true", help="also compare earlier comparison runs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 2 user error)."""
    args = _parser().parse_args(argv)
    # fail fast on an unreachable tracking server instead of MLflow's long retry schedule
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    try:
        result = compare_runs(
            experiments=args.experiment,
            tags=args.tag,
            run_ids=list(args.run_ids) + list(args.extra_run_ids),
            tracking_uri=args.tracking_uri,
            out_dir=args.out,
            all_params=args.all_params,
            comparison_experiment=args.comparison_experiment,
            run_name=args.run_name,
            log_comparison=not args.no_log,
            max_runs=args.max_runs,
            include_comparisons=args.include_comparisons,
        )
    except ComparisonError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.text)
    print()
    if result.runs_without_routing:
        print("Runs without routing statistics: " + ", ".join(result.runs_without_routing))
    print(f"Tracking store: {result.tracking_uri}")
    written = ", ".join(p.relative_to(result.out_dir).as_posix() for p in result.files.values())
    print(f"Written to {result.out_dir}: {written}")
    if result.comparison_run_id:
        print(f"Comparison run: {result.comparison_run_id} (experiment id {result.comparison_experiment_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
