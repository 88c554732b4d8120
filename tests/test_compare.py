"""Tests of dex_monai.compare against real MLflow runs in a temporary SQLite store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dex_monai.analysis import expert_usage, expert_usage_to_json, plot_modality_expert_heatmaps
from dex_monai.compare import (
    COMPARED_RUN_IDS_TAG,
    COMPARISON_TAG,
    ComparisonError,
    compare_runs,
    main,
    resolve_tracking_uri,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

LOSSES = {
    "dex-mae": [1.0, 0.7, 0.5, 0.55],  # last 0.55, min 0.5
    "mae-dense": [1.1, 0.9, 0.8],
    "dex-finetune": [0.9, 0.6],
}


def _is_png(path: Path) -> bool:
    return Path(path).is_file() and Path(path).read_bytes()[:8] == PNG_SIGNATURE


def _log_routing(client, run_id: str, epoch: int, shift: int, tmp: Path) -> None:
    """Logs routing/expert_usage_epoch_<epoch>.json and .png as the pre-training bundle does."""
    rng = np.random.default_rng(epoch)
    mods = np.array(["CT", "MR", "XR"])[rng.integers(0, 3, 60)]
    codes = np.unique(mods, return_inverse=True)[1]
    idx = ((codes * 2 + shift)[:, None, None] + np.arange(2)) % 8
    idx = np.repeat(idx, 3, axis=1)  # [N, L=3, K=2]
    usage = expert_usage(idx, mods, num_experts=8)
    folder = tmp / f"{run_id}-{epoch}"
    folder.mkdir(parents=True)
    (folder / f"expert_usage_epoch_{epoch}.json").write_text(json.dumps(expert_usage_to_json(usage, 8)))
    plot_modality_expert_heatmaps(usage, folder / f"expert_usage_epoch_{epoch}.png", title=f"epoch {epoch}")
    client.log_artifact(run_id, str(folder / f"expert_usage_epoch_{epoch}.json"), "routing")
    client.log_artifact(run_id, str(folder / f"expert_usage_epoch_{epoch}.png"), "routing")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module: two pre-training runs and one fine-tuning run."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag
    from monai.utils import path_to_sqlite_uri

    root = tmp_path_factory.mktemp("mlflow")
    db = root / "eval" / "mlruns.db"
    db.parent.mkdir()
    uri = path_to_sqlite_uri(db)
    client = mlflow.MlflowClient(tracking_uri=uri)
    artifacts = (root / "eval" / "mlruns").as_uri()
    pre = client.create_experiment("dex-pretrain", artifact_location=artifacts)
    fine = client.create_experiment("dex-finetune", artifact_location=artifacts)
    specs = {
        "dex-mae": (pre, {"lr": "0.001", "num_experts": "8", "seed": "0"}, {"stage": "pretrain"}),
        "mae-dense": (pre, {"lr": "0.001", "num_experts": "1", "seed": "0", "dense": "True"}, {"stage": "pretrain"}),
        "dex-finetune": (fine, {"lr": "0.0001", "num_experts": "8", "seed": "0"}, {"stage": "finetune"}),
    }
    ids = {}
    for name, (exp, params, tags) in specs.items():
        run_id = client.create_run(exp, run_name=name, tags=tags).info.run_id
        ts = 1_700_000_000_000
        metrics = [Metric("total_loss", v, ts + s, s) for s, v in enumerate(LOSSES[name])]
        metrics += [Metric("val_accuracy", 0.5 + 0.1 * s, ts + s, s) for s in range(len(LOSSES[name]))]
        params = [Param(k, v) for k, v in params.items()]
        client.log_batch(run_id, metrics=metrics, params=params, tags=[RunTag("x", "y")])
        ids[name] = run_id
    _log_routing(client, ids["dex-mae"], 1, 0, root / "tmp")
    _log_routing(client, ids["dex-mae"], 2, 1, root / "tmp")  # latest: experts shifted by one
    _log_routing(client, ids["dex-finetune"], 3, 0, root / "tmp")
    for run_id in ids.values():
        client.set_terminated(run_id)
    return {"uri": uri, "root": root, "db": db, "client": client, "ids": ids}


def test_compare_by_experiment_python_api(store, tmp_path):
    ids, client = store["ids"], store["client"]
    result = compare_runs(experiments=["dex-pretrain"], tracking_uri=store["uri"], out_dir=tmp_path / "out")
    assert result.run_ids == [ids["dex-mae"], ids["mae-dense"]]
    assert result.labels == ["dex-mae", "mae-dense"]

    params, metrics = result.tables["params"], result.tables["metrics"]
    assert set(params.index) == {"num_experts", "dense"}  # lr and seed are equal
    assert params.loc["num_experts", "dex-mae"] == "8" and params.loc["dense", "dex-mae"] is None
    assert metrics.loc["total_loss", "dex-mae"] == pytest.approx(LOSSES["dex-mae"][-1])
    assert metrics.loc["total_loss", "mae-dense"] == pytest.approx(LOSSES["mae-dense"][-1])
    assert metrics.loc["total_loss (min)", "dex-mae"] == pytest.approx(0.5)
    assert metrics.loc["val_accuracy", "dex-mae"] == pytest.approx(0.8)
    assert result.runs_without_routing == ["mae-dense"]

    # console text and markdown
    for text in (result.text, result.files["markdown"].read_text()):
        assert ids["dex-mae"] in text and ids["mae-dense"] in text
        assert "num_experts" in text and "seed" not in text
        assert "0.55" in text
    assert "runs without routing statistics: mae-dense" in result.files["markdown"].read_text()

    # CSV: one row per run
    import pandas as pd

    csv = pd.read_csv(result.files["csv"])
    assert list(csv["run_id"]) == result.run_ids
    assert list(csv["metrics.total_loss"]) == pytest.approx([0.55, 0.8])
    assert list(csv["metrics.total_loss.min"]) == pytest.approx([0.5, 0.8])
    assert "params.num_experts" in csv.columns and "params.seed" not in csv.columns

    # figures
    for key in ("loss_curves", "final_metrics", "expert_usage", "run_heatmap:dex-mae"):
        assert _is_png(result.files[key]), key
    assert result.files["run_heatmap:dex-mae"].name == "dex-mae_epoch_2.png"
    selection = json.loads(result.files["selection"].read_text())
    assert [r["routing_epoch"] for r in selection["runs"]] == [2, None]

    # the comparison run in the store
    run = client.get_run(result.comparison_run_id)
    assert client.get_experiment(run.info.experiment_id).name == "dex-comparisons"
    assert run.data.tags[COMPARED_RUN_IDS_TAG] == f"{ids['dex-mae']},{ids['mae-dense']}"
    assert run.data.tags[COMPARISON_TAG] == "true"
    assert run.info.status == "FINISHED"
    top = {f.path for f in client.list_artifacts(result.comparison_run_id)}
    assert {"comparison.md", "comparison.csv", "loss_curves.png", "final_metrics.png", "expert_usage_by_run.png"} <= top
    nested = {f.path for f in client.list_artifacts(result.comparison_run_id, "run_heatmaps")}
    assert nested == {"run_heatmaps/dex-mae_epoch_2.png"}
    # artifacts stay next to the database, as MONAI's MLFlowHandler keeps them
    assert run.info.artifact_uri.startswith((store["root"] / "eval" / "mlruns").as_uri())


def test_compare_by_tags_and_run_ids(store, tmp_path):
    ids = store["ids"]
    result = compare_runs(
        tags=["stage=pretrain"], run_ids=[ids["dex-finetune"]], tracking_uri=store["db"],  # plain .db path
        out_dir=tmp_path, all_params=True, log_comparison=False,
    )
    assert result.run_ids == [ids["dex-finetune"], ids["dex-mae"], ids["mae-dense"]]
    assert result.comparison_run_id is None
    assert {"lr", "seed", "num_experts", "dense"} == set(result.tables["params"].index)
    assert result.runs_without_routing == ["mae-dense"]
    # earlier comparison runs are skipped by searches unless asked for
    compare_runs(run_ids=[ids["dex-mae"]], tracking_uri=store["uri"], out_dir=tmp_path / "c", run_name="cmp-x")
    with pytest.raises(ComparisonError, match="no runs matched"):
        compare_runs(tags={COMPARISON_TAG: "true"}, tracking_uri=store["uri"], out_dir=tmp_path / "d")
    found = compare_runs(
        tags={COMPARISON_TAG: "true"}, tracking_uri=store["uri"], out_dir=tmp_path / "d",
        include_comparisons=True, log_comparison=False,
    )
    assert "cmp-x" in found.labels


def test_command_line_subprocess(store, tmp_path):
    """``python -m dex_monai.compare`` from the store's folder finds ./eval/mlruns.db by default."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "dex_monai.compare", "--experiment", "dex-pretrain", "--experiment", "dex-finetune",
         "--tag", "x=y", "--out", str(out), "--run-name", "cli-comparison"],
        cwd=store["root"], env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    ids = store["ids"]
    for name, run_id in ids.items():
        assert name in proc.stdout and run_id in proc.stdout
    assert "lr" in proc.stdout and "num_experts" in proc.stdout
    assert "Runs without routing statistics: mae-dense" in proc.stdout
    assert all(_is_png(out / f) for f in ("loss_curves.png", "final_metrics.png", "expert_usage_by_run.png"))
    comparison_id = proc.stdout.split("Comparison run: ")[1].split()[0]
    run = store["client"].get_run(comparison_id)
    assert run.info.run_name == "cli-comparison"
    assert set(run.data.tags[COMPARED_RUN_IDS_TAG].split(",")) == set(ids.values())


