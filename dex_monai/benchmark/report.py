# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Report of the multi-seed transfer protocol, from its stored cells (``<out_dir>/cells``) or from its MLflow runs:

* ``protocol_report.md`` -- per (regime, evaluation) the table of mean score with 95 % t-interval over seeds (one row
  per task, columns = initialisations, a mean-over-tasks row), the paired difference DEX - dense over tasks x seeds
  with its interval, the Wilcoxon test and a plain verdict, the collapse diagnostics (NMI per layer, effective rank,
  modality CKA; mean over seeds) and the measured wall times;
* ``protocol_cells.csv`` -- one row per cell; ``protocol_report.json`` -- the statistics;
* ``paired_difference.png`` -- DEX - dense per task and overall, one dot per seed, mean with its interval, one panel
  per (regime, evaluation); ``expert_usage_<kind>_<routing|clusters>.png`` -- expert-by-modality heatmaps (first seed).

Command line (also ``python -m dex_monai.compare benchmark-report ...``)::

    python -m dex_monai.benchmark.report --out-dir outputs/transfer_protocol
    python -m dex_monai.benchmark.report --tracking-uri outputs/transfer_protocol/mlruns.db --benchmark-id 3f2a... --out-dir rep
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dex_monai.benchmark.stats import mean_interval, paired_difference, verdict

__all__ = ["load_cells", "main", "records_from_mlflow", "summarise", "write_report"]

_FIELDS = ["key", "task", "init", "regime", "evaluation", "seed", "modality", "metric", "score", "train_size",
           "eval_size", "seconds", "cpu_seconds"]


def load_cells(out_dir: Path) -> tuple[list[dict], list[dict]]:
    """The cell records and the diagnostics records stored under ``out_dir/cells``."""
    cells, diagnostics = [], []
    for path in sorted((Path(out_dir) / "cells").glob("*.json")):
        record = json.loads(path.read_text())
        (diagnostics if path.stem.startswith("diagnostics__") else cells).append(record)
    return cells, diagnostics


def records_from_mlflow(tracking_uri: str, benchmark_id: str) -> list[dict]:
    """The cell records rebuilt from the MLflow runs tagged ``benchmark_id`` (one run per cell); ``tracking_uri`` may
    be a plain path to an SQLite ``.db`` file."""
    import mlflow

    from dex_monai.benchmark.tasks import TASKS
    from dex_monai.tracking.store import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.benchmark_id = '{benchmark_id}'")
    records = []
    for _, row in runs.iterrows():
        key = row.get("tags.cell")
        if not isinstance(key, str) or not key:
            continue
        task = row["tags.task"]
        records.append({"key": key, "task": task, "init": row["tags.init"], "regime": row["tags.regime"],
                        "evaluation": row["tags.evaluation"], "seed": int(row["tags.seed"]),
                        "modality": TASKS[task].modality if task in TASKS else "",
                        "metric": "auc" if task in TASKS and TASKS[task].kind == "classification" else "dice",
                        "score": float(row.get("metrics.score", float("nan"))),
                        "seconds": float(row.get("metrics.train_seconds", float("nan")))})
    return records


