# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""
What a training run leaves in MLflow: the datalists as dataset inputs (source, digest, items per modality), the
trained network as a logged and registered MLflow model that reproduces the checkpoint's logits, the experiment's
kind tag, routing as a few summary metrics whose keys do not depend on the number of experts, and a comparison
figure whose size does not either.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bundle_helpers import REPO, mlflow_runs, run_bundle

PRETRAIN = REPO / "bundles" / "dex_pretrain" / "configs"
CLASSIFICATION = REPO / "bundles" / "dex_classification" / "configs"


def _sqlite(path: Path) -> str:
    from monai.utils import path_to_sqlite_uri

    return path_to_sqlite_uri(path)


# -- units -----------------------------------------------------------------------------------------------------------
def test_routing_summary_by_hand_and_independent_of_experts():
    from dex_monai.handlers.routing import routing_summary

    # 2 layers; layer 0: CT only on expert 0, MR only on expert 1 (NMI 1); layer 1: both spread alike (NMI 0)
    counts = {"CT": np.array([[4, 0, 0, 0], [1, 1, 1, 1]]), "MR": np.array([[0, 4, 0, 0], [2, 2, 2, 2]])}
    load = [np.array([0.5, 0.5, 0.0, 0.0]), np.array([0.25] * 4)]
    metrics = routing_summary(load, counts)
    assert metrics["routing/nmi/layer_0"] == pytest.approx(1.0)
    assert metrics["routing/nmi/layer_1"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["routing/load_entropy/layer_0"] == pytest.approx(math.log(2) / math.log(4))  # 2 of 4 experts
    assert metrics["routing/load_entropy/layer_1"] == pytest.approx(1.0)
    assert metrics["routing/nmi_mean"] == pytest.approx(0.5)
    keys = set(metrics)
    for experts in (2, 8):
        other = routing_summary([np.full(experts, 1.0 / experts)] * 2, {m: np.ones((2, experts)) for m in "ABC"})
        assert set(other) == keys


def test_routing_summary_with_tables_of_different_widths():
    """Count tables grow with the highest expert a modality reached (M4oE: one expert per modality), so modalities
    can hold tables of different widths; the NMI is that of the choices: I(modality; expert) / H(modality), the
    mutual information as sklearn computes it from the labels."""
    from scipy.stats import entropy
    from sklearn.metrics import mutual_info_score

    from dex_monai.handlers.routing import routing_summary

    counts = {"CT": np.array([[3, 1]]), "MR": np.array([[0, 1, 4]])}
    modality = ["CT"] * 4 + ["MR"] * 5
    expert = [0, 0, 0, 1] + [1, 2, 2, 2, 2]
    metrics = routing_summary([], counts)
    expected = mutual_info_score(modality, expert) / entropy([4, 5])
    assert metrics["routing/nmi/layer_0"] == pytest.approx(expected)


def test_datalist_inputs_digest_profile_and_no_duplicates(tmp_path):
    import mlflow

    from dex_monai.tracking.inputs import log_datalist_inputs

    items = [{"image": f"/d/{i}.nii.gz", "modality": m} for i, m in enumerate(["CT", "MR", "CT"])]
    client = mlflow.MlflowClient(tracking_uri=_sqlite(tmp_path / "mlruns.db"))
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    datalists = {"training": items, "validation": items[:1]}
    assert len(log_datalist_inputs(client, run_id, datalists, tmp_path, "dex")) == 2
    assert log_datalist_inputs(client, run_id, datalists, tmp_path, "dex") == []  # a resumed run: logged once
    inputs = {i.tags[0].value: i.dataset for i in client.get_run(run_id).inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"} and inputs["training"].name == "dex_training"
    canonical = json.dumps(items, sort_keys=True, separators=(",", ":"))
    assert inputs["training"].digest == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert json.loads(inputs["training"].profile) == {"num_items": 3, "items_per_modality": {"CT": 2, "MR": 1}}
    assert json.loads(inputs["validation"].profile)["items_per_modality"] == {"CT": 1}
    # a bundle's intensity rule is no modality: items without one count as unknown
    from dex_monai.tracking.inputs import items_per_modality

    assert items_per_modality([{"image": "a"}, {"image": "b", "modality": "MR"}], default_modality="range") == {
        "MR": 1, "unknown": 1}
    assert items_per_modality([{"image": "a"}], default_modality="ultrasound") == {"ultrasound": 1}
    assert json.loads(inputs["training"].source) == {"uri": str(tmp_path)}


def test_logged_pretraining_model_returns_the_reconstruction(tmp_path):
    import mlflow

    from dex_monai.networks import DEXMaskedAutoEncoder
    from dex_monai.tracking.models import log_network

    net = DEXMaskedAutoEncoder(in_channels=1, img_size=16, patch_size=8, spatial_dims=2, hidden_size=16, mlp_dim=32,
                               num_layers=1, num_heads=2, num_experts=2, top_k=1, decoder_hidden_size=16,
                               decoder_mlp_dim=32, decoder_num_layers=1, decoder_num_heads=2)
    uri = _sqlite(tmp_path / "mlruns.db")
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("pre", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    info = log_network(net, run_id, uri, [1, 1, 16, 16], registered_model_name="pre")
    assert client.get_logged_model(info.model_id).experiment_id == experiment  # not MLflow's default experiment
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 16, 16]
    assert list(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 16, 16]
    with mlflow.tracking._tracking_service.utils._use_tracking_uri(uri):
        loaded = mlflow.pytorch.load_model("models:/pre/1")
    trained, exported = net.state_dict(), loaded.state_dict()  # a torch.export program (pt2), not a pickle
    assert {k.removeprefix("network.") for k in exported} <= set(trained) and exported
    assert all(torch.equal(v, trained[k.removeprefix("network.")]) for k, v in exported.items())
    assert loaded(torch.rand(2, 1, 16, 16)).shape == (2, 1, 16, 16)
    assert net.training  # the trained network is left as it was


# -- bundle runs -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_classification_run_records_dataset_model_registry_and_kind(tmp_path, shared_data):
    import mlflow
    from monai.bundle import ConfigParser

    from dex_monai.data.datalist import classification_datalist

    busi = shared_data / "us" / "busi"
    overrides = {"img_side": 32, "patch_size": 16, "hidden_size": 48, "mlp_dim": 96, "num_layers": 2, "num_heads": 2,
                 "num_experts": 4, "top_k": 2, "epochs": 1, "batch_size": 4, "num_workers": 0, "max_per_class": 4,
                 "log_interval": 1, "bundle_root": str(tmp_path), "dataset_dir": str(busi)}
    run_bundle([str(CLASSIFICATION / "train.json")], overrides, CLASSIFICATION)
    db = tmp_path / "eval" / "mlruns.db"
    client, runs = mlflow_runs(db, "dex_classification")
    (run,) = runs.values()
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    # datasets: 4 images per class, 1 of each 4 held out -> 9 training and 3 validation items, all ultrasound
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    for context, count in (("training", 9), ("validation", 3)):
        profile = json.loads(inputs[context].profile)
        assert profile == {"num_items": count, "items_per_modality": {"ultrasound": count}}, context
        items = classification_datalist(busi, split=context, max_per_class=4)
        canonical = json.dumps(items, sort_keys=True, separators=(",", ":"), default=str)
        assert inputs[context].digest == hashlib.sha256(canonical.encode()).hexdigest()[:16]
        assert json.loads(inputs[context].source) == {"uri": str(busi)}

    # model: logged into the run, registered under the bundle's name, reproduces the final checkpoint's logits
    (output,) = run.outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert logged.source_run_id == run.info.run_id and logged.experiment_id == experiment.experiment_id
    (version,) = client.search_model_versions("name='dex_classification'")
    assert version.run_id == run.info.run_id
    with mlflow.tracking._tracking_service.utils._use_tracking_uri(_sqlite(db)):
        loaded = mlflow.pytorch.load_model(f"models:/dex_classification/{version.version}")
        example = mlflow.models.Model.load(f"models:/{output.model_id}").load_input_example(
            mlflow.artifacts.download_artifacts(f"models:/{output.model_id}"))
    assert np.asarray(example).shape == (2, 3, 32, 32)  # two images: torch.export would fix a batch of one
    parser = ConfigParser()
    parser.read_config(str(CLASSIFICATION / "train.json"))
    parser.update({k: v for k, v in overrides.items()})
    reference = parser.get_parsed_content("network_def")
    reference.load_state_dict(torch.load(tmp_path / "models" / "model_final.pt", weights_only=True))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference.eval()(images)
        assert torch.allclose(loaded(images), expected, atol=1e-6)  # a pt2 program: any batch size, no pickle
        assert torch.allclose(loaded(images[:1]), expected[:1], atol=1e-6)


def _pretrain_metric_keys(root: Path, experts: int, data: Path) -> tuple[set[str], dict]:
    overrides = {"epochs": 1, "img_size": 32, "batch_size": 4, "samples_per_epoch": 4, "num_workers": 0,
                 "synthetic_n_per_modality": 1, "synthetic_size": 32, "log_interval": 1, "progress_bar": False,
                 "network_def#hidden_size": 32, "network_def#mlp_dim": 64, "network_def#num_layers": 2,
                 "network_def#num_heads": 2, "network_def#num_experts": experts, "network_def#top_k": 1,
                 "network_def#decoder_hidden_size": 16, "network_def#decoder_mlp_dim": 32,
                 "network_def#decoder_num_layers": 1, "network_def#decoder_num_heads": 2,
                 "bundle_root": str(root), "dataset_dir": str(data / "images"), "slice_cache_dir": str(data / "cache")}
    run_bundle([str(PRETRAIN / "train.json")], overrides, PRETRAIN)
    client, runs = mlflow_runs(root / "eval" / "mlruns.db", "dex_pretrain")
    (run,) = runs.values()
    registered = [str(v.version) for v in client.search_model_versions("name='dex_pretrain'")]
    (dataset,) = [i.dataset for i in run.inputs.dataset_inputs]
    return set(run.data.metrics), {"registered": registered, "profile": json.loads(dataset.profile)}


@pytest.mark.slow
def test_pretraining_metric_keys_do_not_depend_on_the_number_of_experts(tmp_path):
    keys2, record = _pretrain_metric_keys(tmp_path / "e2", 2, tmp_path)
    keys4, _ = _pretrain_metric_keys(tmp_path / "e4", 4, tmp_path)
    assert keys2 == keys4 and len(keys4) < 30
    assert {"routing/nmi_mean", "routing/load_entropy_mean", "routing/nmi/layer_1"} <= keys4
    assert not [k for k in keys4 if "expert" in k]
    assert record["registered"] == ["1"]
    # the generated set: one image per modality, ten modalities
    assert record["profile"]["num_items"] == 10 and set(record["profile"]["items_per_modality"].values()) == {1}
