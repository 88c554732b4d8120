"""The multi-seed transfer protocol: statistics against hand-computed values, the diagnostics on constructed features,
and a tiny two-seed run end to end through the command line (pre-training, fine-tuning, probe, statistics, report,
MLflow, restart) that fails on any non-finite score."""

from __future__ import annotations

import json
import math
import time

from pathlib import Path

import numpy as np
import pytest
import torch

from dex_monai.benchmark.stats import check_finite, mean_interval, paired_difference, verdict

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_t_interval_of_one_two_three():
    # mean 2, sample sd 1; for 2 degrees of freedom the t quantile has the closed form (2p - 1) / sqrt(2 p (1 - p))
    p = 0.975
    t = (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    iv = mean_interval([1.0, 2.0, 3.0])
    assert iv.n == 3 and iv.mean == pytest.approx(2.0)
    assert iv.low == pytest.approx(2.0 - t / math.sqrt(3)) and iv.high == pytest.approx(2.0 + t / math.sqrt(3))
    assert iv.low == pytest.approx(-0.4841, abs=1e-4)
    single = mean_interval([0.7])
    assert (single.mean, single.low, single.high, single.n) == (0.7, 0.7, 0.7, 1)


def test_paired_difference_wilcoxon_by_hand():
    # differences +1, -2, +3, +4, +5: ranks 1..5, the negative one has rank 2, so W = min(W+, W-) = 2; exactly the
    # sign patterns with a negative-rank sum <= 2 are {}, {1}, {2}: one-sided p = 3 / 32, two-sided 6 / 32
    b = np.array([0.5, 0.6, 0.4, 0.3, 0.2])
    a = b + np.array([1.0, -2.0, 3.0, 4.0, 5.0]) / 100
    result = paired_difference(a, b)
    assert result.wilcoxon_statistic == pytest.approx(2.0)
    assert result.wilcoxon_p == pytest.approx(6 / 32)
    assert (result.wins, result.losses, result.ties) == (4, 1, 0)
    assert result.interval.mean == pytest.approx(0.022)
    assert "cannot be told apart" in verdict(result)


def test_verdict_wins_loses_and_ties():
    base = np.linspace(0.5, 0.9, 10)
    gains = np.linspace(0.01, 0.05, 10)
    assert verdict(paired_difference(base + gains, base)).startswith("DEX wins")
    assert verdict(paired_difference(base - gains, base)).startswith("DEX loses")
    same = paired_difference(base, base)
    assert math.isnan(same.wilcoxon_p) and same.ties == 10 and "cannot be told apart" in verdict(same)


def test_statistics_reject_non_finite_scores():
    with pytest.raises(ValueError, match=r"position\(s\) \[1\]"):
        mean_interval([0.5, float("nan"), 0.7])
    with pytest.raises(ValueError, match="non-finite"):
        paired_difference([0.5, 0.6], [0.4, float("inf")])
    with pytest.raises(ValueError):
        check_finite([float("nan")])
    from dex_monai.benchmark.report import summarise

    cells = [{"key": f"t__{i}__all__probe__s{s}", "task": "t", "init": i, "regime": "all", "evaluation": "probe",
              "seed": s, "score": v} for (i, s, v) in
             [("dex", 0, 0.6), ("dense", 0, 0.5), ("dex", 1, float("nan")), ("dense", 1, 0.5)]]
    summary = summarise(cells)
    assert summary["non_finite"] == ["t__dex__all__probe__s1"]
    group = summary["groups"]["all|probe"]
    assert group["pairs"] == [(0.6, 0.5)] and group["table"]["t|dex"][1] == 1


def test_few_label_subset_and_cell_store(tmp_path):
    from dex_monai.benchmark.protocol import CellStore, few_label_indices

    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 6)
    idx = few_label_indices(labels, "classification", 4, seed=3)
    assert np.bincount(labels[idx].numpy()).tolist() == [4, 3, 4]
    assert np.array_equal(idx, few_label_indices(labels, "classification", 4, seed=3))
    assert len(few_label_indices(torch.zeros(20, 1, 4, 4), "segmentation", 5, seed=0)) == 5
    store = CellStore(tmp_path / "cells")
    store.save("a__b", {"score": 0.5})
    assert store.has("a__b") and store.load("a__b") == {"score": 0.5}
    assert [p.name for p in (tmp_path / "cells").iterdir()] == ["a__b.json"]  # no temporary file left behind