def summarise(cells: Sequence[dict], first: str = "dex", second: str = "dense", order: Sequence[str] = ()) -> dict:
    """Per (regime, evaluation): per task and init the interval over seeds, the mean over tasks per init, and the
    paired difference ``first - second`` over the (task, seed) pairs both have; plus every cell with a non-finite score.
    Initialisations are listed in ``order`` first, then alphabetically."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for c in cells:
        groups[(c["regime"], c["evaluation"])].append(c)
    non_finite = sorted(c["key"] for c in cells if not math.isfinite(float(c["score"])))
    summary: dict = {"groups": {}, "non_finite": non_finite}
    all_pairs: list[tuple[float, float]] = []
    for (regime, evaluation), items in sorted(groups.items()):
        tasks = sorted({c["task"] for c in items})
        present = {c["init"] for c in items}
        inits = [i for i in order if i in present] + sorted(present - set(order))
        by = {(c["task"], c["init"], c["seed"]): float(c["score"]) for c in items}
        seeds = sorted({c["seed"] for c in items})
        table: dict = {}
        for task in tasks:
            for init in inits:
                values = [by[(task, init, s)] for s in seeds if (task, init, s) in by]
                finite = [v for v in values if math.isfinite(v)]
                table[f"{task}|{init}"] = (mean_interval(finite).__dict__ if finite else None, len(values) - len(finite))
        means = {}
        for init in inits:  # mean over tasks per seed, then the interval over seeds
            per_seed = [np.mean([by[(t, init, s)] for t in tasks]) for s in seeds
                        if all((t, init, s) in by and math.isfinite(by[(t, init, s)]) for t in tasks)]
            means[init] = mean_interval(per_seed).__dict__ if per_seed else None
        pairs = [(by[(t, first, s)], by[(t, second, s)]) for t in tasks for s in seeds
                 if (t, first, s) in by and (t, second, s) in by
                 and math.isfinite(by[(t, first, s)]) and math.isfinite(by[(t, second, s)])]
        entry = {"tasks": tasks, "inits": inits, "seeds": seeds, "table": table, "mean": means, "pairs": pairs}
        if pairs:
            diff = paired_difference([a for a, _ in pairs], [b for _, b in pairs])
            entry["paired"] = diff.to_dict()
            entry["verdict"] = verdict(diff, first.upper() if first == "dex" else first, second)
            all_pairs += pairs
        summary["groups"][f"{regime}|{evaluation}"] = entry
    if all_pairs:
        diff = paired_difference([a for a, _ in all_pairs], [b for _, b in all_pairs])
        summary["overall"] = {"paired": diff.to_dict(), "verdict": verdict(diff, first.upper() if first == "dex" else first, second)}
    return summary


def _fmt(iv: dict | None, bad: int = 0, seeds: int = 0) -> str:
    """``mean [low, high]``, with ``(n=..)`` when fewer than ``seeds`` values and the count of NaN scores."""
    if iv is None:
        return f"n/a ({bad} NaN)" if bad else "n/a"
    text = f"{iv['mean']:.3f}" if iv["n"] < 2 else f"{iv['mean']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]"
    return text + (f" (n={iv['n']})" if iv["n"] < seeds else "") + (f" ({bad} NaN)" if bad else "")


def _diagnostics_markdown(diagnostics: Sequence[dict]) -> list[str]:
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for d in diagnostics:
        by_kind[d["kind"]].append(d)
    lines = ["| encoder | seeds | routing NMI per layer | cluster NMI per layer | effective rank (mean over modalities) "
             "| CKA(features, modality) | pre-training s |", "|---|---|---|---|---|---|---|"]
    for kind, items in sorted(by_kind.items()):
        def layers(name: str) -> str:
            rows = [d[name] for d in items if name in d]
            return ", ".join(f"{v:.3f}" for v in np.mean(rows, axis=0)) if rows else "n/a (no experts)"

        erank = mean_interval([np.mean(list(d["effective_rank"].values())) for d in items]).__dict__
        cka = mean_interval([d["modality_cka"] for d in items]).__dict__
        seconds = np.mean([d["pretrain_seconds"] for d in items])
        lines.append(f"| {kind} | {len(items)} | {layers('routing_nmi')} | {layers('cluster_nmi')} | {_fmt(erank)} "
                     f"| {_fmt(cka)} | {seconds:.0f} |")
    return lines


def plot_paired_differences(summary: dict, path: Path, first: str = "dex", second: str = "dense") -> Path | None:
    """One panel per (regime, evaluation): ``first - second`` per task (dots: seeds; bar: mean and 95 % interval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(name, g) for name, g in summary["groups"].items() if g.get("pairs")]
    if not groups:
        return None
    columns = min(2, len(groups))
    rows = math.ceil(len(groups) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.0 * columns, 4.2 * rows), squeeze=False, sharey=True)
    dots: list[float] = []
    for ax, (name, g) in zip(axes.flat, groups):
        labels = g["tasks"] + ["all tasks"]
        for x, task in enumerate(labels):
            if task == "all tasks":
                values = [a - b for a, b in g["pairs"]]
            else:
                values = [a - b for (a, b), t in zip(g["pairs"], g["pair_tasks"]) if t == task]
            if not values:
                continue
            iv = mean_interval(values)
            dots += values + ([iv.low, iv.high] if task == "all tasks" else [])
            ax.scatter(np.full(len(values), x) + np.linspace(-0.15, 0.15, len(values)), values, s=14, color="0.55",
                       zorder=2)
            color = "tab:green" if iv.low > 0 else "tab:red" if iv.high < 0 else "tab:blue"
            ax.errorbar(x, iv.mean, yerr=[[iv.mean - iv.low], [iv.high - iv.mean]], fmt="s" if task == "all tasks" else "o",
                        color=color, capsize=4, markersize=8 if task == "all tasks" else 6, zorder=3)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.axvline(len(labels) - 1.5, color="0.7", linewidth=0.8, linestyle=":")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=40, ha="right", fontsize=9)
        p = g["paired"]["wilcoxon_p"]
        ax.set_title(f"{name.replace('|', ', ')}\nWilcoxon p = {p:.3g}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.flat[len(groups):]:
        ax.axis("off")
    span = max(abs(min(dots)), abs(max(dots)), 0.01) * 1.3  # the seeds and the pooled interval; wider per-task bars clip
    axes[0][0].set_ylim(-span, span)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"{first} - {second} (AUC or Dice)")
    fig.suptitle(f"Paired difference {first} - {second}: grey dots = seeds, markers = mean with 95 % t-interval "
                 "(green/red: interval above/below 0; long bars clipped)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out_dir: Path, first: str = "dex", second: str = "dense", inits: Sequence[str] | None = None,
                 cells: Sequence[dict] | None = None, report_dir: Path | None = None) -> dict:
    """Render the report of the run in ``out_dir`` (or of ``cells``) into ``report_dir`` (default ``out_dir``);
    returns ``{"files": {name: path}, "summary": ..., "non_finite": [cell keys]}``."""
    from dex_monai.analysis import plot_modality_expert_heatmaps

    out_dir = Path(out_dir)
    report_dir = Path(report_dir or out_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    stored, diagnostics = load_cells(out_dir) if (out_dir / "cells").is_dir() else ([], [])
    cells = list(cells if cells is not None else stored)
    if inits is not None:
        cells = [c for c in cells if c["init"] in inits]
    summary = summarise(cells, first, second, order=list(inits or (first, second)))
    for key, g in summary["groups"].items():  # the task of every pair, for the plot
        regime, evaluation = key.split("|")
        by = {(c["task"], c["init"], c["seed"]): float(c["score"]) for c in cells
              if c["regime"] == regime and c["evaluation"] == evaluation}
        g["pair_tasks"] = [t for t in g["tasks"] for s in g["seeds"] if (t, first, s) in by and (t, second, s) in by
                           and math.isfinite(by[(t, first, s)]) and math.isfinite(by[(t, second, s)])]
    files: dict[str, str] = {}
    md = [f"# Transfer protocol report ({len(cells)} cells)", ""]
    if summary["non_finite"]:
        md += [f"**{len(summary['non_finite'])} cell(s) with a non-finite score** (left out of the statistics): "
               + ", ".join(summary["non_finite"]), ""]
    for key, g in summary["groups"].items():
        regime, evaluation = key.split("|")
        md += [f"## {evaluation}, {regime} labels (seeds {', '.join(map(str, g['seeds']))}; mean [95 % CI] over seeds)",
               "", "| task | metric | " + " | ".join(g["inits"]) + " |", "|---|---|" + "---|" * len(g["inits"])]
        metric = {c["task"]: c["metric"] for c in cells}
        for task in g["tasks"]:
            md.append(f"| {task} | {metric[task]} | " + " | ".join(_fmt(*g["table"][f"{task}|{i}"], len(g["seeds"])) for i in g["inits"]) + " |")
        md.append("| **mean over tasks** | | " + " | ".join(_fmt(g["mean"][i], 0, len(g["seeds"])) for i in g["inits"]) + " |")
        md += ["", g.get("verdict", f"no {first}/{second} pairs"), ""]
    if "overall" in summary:
        md += ["## All regimes and evaluations together", "", summary["overall"]["verdict"], ""]
    if diagnostics:
        md += ["## Collapse diagnostics (pre-trained encoders; mean over seeds)", "", *_diagnostics_markdown(diagnostics), ""]
    seconds: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for c in cells:
        seconds[c["evaluation"]].append((float(c.get("seconds", "nan")), float(c.get("cpu_seconds", "nan"))))
    for d in diagnostics:
        seconds[f"pre-training ({d['kind']})"].append((float(d.get("pretrain_seconds", "nan")),
                                                      float(d.get("pretrain_cpu_seconds", "nan"))))
    md += ["## Time per cell (measured; CPU = the process's CPU seconds, all threads)", "",
           "| stage | count | mean wall s | total wall s | mean CPU s | total CPU s |", "|---|---|---|---|---|---|"]
    for e, v in sorted(seconds.items()):
        wall, cpu = np.array(v).T
        md.append(f"| {e} | {len(v)} | {np.nanmean(wall):.1f} | {np.nansum(wall):.0f} | {np.nanmean(cpu):.1f} "
                  f"| {np.nansum(cpu):.0f} |")
    (report_dir / "protocol_report.md").write_text("\n".join(md) + "\n")
    files["markdown"] = str(report_dir / "protocol_report.md")
    with open(report_dir / "protocol_cells.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sorted(cells, key=lambda c: c["key"]))
    files["csv"] = str(report_dir / "protocol_cells.csv")
    (report_dir / "protocol_report.json").write_text(json.dumps(summary, indent=1, default=float))
    files["json"] = str(report_dir / "protocol_report.json")
    plot = plot_paired_differences(summary, report_dir / "paired_difference.png", first, second)
    if plot is not None:
        files["paired_plot"] = str(plot)
    first_seed = {}
    for d in diagnostics:
        if d["kind"] not in first_seed or d["seed"] < first_seed[d["kind"]]["seed"]:
            first_seed[d["kind"]] = d
    for kind, d in sorted(first_seed.items()):
        for source, title in (("routing_usage", "routed experts"), ("cluster_usage", "k-means 'experts' of layer features")):
            if source in d:
                path = report_dir / f"expert_usage_{kind}_{source.split('_')[0]}.png"
                usage = {m: np.asarray(u, dtype=float) for m, u in d[source].items()}
                plot_modality_expert_heatmaps(usage, path, title=f"{kind} (seed {d['seed']}): {title} per modality")
                files[path.stem] = str(path)
    return {"files": files, "summary": summary, "non_finite": summary["non_finite"]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmark-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", required=True, help="the protocol's output folder (report written there)")
    parser.add_argument("--tracking-uri", help="read the cells from these MLflow runs instead of out-dir/cells")
    parser.add_argument("--benchmark-id", help="with --tracking-uri: the benchmark_id tag of the runs")
    parser.add_argument("--first", default="dex")
    parser.add_argument("--second", default="dense")
    args = parser.parse_args(argv)
    cells = None
    if args.tracking_uri:
        if not args.benchmark_id:
            parser.error("--tracking-uri needs --benchmark-id")
        cells = records_from_mlflow(args.tracking_uri, args.benchmark_id)
        if not cells:
            print(f"no runs tagged benchmark_id={args.benchmark_id} in {args.tracking_uri}")
            return 2
    result = write_report(Path(args.out_dir), args.first, args.second, cells=cells)
    print(Path(result["files"]["markdown"]).read_text())
    print(json.dumps(result["files"], indent=1))
    return 1 if result["non_finite"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
