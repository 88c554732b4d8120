# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""
End-to-end tests of ``bundles/dex_classification`` at a tiny size on real breast ultrasound images (BUSI, shared data
folder): one training epoch and an evaluation through ``python -m monai.bundle run`` (accuracy, AUC, per-class
report, MLflow), inference writing a CSV of class probabilities, a 2-process DDP run, a 3D configuration,
initialisation from a DEX pre-training checkpoint through the director, ``verify_metadata``, ``verify_net_in_out``
and the ONNX and torch.export exports.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "dex_classification"
CONFIGS = BUNDLE / "configs"
SCHEMA = REPO / "bundles" / "schemas" / "meta_schema_20240725.json"
CLASSES = ["benign", "malignant", "normal"]

ENCODER = {"hidden_size": 48, "mlp_dim": 96, "num_layers": 2, "num_heads": 2, "num_experts": 4, "top_k": 2}
NETWORK = {"img_side": 32, "patch_size": 16, **ENCODER}
TINY = {**NETWORK, "epochs": 1, "batch_size": 4, "num_workers": 0, "max_per_class": 4, "log_interval": 1}
INPUT_SHAPE = [1, 3, 32, 32]

pytestmark = pytest.mark.slow


from bundle_helpers import export_and_compare  # noqa: E402
from bundle_helpers import bundle_args as _args  # noqa: E402
from bundle_helpers import list_artifacts as _artifacts  # noqa: E402
from bundle_helpers import mlflow_runs as _mlflow_runs  # noqa: E402
from bundle_helpers import run_bundle  # noqa: E402


from bundle_helpers import files_under, folder_digest, read_failures  # noqa: E402


def _run_bundle(configs: list[str], overrides: dict, timeout: int = 600, expect_exit: int = 0) -> subprocess.CompletedProcess:
    return run_bundle(configs, overrides, CONFIGS, timeout, expect_exit)


@pytest.fixture(scope="module")
def busi(shared_data) -> Path:
    root = shared_data / "us" / "busi"
    if not all((root / c).is_dir() for c in CLASSES):
        pytest.fail(f"the shared data folder exists but {root} lacks the class folders {CLASSES}")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, busi) -> dict:
    root = tmp_path_factory.mktemp("classification")
    overrides = {**TINY, "bundle_root": str(root), "dataset_dir": str(busi)}
    proc = _run_bundle([str(CONFIGS / "train.json")], overrides)
    return {"root": root, "log": proc.stdout + proc.stderr, "overrides": overrides}


def test_datalists(busi, tmp_path):
    from dex_monai.data.datalist import classification_datalist

    train = classification_datalist(busi, split="training", max_per_class=5)
    val = classification_datalist(busi, split="validation", max_per_class=5)
    assert len(train) == 12 and len(val) == 3 and sorted(v["label"] for v in val) == [0, 1, 2]
    assert not {t["image"] for t in train} & {v["image"] for v in val}
    # segmentation masks stored next to the images are never taken as images
    (tmp_path / "benign").mkdir()
    (tmp_path / "normal").mkdir()
    for name in ("a.png", "a_mask.png", "b.png", "b_mask_1.png"):
        shutil.copy(busi / "benign" / "benign (1).png", tmp_path / "benign" / name)
    shutil.copy(busi / "normal" / "normal (1).png", tmp_path / "normal" / "n.png")
    items = classification_datalist(tmp_path, split="all")
    assert sorted(Path(i["image"]).name for i in items) == ["a.png", "b.png", "n.png"]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": "benign/a.png", "label": "normal"}],
                                    "validation": [{"image": "normal/n.png", "label": 0}]}))
    items = classification_datalist(tmp_path, datalist, split="training", class_names=["benign", "normal"])
    assert items == [{"image": str(tmp_path / "benign" / "a.png"), "label": 1}]


