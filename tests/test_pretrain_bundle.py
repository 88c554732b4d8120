# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""
End-to-end tests of ``bundles/dex_pretrain`` through ``python -m monai.bundle`` on a tiny configuration:
metadata verification, a 2-epoch run tracked in MLflow, resume after ``kill -9``, and a 2-process DDP run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "dex_pretrain"
SCHEMA = REPO / "bundles" / "schemas" / "meta_schema_20240725.json"

# a tiny DEX MAE and a 5-iteration epoch (20 samples, batch 4)
TINY = {
    "epochs": 2,
    "img_size": 32,
    "batch_size": 4,
    "samples_per_epoch": 20,
    "num_workers": 0,
    "synthetic_n_per_modality": 1,
    "synthetic_size": 32,
    "save_interval": 2,
    "log_interval": 1,
    "progress_bar": False,
    "network_def#hidden_size": 48,
    "network_def#mlp_dim": 96,
    "network_def#num_layers": 2,
    "network_def#num_heads": 4,
    "network_def#num_experts": 4,
    "network_def#top_k": 2,
    "network_def#decoder_hidden_size": 32,
    "network_def#decoder_mlp_dim": 64,
    "network_def#decoder_num_layers": 1,
    "network_def#decoder_num_heads": 4,
}
ITERATIONS = 10
STEP_SCALARS = ("loss", "mae", "alignment", "balance", "lr", "gema_momentum", "noise_std", "lambda_bal", "skipped_steps")

pytestmark = pytest.mark.slow


def _args(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    return args


def _env() -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=str(cwd), env=_env(), capture_output=True, text=True, timeout=timeout)


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    """Generated multi-modality set and slice cache shared by the runs of this module."""
    root = tmp_path_factory.mktemp("dex_data")
    return {"dataset_dir": str(root / "data"), "slice_cache_dir": str(root / "cache")}