def test_command_line_errors(store, tmp_path, capsys, monkeypatch):
    uri = store["uri"]
    assert main(["--experiment", "no-such-exp", "--tracking-uri", uri, "--out", str(tmp_path), "--no-log"]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'no-such-exp'" in err and uri in err and "dex-pretrain" in err

    assert main(["--tag", "stage=nothing", "--tracking-uri", uri, "--out", str(tmp_path), "--no-log"]) == 2
    err = capsys.readouterr().err
    assert "no runs matched" in err and uri in err

    missing = tmp_path / "nowhere" / "mlruns.db"
    assert main(["-e", "x", "--tracking-uri", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err

    with pytest.raises(ComparisonError, match="not found"):
        compare_runs(run_ids=["0" * 32], tracking_uri=uri, out_dir=tmp_path)
    with pytest.raises(ComparisonError, match="nothing to compare"):
        compare_runs(tracking_uri=uri, out_dir=tmp_path)

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(ComparisonError, match="cannot reach the MLflow tracking store http://127.0.0.1:9"):
        compare_runs(experiments=["x"], tracking_uri="http://127.0.0.1:9", out_dir=tmp_path)


def test_resolve_tracking_uri(store, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db, root = store["db"], store["root"]
    assert resolve_tracking_uri(None, cwd=root) == resolve_tracking_uri(db) == store["uri"]
    assert resolve_tracking_uri(db.parent) == store["uri"]  # folder holding mlruns.db
    assert resolve_tracking_uri("http://example.org:5000") == "http://example.org:5000"
    with pytest.raises(ComparisonError, match="file store"):
        resolve_tracking_uri(root.as_uri())
    with pytest.raises(ComparisonError, match="none found"):
        resolve_tracking_uri(None, cwd=tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    assert resolve_tracking_uri(None, cwd=tmp_path) == store["uri"]


def _store_with_experts(root: Path, experts: int) -> str:
    """Two runs logging losses, a task metric, the routing summaries and (as older runs did) one metric per layer x
    expert x modality."""
    import mlflow
    from mlflow.entities import Metric
    from monai.utils import path_to_sqlite_uri

    uri = path_to_sqlite_uri(root / "mlruns.db")
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("dex-pretrain", artifact_location=(root / "mlruns").as_uri())
    for r in range(2):
        run_id = client.create_run(exp, run_name=f"run{r}").info.run_id
        values = {"loss": 1.0 - 0.1 * r, "mae": 0.8, "val_accuracy": 0.5 + 0.1 * r, "lr": 1e-4,
                  "routing/nmi_mean": 0.3, "routing/load_entropy_mean": 0.9, "routing/nmi/layer_0": 0.3}
        for mod in ("CT", "MR", "XR"):
            for layer in range(6):
                for e in range(experts):
                    values[f"expert_usage/{mod}/layer_{layer}/expert_{e}"] = 1.0 / experts
        client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in values.items()])
        client.set_terminated(run_id)
    return uri


def test_final_metrics_figure_and_table_do_not_grow_with_experts(tmp_path):
    from PIL import Image

    sizes, texts = [], []
    for experts in (2, 8):
        uri = _store_with_experts(tmp_path / f"e{experts}", experts)
        result = compare_runs(experiments=["dex-pretrain"], tracking_uri=uri, out_dir=tmp_path / f"out{experts}")
        with Image.open(result.files["final_metrics"]) as image:
            sizes.append(image.size)
        metrics = result.tables["metrics"]
        assert list(metrics.index) == ["loss", "loss (min)", "mae", "val_accuracy", "routing/load_entropy_mean",
                                       "routing/nmi_mean"]
        assert "expert_usage/" not in result.text and "lr" not in metrics.index
        import pandas as pd

        csv = pd.read_csv(result.files["csv"])  # every key stays in the CSV
        assert f"metrics.expert_usage/CT/layer_5/expert_{experts - 1}" in csv.columns and "metrics.lr" in csv.columns
        texts.append(result.text)
    assert sizes[0] == sizes[1] == (1500, 550)
    assert texts[0].split("Final metrics", 1)[1] == texts[1].split("Final metrics", 1)[1]