def test_effective_rank_and_linear_cka():
    from dex_monai.benchmark.diagnostics import effective_rank, linear_cka

    # two orthogonal directions of equal spread: singular values equal, effective rank exactly 2
    x = np.array([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0]])
    assert effective_rank(x) == pytest.approx(2.0)
    assert effective_rank(np.outer(np.arange(5.0), [1.0, 2.0, 3.0])) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    f = rng.normal(size=(50, 8))
    assert linear_cka(f, f) == pytest.approx(1.0)
    assert linear_cka(f, f @ np.linalg.qr(rng.normal(size=(8, 8)))[0] * 3.0) == pytest.approx(1.0)  # rotation, scale
    onehot = np.eye(2)[np.repeat([0, 1], 25)]
    # features = modality indicator alone -> CKA 1; features independent of modality -> close to 0
    assert linear_cka(onehot[:, :1] * 5.0, onehot) == pytest.approx(1.0)
    assert linear_cka(rng.normal(size=(2000, 4)), np.eye(2)[rng.integers(0, 2, 2000)]) < 0.01


@pytest.mark.slow
def test_tiny_two_seed_protocol_end_to_end(shared_data, tmp_path):
    import mlflow

    from dex_monai.benchmark.report import main as report_main
    from dex_monai.benchmark.report import records_from_mlflow
    import importlib.util

    spec = importlib.util.spec_from_file_location("transfer_benchmark_script", REPO_ROOT / "scripts" / "transfer_benchmark.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    main = script.main

    out = tmp_path / "protocol"
    argv = ["--data-root", str(shared_data), "--out-dir", str(out), "--seeds", "2",
            "--tasks", "busi_cls", "hippocampus_seg3d", "--inits", "dex", "dense",
            "--img-size", "32", "--volume-size", "16", "--patch-size", "8", "--hidden-size", "48", "--mlp-dim", "96",
            "--num-layers", "2", "--num-heads", "4", "--num-experts", "3", "--decoder-hidden-size", "24",
            "--pretrain-steps", "4", "--pretrain-batch", "8", "--pretrain-images-per-modality", "10",
            "--finetune-steps", "3", "--finetune-batch", "4", "--probe-steps", "4", "--max-train", "16",
            "--max-eval", "16", "--diagnostic-images-per-modality", "8", "--few-per-class", "3", "--few-images", "3"]
    assert main(argv) == 0  # non-zero when any score is non-finite
    cells = sorted((out / "cells").glob("busi_cls__*.json")) + sorted((out / "cells").glob("hippocampus_seg3d__*.json"))
    assert len(cells) == 2 * 2 * 2 * 2 * 2  # tasks x inits x regimes x evaluations x seeds
    records = [json.loads(p.read_text()) for p in cells]
    scores = [r["score"] for r in records]
    assert all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in scores), scores  # a NaN score fails the benchmark
    few = {r["train_size"] for r in records if r["task"] == "busi_cls" and r["regime"] == "few"}
    assert few == {9}  # 3 per class, 3 classes
    assert {r["train_size"] for r in records if r["task"] == "hippocampus_seg3d" and r["regime"] == "few"} == {3}
    for kind in ("dex", "dense"):
        for seed in (0, 1):
            diag = json.loads((out / "cells" / f"diagnostics__{kind}__s{seed}.json").read_text())
            assert len(diag["cluster_nmi"]) == 2 and 0.0 <= diag["modality_cka"] <= 1.0 + 1e-9
            assert ("routing_nmi" in diag) == (kind == "dex")

    report = json.loads((out / "protocol_report.json").read_text())
    pairs = report["groups"]["all|finetune"]["pairs"]
    assert len(pairs) == 2 * 2  # tasks x seeds
    diffs = [a - b for a, b in pairs]
    assert report["groups"]["all|finetune"]["paired"]["interval"]["mean"] == pytest.approx(np.mean(diffs))
    markdown = (out / "protocol_report.md").read_text()
    assert "cannot be told apart" in markdown or "DEX wins" in markdown or "DEX loses" in markdown
    assert (out / "paired_difference.png").stat().st_size > 10_000
    assert (out / "expert_usage_dex_routing.png").is_file() and (out / "expert_usage_dense_cluster.png").is_file()

    # one MLflow run per cell, grouped by the benchmark id; the report rebuilt from MLflow has the same scores
    benchmark_id = json.loads((out / "protocol.json").read_text())["benchmark_id"]
    from_mlflow = {r["key"]: r["score"] for r in records_from_mlflow(str(out / "mlruns.db"), benchmark_id)}
    assert from_mlflow == pytest.approx({r["key"]: r["score"] for r in records})
    mlflow.set_tracking_uri(None)

    # restart: every cell and pre-training is reused, nothing is retrained
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    start = time.perf_counter()
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == stamps
    assert time.perf_counter() - start < 120
    assert report_main(["--out-dir", str(out)]) == 0
    with pytest.raises(ValueError, match="other settings"):
        main([*argv, "--finetune-steps", "5"])