def _mlflow_run(db: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("dex_pretrain")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    return client, runs


def _artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def test_verify_metadata(tmp_path):
    from monai.bundle import verify_metadata

    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert meta["schema"].rsplit("/", 1)[-1] == SCHEMA.name  # the local copy is the schema named in the metadata
    verify_metadata(meta_file=str(BUNDLE / "configs" / "metadata.json"), filepath=str(SCHEMA))


def test_train_two_epochs_with_mlflow(tmp_path, data_dirs):
    """Run from inside a copy of the bundle with MONAI's ``--tracking mlflow``; check the SQLite store."""
    bundle = tmp_path / "dex_pretrain"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json", "--tracking", "mlflow"]
    proc = _run(cmd + _args({**TINY, **data_dirs}), cwd=bundle)
    _check(proc)

    client, runs = _mlflow_run(bundle / "eval" / "mlruns.db")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("pretrain_")
    for name in STEP_SCALARS:
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == list(range(1, ITERATIONS + 1)), name
        assert all(math.isfinite(m.value) for m in history), name
    metrics = run.data.metrics
    routing = {k for k in metrics if k.startswith("routing/")}  # summaries; per-expert detail in the artifacts
    assert routing == {f"routing/{kind}/layer_{layer}" for kind in ("nmi", "load_entropy") for layer in range(2)} | {
        "routing/nmi_mean", "routing/load_entropy_mean"}
    assert all(0.0 <= metrics[k] <= 1.0 for k in routing)
    assert not [k for k in metrics if "expert" in k]
    assert run.data.params["epochs"] == "2" and run.data.params["network_def.hidden_size"] == "48"
    from bundle_helpers import assert_training_records

    assert_training_records(client, run, "dex_pretrain", contexts=("training",))

    artifacts = _artifacts(client, run.info.run_id)
    for epoch in (1, 2):
        assert f"routing/expert_usage_epoch_{epoch}.png" in artifacts
        assert f"routing/expert_usage_epoch_{epoch}.json" in artifacts
    assert "config/config.json" in artifacts and "config/resolved_config.json" in artifacts
    assert any(a.startswith("config_") and a.endswith(".json") for a in artifacts)  # MONAI's --tracking record
    local = Path(client.download_artifacts(run.info.run_id, "routing/expert_usage_epoch_2.json", str(tmp_path)))
    record = json.loads(local.read_text())
    assert record["layers"] == 2 and record["num_experts"] == [4, 4]
    assert [len(row) for row in record["expert_load"]] == [4, 4] and all(map(math.isfinite, sum(record["expert_load"], [])))
    assert record["summary"]["routing/nmi_mean"] == pytest.approx(metrics["routing/nmi_mean"])
    for rows in record["usage"].values():
        assert all(abs(sum(row) - 1.0) < 1e-6 for row in rows)
    config = json.loads(Path(client.download_artifacts(run.info.run_id, "config/config.json", str(tmp_path))).read_text())
    assert config["network_def"]["hidden_size"] == 48

    weights = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert any(k.startswith("encoder.") for k in weights["model"])
    last = torch.load(bundle / "models" / f"checkpoint_{ITERATIONS}.pt", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "routing", "trainer"} <= set(last)
    assert last["trainer"]["iteration"] == ITERATIONS and last["trainer"]["skipped_steps"] == 0


def test_resume_after_kill(tmp_path, data_dirs):
    """SIGKILL during epoch 2 (after iteration 7, last checkpoint at 6), then ``--resume`` from the repo root."""
    out = {"ckpt_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "eval")}
    kill = tmp_path / "kill.json"
    kill.write_text(
        json.dumps(
            {
                "run": [
                    "$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED(once=7), "
                    "lambda engine: os.kill(os.getpid(), 9))",
                    "$@train#trainer.run()",
                ]
            }
        )
    )
    base = [sys.executable, "-m", "monai.bundle", "run"]
    configs = f"['{BUNDLE / 'configs' / 'train.json'}','{kill}']"
    proc = _run(base + ["--config_file", configs, "--meta_file", str(BUNDLE / "configs" / "metadata.json")]
                + _args({**TINY, **data_dirs, **out}), cwd=REPO)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    assert sorted(int(p.stem.split("_")[1]) for p in (tmp_path / "models").glob("checkpoint_*.pt")) == [5, 6]
    assert not (tmp_path / "models" / "model.pt").exists()

    datalist = {"datalist": str(Path(data_dirs["dataset_dir"]) / "datalist.json")}  # the generated one, explicitly
    proc = _run(base + ["--config_file", "bundles/dex_pretrain/configs/train.json", "--resume"]
                + _args({**TINY, **data_dirs, **out, **datalist}), cwd=REPO)
    _check(proc)
    assert "checkpoint_6.pt at epoch 1, iteration 6" in proc.stdout + proc.stderr
    last = torch.load(tmp_path / "models" / f"checkpoint_{ITERATIONS}.pt", weights_only=True)
    assert last["trainer"]["iteration"] == ITERATIONS and (tmp_path / "models" / "model.pt").exists()

    # the interrupted MLflow run is continued; iterations 7..10 follow the same schedules as before the kill
    from dex_monai.engines import cosine_schedule, warmup_cosine_factor

    client, runs = _mlflow_run(tmp_path / "eval" / "mlruns.db")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert runs[0].data.tags["last_resumed_at_iteration"] == "6"
    noise = client.get_metric_history(run_id, "noise_std")
    assert sorted({m.step for m in noise}) == list(range(1, ITERATIONS + 1))
    for m in noise:
        assert m.value == pytest.approx(cosine_schedule((m.step - 1) / ITERATIONS, 1.0, 0.0), abs=1e-6)
    peak = 1e-4 * TINY["batch_size"] / 512
    for m in client.get_metric_history(run_id, "lr"):
        assert m.value == pytest.approx(peak * warmup_cosine_factor(m.step - 1, 5, ITERATIONS), rel=1e-5)
    step7 = [m.value for m in client.get_metric_history(run_id, "gema_momentum") if m.step == 7]
    assert len(step7) == 2 and step7[0] == pytest.approx(step7[1])  # logged before the kill and after the resume


def _directors_dump(tmp_path: Path) -> Path:
    """A config whose ``finalize`` saves each rank's director weights as ``tmp_path/directors_rank<R>.pt``."""
    dump = tmp_path / "dump.json"
    dump.write_text(
        json.dumps(
            {
                "finalize": [
                    "$torch.save({k: v for k, v in @network_def.state_dict().items() if '.director.' in k}, "
                    f"'{tmp_path}/directors_rank' + str(dist.get_rank()) + '.pt')",
                    "$dist.is_initialized() and dist.destroy_process_group()",
                ]
            }
        )
    )
    return dump


def test_ddp_two_processes(tmp_path, data_dirs):
    """``torchrun --nproc_per_node=2`` (gloo on CPU): completes, only rank 0 writes, directors equal on both ranks."""
    out = {"ckpt_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "eval")}
    configs = "['configs/train.json','configs/multi_gpu_train.json','" + str(_directors_dump(tmp_path)) + "']"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "monai.bundle", "run", "--config_file", configs]
    proc = _run(cmd + _args({**TINY, **data_dirs, **out, "samples_per_epoch": 40}), cwd=BUNDLE)
    _check(proc)

    directors = [torch.load(tmp_path / f"directors_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert directors[0] and set(directors[0]) == set(directors[1])
    for key in directors[0]:
        assert torch.equal(directors[0][key], directors[1][key]), key
    # rank 0 saved the same directors in the final weights
    final = torch.load(tmp_path / "models" / "model.pt", weights_only=True)["model"]
    for key, value in directors[0].items():
        assert torch.equal(final[key], value)
    client, runs = _mlflow_run(tmp_path / "eval" / "mlruns.db")
    assert len(runs) == 1 and runs[0].data.tags["world_size"] == "2"
    assert runs[0].data.params["world_size"] == "2"
    assert len(client.get_metric_history(runs[0].info.run_id, "loss")) == ITERATIONS


def test_multi_node_two_launches(tmp_path, data_dirs):
    """``torchrun --nnodes 2`` simulated on 127.0.0.1: two launches (``--node_rank`` 0 and 1, one process each, gloo)
    pre-train together as one world of 2; both ranks end with the same directors, the ones rank 0 saved."""
    from test_ddp_directors import _free_port

    out = {"ckpt_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "eval"), "epochs": 1}
    configs = "['configs/train.json','configs/multi_gpu_train.json','" + str(_directors_dump(tmp_path)) + "']"
    port = _free_port()
    launches = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}",
               "-m", "monai.bundle", "run", "--config_file", configs]  # fmt: skip
        args = _args({**TINY, **data_dirs, **out, "samples_per_epoch": 40})
        launches.append(subprocess.Popen(cmd + args, cwd=str(BUNDLE), env=_env(), stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True))  # fmt: skip
    for proc in launches:
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"exit {proc.returncode}\n{log[-6000:]}"

    directors = [torch.load(tmp_path / f"directors_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert directors[0] and set(directors[0]) == set(directors[1])
    for key in directors[0]:
        assert torch.equal(directors[0][key], directors[1][key]), key
    client, runs = _mlflow_run(tmp_path / "eval" / "mlruns.db")
    assert len(runs) == 1 and runs[0].data.params["world_size"] == "2"
    assert len(client.get_metric_history(runs[0].info.run_id, "loss")) == 5  # 40 samples / (2 ranks x batch 4)
    final = torch.load(tmp_path / "models" / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(final[k], v) for k, v in directors[0].items())


@pytest.mark.parametrize("option", ["umd", "m4oe"])
def test_related_system_override_configs(tmp_path, data_dirs, option):
    """The UMD (feature reconstruction) and M4oE (modality experts) pre-training options run in the bundle."""
    out = {"ckpt_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "eval"), "epochs": 1}
    configs = f"['{BUNDLE / 'configs' / 'train.json'}','{BUNDLE / 'configs' / f'{option}.json'}']"
    proc = _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", configs]
                + _args({**TINY, **data_dirs, **out}), cwd=REPO)
    _check(proc)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'eval' / 'mlruns.db'}")
    experiment = client.get_experiment_by_name(f"dex_pretrain_{option}")
    run = client.search_runs([experiment.experiment_id])[0]
    feature = [m.value for m in client.get_metric_history(run.info.run_id, "feature")]
    assert feature and all(math.isfinite(v) for v in feature)
    assert (all(v > 0 for v in feature) if option == "umd" else all(v == 0 for v in feature))
    weights = torch.load(tmp_path / "models" / "model.pt", weights_only=True)["model"]
    if option == "umd":
        assert any(k.startswith("teacher.") for k in weights) and "feature_pred.weight" in weights
    else:
        # expert stage: every modality trained its own expert, so each modality used exactly one expert per layer
        local = Path(client.download_artifacts(run.info.run_id, "routing/expert_usage_epoch_1.json", str(tmp_path)))
        record = json.loads(local.read_text())
        for modality, rows in record["usage"].items():
            for row in rows:
                assert max(row) == pytest.approx(1.0), modality
        assert any(".m4oe.experts." in k for k in weights)
