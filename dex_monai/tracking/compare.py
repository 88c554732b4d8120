# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""``python -m dex_monai.compare``: select runs, write the tables and figures, log them as a comparison run."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dex_monai.tracking.plots import (
    plot_final_metrics,
    plot_loss_curves,
    plot_routing_heatmaps,
)
from dex_monai.tracking.report import (
    RunSummary,
    _markdown_report,
    _safe_name,
    build_tables,
    collect_runs,
    format_text_tables,
)
from dex_monai.tracking.selection import _describe_selection, parse_tags, select_runs
from dex_monai.tracking.store import (
    _MAX_TAG_CHARS,
    COMPARED_RUN_IDS_TAG,
    COMPARED_RUN_NAMES_TAG,
    COMPARISON_TAG,
    DEFAULT_COMPARISON_EXPERIMENT,
    DEFAULT_OUT_DIR,
    ROUTING_ARTIFACT_DIR,
    ComparisonError,
    _sqlite_db_path,
    connect,
    resolve_tracking_uri,
)


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