def test_train_one_epoch(trained):
    root = trained["root"]
    assert "training from scratch" in trained["log"]
    assert (root / "models" / "model.pt").is_file()
    report = json.loads((root / "eval" / "reports" / "val_report_epoch_1.json").read_text())
    assert report["classes"] == CLASSES and report["num_images"] == 3
    assert np.asarray(report["confusion_matrix"]).sum() == 3

    client, runs = _mlflow_runs(root / "eval" / "mlruns.db", "dex_classification")
    (name, run), = runs.items()
    assert name.startswith("classification_train_") and run.info.status == "FINISHED"
    for metric in ("val_accuracy", "val_auc", "train_loss", "val_f1/benign", "val_recall/normal"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1], metric
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 3  # 9 training images, batch 4
    artifacts = _artifacts(client, run.info.run_id)
    assert "reports/val_report_epoch_1.json" in artifacts and "config/config.json" in artifacts


def test_evaluate(trained):
    root = trained["root"]
    _run_bundle([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")], trained["overrides"])
    report = json.loads((root / "eval" / "evaluate_report_epoch_1.json").read_text())
    assert set(report["per_class"]) == set(CLASSES) and 0.0 <= report["accuracy"] <= 1.0
    with open(root / "eval" / "evaluate_probabilities.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    for row in rows:
        assert sum(float(row[f"prob_{c}"]) for c in CLASSES) == pytest.approx(1.0, abs=1e-4)
    client, runs = _mlflow_runs(root / "eval" / "mlruns.db", "dex_classification")
    evaluate = [r for n, r in runs.items() if n.startswith("classification_evaluate_")]
    assert len(evaluate) == 1 and {"val_accuracy", "val_auc"} <= set(evaluate[0].data.metrics)
    artifacts = _artifacts(client, evaluate[0].info.run_id)
    assert "reports/evaluate_report_epoch_1.txt" in artifacts


def test_inference_writes_probabilities(trained, busi, tmp_path):
    inputs = tmp_path / "inputs"
    (inputs / "more").mkdir(parents=True)
    shutil.copy(busi / "benign" / "benign (1).png", inputs / "b1.png")
    shutil.copy(busi / "malignant" / "malignant (1).png", inputs / "more" / "m1.png")
    shutil.copy(busi / "normal" / "normal (1).png", inputs / "more" / "n1.png")
    shutil.copy(busi / "normal" / "normal (1).png", inputs / "more" / "n1_mask.png")
    (inputs / "more" / "broken.png").write_bytes((busi / "normal" / "normal (1).png").read_bytes()[:300])
    (inputs / "notes.txt").write_text("not an image")
    before = folder_digest(inputs)
    output = tmp_path / "out"
    proc = _run_bundle([str(CONFIGS / "inference.json")],
                       {**NETWORK, "bundle_root": str(trained["root"]), "input_dir": str(inputs),
                        "output_dir": str(output), "num_workers": 0}, expect_exit=1)
    assert folder_digest(inputs) == before  # every file, not only the pictures
    assert files_under(output) == {"predictions.csv", "failed.csv"}
    (stage, reason), = read_failures(output).values()
    assert stage == "read" and reason.startswith("truncated") and "broken.png" in proc.stdout + proc.stderr
    with open(output / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(r["image"]).name for r in rows) == ["b1.png", "m1.png", "n1.png"]
    for row in rows:
        probs = [float(row[f"prob_{c}"]) for c in CLASSES]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert row["predicted_class"] == CLASSES[int(np.argmax(probs))] == CLASSES[int(row["predicted_index"])]
    client, runs = _mlflow_runs(trained["root"] / "eval" / "mlruns.db", "dex_classification")
    inference = [r for n, r in runs.items() if n.startswith("classification_inference_")]
    assert len(inference) == 1 and "predictions/predictions.csv" in _artifacts(client, inference[0].info.run_id)
    assert inference[0].info.status == "FAILED" and inference[0].data.metrics["failed_inputs"] == 1


def test_ddp_two_processes(busi, tmp_path):
    """``torchrun --nproc_per_node=2`` (gloo on CPU) with ``multi_gpu_train.json``: trains, validates, rank 0 saves."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    configs = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle",
           "run", "--config_file", configs, "--logging_file", str(CONFIGS / "logging.conf")]
    overrides = {**TINY, "bundle_root": str(tmp_path), "dataset_dir": str(busi), "batch_size": 2}
    proc = subprocess.run(cmd + _args(overrides), cwd=str(REPO), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    assert (tmp_path / "models" / "model.pt").is_file()
    client, runs = _mlflow_runs(tmp_path / "eval" / "mlruns.db", "dex_classification")
    (run,) = runs.values()
    assert run.data.tags["world_size"] == "2" and "val_accuracy" in run.data.metrics


def test_3d_configuration(shared_data):
    """``spatial_dims 3``: the same config classifies volumes (here an MR volume, 1 channel, resized to 32^3)."""
    from monai.bundle import ConfigParser

    volume = shared_data / "mr" / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
    if not volume.is_file():
        pytest.fail(f"{volume} is missing from the shared data folder")
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({**NETWORK, "spatial_dims": 3, "in_channels": 1, "modality": "MR", "hidden_size": 48})
    transform = parser.get_parsed_content("validate#preprocessing")
    item = transform({"image": str(volume), "label": 1})
    assert tuple(item["image"].shape) == (1, 32, 32, 32)
    augmented = parser.get_parsed_content("train#preprocessing")({"image": str(volume), "label": 1})
    assert tuple(augmented["image"].shape) == (1, 32, 32, 32)
    net = parser.get_parsed_content("network_def").eval()
    with torch.no_grad():
        assert net(item["image"][None].as_tensor()).shape == (1, 3)  # the bundles never give the network a MetaTensor


def test_init_from_pretraining_bundle_through_director(tmp_path):
    from monai.bundle import ConfigParser

    from dex_monai.engines.initialise import initialise_network
    from dex_monai.networks import DEXMaskedAutoEncoder

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({"init": "dex", "bundle_root": str(CONFIGS.parent)})  # the default: the sibling pre-training bundle
    assert parser.get_parsed_content("pretrained_checkpoint") == str(REPO / "bundles" / "dex_pretrain" / "models")

    mae = DEXMaskedAutoEncoder(3, 64, 8, spatial_dims=2, decoder_hidden_size=32, decoder_mlp_dim=64,
                               decoder_num_layers=1, decoder_num_heads=2, **ENCODER)
    (tmp_path / "models").mkdir()
    torch.save({"model": mae.state_dict()}, tmp_path / "models" / "model.pt")
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({**NETWORK, "bundle_root": str(tmp_path), "init": "dex", "finetune_mode": "director",
                   "pretrained_checkpoint": str(tmp_path / "models")})
    net = parser.get_parsed_content("network_def")
    report = initialise_network(net, "dex", parser.get_parsed_content("pretrained_checkpoint"))
    assert report.ok and "head.1.weight" in report.newly_initialised
    source = mae.encoder.state_dict()
    for key in ("blocks.1.dex.director.linear2.weight", "blocks.0.dex.experts.linear1_weight",
                "blocks.0.dex.router.gate.weight", "blocks.1.attn.qkv.weight"):
        assert torch.equal(net.encoder.state_dict()[key], source[key]), key
    assert not any(p.requires_grad for p in net.encoder.blocks[0].dex.experts.parameters())  # director mode


def test_verify_metadata():
    from monai.bundle import verify_metadata

    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert list(meta["network_data_format"]["outputs"]["pred"]["channel_def"].values()) == CLASSES
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA))


def test_verify_net_in_out():
    from monai.bundle import verify_net_in_out

    verify_net_in_out(
        net_id="network_def", meta_file=str(CONFIGS / "metadata.json"), config_file=str(CONFIGS / "train.json"),
        device="cpu", **NETWORK, **{"_meta_#network_data_format#inputs#image#spatial_shape": [32, 32]},
    )


def test_ckpt_export_matches_checkpoint(trained):
    export_and_compare(trained["root"], CONFIGS, NETWORK, INPUT_SHAPE, batch=5, tolerance=1e-5)
