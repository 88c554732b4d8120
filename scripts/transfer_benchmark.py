#!/usr/bin/env python
"""Transfer benchmark: pre-train DEX and a dense MAE on the same multi-modality data (same steps, same seed),
fine-tune them and a from-scratch model on several downstream tasks, and measure emergent modularity.

Prints the table (one row per task, one column per initialisation, the mean at the bottom) and the modularity
figures; writes transfer_table.md/.csv, transfer_result.json and a heatmap to --out-dir; logs every run to MLflow
(default: <out-dir>/mlruns.db). Render any selection of the runs with ``python -m dex_monai.compare``.

Examples::

    python scripts/transfer_benchmark.py                                   # default CPU run (2 cores: < 60 min)
    python scripts/transfer_benchmark.py --pretrain-steps 20 --finetune-steps 5 --max-train 32   # smoke test
    python scripts/transfer_benchmark.py --inits dex dense none dex_umd m4oe --tasks mixed_seg2d busi_cls --gm-coord
    python scripts/transfer_benchmark.py --hidden-size 384 --num-layers 12 --pretrain-steps 20000 --img-size 224 \
        --patch-size 16 --tasks busi_cls pneumonia_cls em_membrane_seg hippocampus_seg3d adrenal_cls3d   # on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dex_monai.benchmark.transfer import INITS, TASKS, BenchmarkConfig, run_transfer_benchmark  # noqa: E402


def parse_args(argv: list[str] | None = None) -> BenchmarkConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = BenchmarkConfig()
    for f in dataclasses.fields(BenchmarkConfig):
        if f.name == "extra_pretrain_options":
            continue
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if isinstance(value, (tuple, list)):
            choices = sorted(TASKS) if f.name == "tasks" else sorted(INITS) if f.name == "inits" else None
            parser.add_argument(flag, nargs="+", default=list(value), choices=choices)
        elif isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif value is None:
            parser.add_argument(flag, default=None, help="MLflow tracking URI ('none' disables tracking)")
        else:
            parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument("--pretrain-option", action="append", default=[], metavar="KEY=JSON",
                        help="extra DEXMaskedAutoEncoder argument for both pre-trainings, e.g. alignment=\"cosine\"")
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(BenchmarkConfig) if f.name != "extra_pretrain_options"}
    extra = {}
    for item in args.pretrain_option:
        key, _, raw = item.partition("=")
        extra[key] = json.loads(raw)
    return BenchmarkConfig(**values, extra_pretrain_options=extra)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    result = run_transfer_benchmark(cfg)
    print(Path(result["files"]["markdown"]).read_text())
    print(f"files: {json.dumps(result['files'], indent=2)}")
    if "tracking_uri" in result:
        print(f"MLflow: {result['tracking_uri']} (experiment '{cfg.experiment}', benchmark_id {result['benchmark_id']})")
        print(f"compare: python -m dex_monai.compare --tracking-uri {result['tracking_uri']} "
              f"--tag benchmark_id={result['benchmark_id']} --out {cfg.out_dir}/comparison")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
