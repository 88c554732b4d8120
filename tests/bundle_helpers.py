"""Helpers shared by the fine-tuning bundle tests: run a bundle, read its MLflow store, fingerprint folders."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bundle_args(overrides: dict) -> list[str]:
    """``{"key": value}`` -> ``["--key", "value", ...]`` (lists and dicts as JSON)."""
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, (list, dict)) else str(value)]
    return args


def run_bundle(configs: list[str], overrides: dict, configs_dir: Path, timeout: int = 600,
               expect_exit: int = 0, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` from inside the bundle (``bundle_root`` is ``.``, as in the model zoo; ``cwd``
    to run elsewhere) with the bundle's metadata and logging config; the exit status must be ``expect_exit``."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "2")
    config_file = configs[0] if len(configs) == 1 else "[" + ",".join(f"'{c}'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_file,
           "--meta_file", str(configs_dir / "metadata.json"), "--logging_file", str(configs_dir / "logging.conf")]
    proc = subprocess.run(cmd + bundle_args(overrides), cwd=str(cwd or configs_dir.parent), env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect_exit, f"exit {proc.returncode}\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    return proc


def mlflow_runs(db: Path, experiment: str) -> tuple:
    """The MLflow client of an SQLite store and the experiment's runs by name."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment} in {db}"
    return client, {r.info.run_name: r for r in client.search_runs([found.experiment_id])}


def list_artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    """Every artifact path of a run, recursively."""
    found = []
    for item in client.list_artifacts(run_id, path):
        found += list_artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def folder_digest(folder: Path) -> dict[str, str]:
    """MD5 of every file under ``folder`` (to show inputs were left untouched)."""
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def export_and_compare(root: Path, configs_dir: Path, overrides: dict, input_shape: list[int], batch: int,
                       tolerance: float) -> None:
    """``root/models/model.pt`` exported with ``torch.export`` (``dex_monai.export``, ``model.pt2``) and to ONNX
    (``monai.bundle onnx_export``, ``model.onnx``, run by onnxruntime): both must give the checkpoint's output on
    batches of 1 and ``batch`` images (the batch dimension is dynamic), without a deprecation warning."""
    import warnings

    import onnxruntime
    import torch
    from monai.bundle import ConfigParser, onnx_export

    from dex_monai.export import bundle_export, load_exported

    common = dict(net_id="network_def", ckpt_file=str(root / "models" / "model.pt"),
                  meta_file=str(configs_dir / "metadata.json"), config_file=str(configs_dir / "train.json"),
                  input_shape=[2, *input_shape[1:]], bundle_root=str(root), **overrides)
    onnx_path = root / "models" / "model.onnx"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        bundle_export(filepath=str(root / "models" / "model.pt2"), **common)
        exported, _ = load_exported(root / "models" / "model.pt2")
        onnx_export(filepath=str(onnx_path), use_trace=True, converter_kwargs={
            "input_names": ["image"], "output_names": ["pred"], "dynamic_shapes": [{0: "batch"}], "dynamo": True},
            **common)
    deprecations = [str(w.message) for w in record if issubclass(w.category, (DeprecationWarning, FutureWarning))
                    and "LeafSpec" not in str(w.message)]  # LeafSpec: raised inside torch's own ONNX exporter
    assert deprecations == []
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    parser = ConfigParser()
    parser.read_config(str(configs_dir / "train.json"))
    parser.update({"bundle_root": str(root), **overrides})
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    net.eval()
    for size in (1, batch):
        x = torch.rand(size, *input_shape[1:])
        with torch.no_grad():
            expected = net(x)
            torch.testing.assert_close(exported(x), expected, atol=tolerance, rtol=tolerance)
        got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
        torch.testing.assert_close(got, expected, atol=max(tolerance, 1e-4), rtol=max(tolerance, 1e-4))


def read_failures(output_dir: Path) -> dict[str, tuple[str, str]]:
    """``{file name: (stage, reason)}`` of ``<output_dir>/failed.csv``."""
    import csv

    with open(output_dir / "failed.csv", newline="") as f:
        return {Path(r["path"]).name: (r["stage"], r["reason"]) for r in csv.DictReader(f)}


def files_under(folder: Path) -> set[str]:
    """Every file under ``folder``, relative."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def assert_training_records(client, run, bundle: str, contexts: tuple[str, ...] = ("training", "validation")) -> None:
    """A training run's MLflow records beyond metrics: one dataset input per context with a profile, one logged model
    registered under the bundle's name from this run, and the model-training experiment tag."""
    import json as _json

    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == sorted(contexts), inputs
    for context, dataset in inputs.items():
        profile = _json.loads(dataset.profile)
        assert dataset.name == f"{bundle}_{context}" and profile["num_items"] == sum(
            profile["items_per_modality"].values()) > 0
    (output,) = run.outputs.model_outputs
    assert client.get_logged_model(output.model_id).source_run_id == run.info.run_id
    versions = client.search_model_versions(f"name='{bundle}'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    tags = client.get_experiment(run.info.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
