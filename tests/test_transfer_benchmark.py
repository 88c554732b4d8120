"""A tiny transfer benchmark on the real shared images, then the MLflow comparison of the runs it made."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_transfer_benchmark_and_comparison(shared_data, tmp_path):
    from dex_monai.benchmark import BenchmarkConfig, run_transfer_benchmark
    from dex_monai.compare import compare_runs

    out_dir = tmp_path / "bench"
    cfg = BenchmarkConfig(
        data_root=str(shared_data), out_dir=str(out_dir), img_size=32, volume_size=16, patch_size=8,
        hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4, num_experts=3, top_k=2, decoder_hidden_size=24,
        pretrain_steps=4, pretrain_batch=8, pretrain_images_per_modality=12, finetune_steps=2, finetune_batch=4,
        max_train=8, max_eval=12, probe_images_per_modality=8,
    )
    result = run_transfer_benchmark(cfg)
    table = result["table"]
    assert set(table) == {"busi_cls", "pneumonia_cls", "em_membrane_seg", "hippocampus_seg3d"}
    assert all(set(row) == {"dex", "dense", "none"} for row in table.values())
    # every cell a real score: a NaN (a task that produced no metric) fails the benchmark test
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for row in table.values() for v in row.values()), table
    markdown = (out_dir / "transfer_table.md").read_text()
    assert "| **mean** |" in markdown and "hippocampus_seg3d" in markdown
    csv_rows = (out_dir / "transfer_table.csv").read_text().strip().splitlines()
    assert csv_rows[0] == "task,metric,dex,dense,none" and csv_rows[-1].startswith("mean,")
    dex_mod = result["modularity"]["dex"]
    assert len(dex_mod["nmi_per_layer"]) == 2 and all(0.0 <= v <= 1.0 + 1e-9 for v in dex_mod["nmi_per_layer"])
    assert set(result["modularity"]) == {"dex", "dense", "none"}
    assert (out_dir / "modularity_dex_expert_usage.png").stat().st_size > 1000

    # the comparison reads the real runs back from the store
    comparison = compare_runs(
        tags={"benchmark_id": result["benchmark_id"], "stage": "finetune"},
        tracking_uri=result["tracking_uri"],
        out_dir=tmp_path / "comparison",
    )
    assert len(comparison.run_ids) == 4 * 3
    metrics = comparison.tables["metrics"]
    runs = comparison.tables["runs"]
    for label in metrics.columns:
        name = runs.loc[label, "run_name"]
        task, init = name.rsplit("-", 1)
        expected = table[task][init]
        value = metrics.loc["score", label]
        assert (math.isnan(expected) and np.isnan(value)) or value == pytest.approx(expected, rel=1e-6)
    assert (tmp_path / "comparison" / "comparison.md").is_file()
    assert comparison.comparison_run_id is not None


def test_cli_rejects_unknown_task():
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "transfer_benchmark.py"), "--tasks", "no_such_task"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0 and "invalid choice" in proc.stderr


@pytest.mark.slow
def test_benchmark_accepts_related_system_options(shared_data, tmp_path):
    from dex_monai.benchmark import BenchmarkConfig, run_transfer_benchmark

    cfg = BenchmarkConfig(
        data_root=str(shared_data), out_dir=str(tmp_path), tracking_uri="none", tasks=("mixed_seg2d",),
        inits=("dex_umd", "m4oe"), gm_coord=True, img_size=32, patch_size=8, hidden_size=48, mlp_dim=96,
        num_layers=2, num_heads=4, num_experts=3, decoder_hidden_size=24, pretrain_steps=3, pretrain_batch=6,
        pretrain_images_per_modality=8, finetune_steps=3, finetune_batch=6, max_train=8, max_eval=8,
        probe_images_per_modality=6,
    )
    result = run_transfer_benchmark(cfg)
    details = result["details"]["mixed_seg2d"]
    for init in ("dex_umd", "m4oe"):
        coefficients = {k: v for k, v in details[init].items() if k.startswith("gm_coef_")}
        assert set(coefficients) == {"gm_coef_MR", "gm_coef_pathology"}
        assert all(0.0 < v <= 1.0 for v in coefficients.values())
    assert "nmi_per_layer" in result["modularity"]["dex_umd"] and "nmi_per_layer" not in result["modularity"]["m4oe"]
