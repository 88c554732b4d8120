#!/usr/bin/env python
"""Transfer benchmark, multi-seed protocol: pre-train DEX and a dense MAE of the same width and depth on the same
multi-modality data (same steps; once per seed), then on every downstream task, label regime (all / few) and
evaluation (full fine-tuning / frozen-encoder probe) train each initialisation (and scratch) with the shipped engines;
report the mean and 95 % interval per cell, the paired difference DEX - dense over tasks x seeds with the Wilcoxon
test, and the collapse diagnostics (NMI per layer, expert-by-modality heatmaps, effective rank, CKA with modality).

Resumable: rerun the same command and the finished cells (``<out-dir>/cells/*.json``) and pre-trainings are reused.
Every cell is an MLflow run (default store ``<out-dir>/mlruns.db``) tagged with the run's ``benchmark_id``; the report
(``protocol_report.md``, ``paired_difference.png``) is written at the end and can be re-rendered with
``python -m dex_monai.compare benchmark-report --out-dir <out-dir>``.

Examples::

    python scripts/transfer_benchmark.py --out-dir outputs/transfer_protocol            # default CPU preset
    python scripts/transfer_benchmark.py --seeds 2 --tasks busi_cls em_membrane_seg --pretrain-steps 20 \
        --finetune-steps 5 --probe-steps 5 --max-train 32                               # smoke run
    python scripts/transfer_benchmark.py --preset gpu --out-dir /scratch/protocol_gpu   # ViT-B/16 smoke on a GPU
    python scripts/transfer_benchmark.py --preset gpu --pretrain-steps 20000 --seeds 5  # scaled by flags
    python scripts/transfer_benchmark.py --single-run --tasks mixed_seg2d --inits dex_umd m4oe --gm-coord  # one seed
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dex_monai.benchmark.presets import PRESETS, ProtocolConfig, preset_values  # noqa: E402
from dex_monai.benchmark.transfer import INITS, TASKS  # noqa: E402


def _parser(preset: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                        help="default sizes: cpu (2 cores) or gpu (ViT-B/16, the paper's recipe); flags override")
    parser.add_argument("--single-run", action="store_true",
                        help="the earlier one-seed run (fine-tuning only, no intervals): run_transfer_benchmark")
    defaults = ProtocolConfig(**preset_values(preset))
    for f in dataclasses.fields(ProtocolConfig):
        if f.name == "extra_pretrain_options":
            continue
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if isinstance(value, (tuple, list)):
            choices = {"tasks": sorted(TASKS), "inits": sorted(INITS), "regimes": ["all", "few"],
                       "evaluations": ["finetune", "probe"]}.get(f.name)
            parser.add_argument(flag, nargs="+", default=list(value), choices=choices)
        elif isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif value is None:
            parser.add_argument(flag, default=None, help="MLflow tracking URI ('none' disables tracking)")
        else:
            parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument("--pretrain-option", action="append", default=[], metavar="KEY=JSON",
                        help="extra DEXMaskedAutoEncoder argument for every pre-training, e.g. alignment=\"cosine\"")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[ProtocolConfig, argparse.Namespace]:
    """The protocol's configuration: the preset's values, overridden by the flags given."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    preset = pre.parse_known_args(argv)[0].preset
    parser = _parser(preset)
    args = parser.parse_args(argv)
    for name, value in ProtocolConfig.non_positive(vars(args)):  # refused before any work or output
        parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    names = [f.name for f in dataclasses.fields(ProtocolConfig) if f.name != "extra_pretrain_options"]
    extra = {}
    for item in args.pretrain_option:
        key, _, raw = item.partition("=")
        extra[key] = json.loads(raw)
    return ProtocolConfig(**{n: getattr(args, n) for n in names}, extra_pretrain_options=extra), args


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    if args.single_run:
        from dex_monai.benchmark.transfer import BenchmarkConfig, run_transfer_benchmark

        base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(BenchmarkConfig)}
        result = run_transfer_benchmark(BenchmarkConfig(**base))
        print(Path(result["files"]["markdown"]).read_text())
        return 0
    from dex_monai.benchmark.protocol import run_protocol

    result = run_protocol(cfg)
    print(Path(result["report"]["files"]["markdown"]).read_text())
    print(f"files: {json.dumps(result['report']['files'], indent=1)}")
    if "tracking_uri" in result:
        print(f"MLflow: {result['tracking_uri']} (experiment '{cfg.experiment}', benchmark_id {result['benchmark_id']})")
        print(f"report again: python -m dex_monai.compare benchmark-report --out-dir {cfg.out_dir}")
    return 1 if result["report"]["non_finite"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