def test_gpu_preset_parses_and_scales_learning_rates():
    import importlib.util

    from dex_monai.benchmark.protocol import scaled_config

    spec = importlib.util.spec_from_file_location("transfer_benchmark_script", REPO_ROOT / "scripts" / "transfer_benchmark.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cfg, _ = script.parse_args(["--preset", "gpu", "--seeds", "5", "--pretrain-batch", "128"])
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.mlp_dim, cfg.patch_size, cfg.img_size) == (
        768, 12, 12, 3072, 16, 224)  # ViT-B/16
    assert cfg.device == "cuda" and cfg.lambda_bal == 1e-3 and cfg.lambda_bal_decay and cfg.seeds == 5
    seed_cfg = scaled_config(cfg, 7)
    assert seed_cfg.seed == 7 and seed_cfg.pretrain_lr == pytest.approx(1.5e-4 * 128 / 512)  # base_lr x batch / 512
    assert seed_cfg.finetune_lr == pytest.approx(5e-4 * 64 / 512)
    cpu, _ = script.parse_args([])
    assert cpu.hidden_size == 96 and cpu.device == "cpu" and scaled_config(cpu, 0).pretrain_lr == cpu.pretrain_lr


@pytest.mark.parametrize("spatial_dims, kind, expected", [(3, "segmentation", 3), (2, "segmentation", 5),
                                                          (3, "classification", 5)])
def test_finetune_batch_follows_seg3d_batch_only_for_3d_segmentation(monkeypatch, spatial_dims, kind, expected):
    from dex_monai.benchmark import transfer
    from dex_monai.benchmark.config import BenchmarkConfig
    from dex_monai.benchmark.tasks import Task, TaskData

    drawn = []
    real_loader = transfer._loader

    def recording_loader(items, transform, cfg, steps, batch):
        batches = list(real_loader(items, transform, cfg, steps, batch))
        drawn.extend(len(b["image"]) for b in batches)
        return batches

    monkeypatch.setattr(transfer, "_loader", recording_loader)
    size = (16,) * spatial_dims
    x = torch.rand(10, 1, *size)
    y = torch.randint(0, 2, (10, 1, *size)) if kind == "segmentation" else torch.randint(0, 2, (10,))
    data = TaskData(x, y, x[:4], y[:4], 2, spatial_dims, kind, "MR")
    task = Task("toy", "MR", kind, spatial_dims, lambda *a: data, "none")
    cfg = BenchmarkConfig(img_size=16, volume_size=16, patch_size=8, hidden_size=24, mlp_dim=32, num_layers=1,
                          num_heads=2, num_experts=2, top_k=1, finetune_steps=2, finetune_batch=5, seg3d_batch=3)
    metrics = transfer.finetune(task, data, cfg, "none", None, None, {})
    assert drawn == [expected, expected]
    assert np.isfinite(metrics["score"])


@pytest.mark.parametrize("flag", ["--seg3d-batch", "--finetune-batch", "--pretrain-batch", "--seeds", "--finetune-steps"])
def test_cli_refuses_non_positive_sizes_before_any_work(tmp_path, capsys, flag):
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "transfer_benchmark.py"
    spec = importlib.util.spec_from_file_location("transfer_benchmark_cli", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        cli.main([flag, "0", "--out-dir", str(out_dir), "--tracking-uri", "none"])
    assert stop.value.code == 2
    assert f"{flag} must be at least 1, got 0" in capsys.readouterr().err
    assert not out_dir.exists()  # refused before anything was written


def test_mixed_task_loads_under_the_protocol_config(shared_data):
    """The two-modality task resizes its hippocampus part through a copy of the run's own config type."""
    from dex_monai.benchmark.presets import ProtocolConfig
    from dex_monai.benchmark.tasks import TASKS

    cfg = ProtocolConfig(img_size=32, max_train=4, max_eval=4)
    data = TASKS["mixed_seg2d"].loader(shared_data, cfg, np.random.default_rng(0))
    assert data.train_x.shape[-2:] == (32, 32) and data.eval_x.shape[-2:] == (32, 32)
    assert set(data.train_modalities) == {"pathology", "MR"}
