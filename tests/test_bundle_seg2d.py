# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""
End-to-end tests of ``bundles/dex_seg2d`` at a tiny size on generated 2D images (grey and colour PNG with 0/255
masks): one training epoch through ``python -m monai.bundle run`` initialised from a dense MONAI ViT checkpoint and
fine-tuned through the director, an evaluation run, inference on PNG, a NIfTI slice and a single DICOM file (outputs
in the input's geometry), MLflow records, ``verify_metadata``, ``verify_net_in_out`` and the ONNX and torch.export exports.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "dex_seg2d"
CONFIGS = BUNDLE / "configs"
SCHEMA = REPO / "bundles" / "schemas" / "meta_schema_20240725.json"

ENCODER = {"hidden_size": 48, "mlp_dim": 96, "num_layers": 2, "num_heads": 2, "num_experts": 4, "top_k": 2}
NETWORK = {"roi_size": [32, 32], "patch_size": 16, "feature_size": 8, **ENCODER}
TINY = {
    **NETWORK,
    "epochs": 1,
    "batch_size": 2,
    "num_samples": 2,
    "num_workers": 0,
    "sw_batch_size": 4,
    "val_fraction": 0.25,
    "log_interval": 1,
    "overlay_images": 2,
}
INPUT_SHAPE = [1, 3, 32, 32]

pytestmark = pytest.mark.slow


from bundle_helpers import export_and_compare  # noqa: E402
from bundle_helpers import folder_digest as _digest  # noqa: E402
from bundle_helpers import list_artifacts as _artifacts  # noqa: E402
from bundle_helpers import mlflow_runs as _mlflow_runs  # noqa: E402
from bundle_helpers import run_bundle  # noqa: E402


from bundle_helpers import files_under, read_failures  # noqa: E402


def _run_bundle(configs: list[str], overrides: dict, timeout: int = 600, expect_exit: int = 0) -> subprocess.CompletedProcess:
    return run_bundle(configs, overrides, CONFIGS, timeout, expect_exit)


def _disk_image(rng: np.random.Generator, shape=(48, 64)) -> tuple[np.ndarray, np.ndarray]:
    """A noisy grey picture ``[rows, columns]`` with one bright disk, and its 0/255 mask."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    cy, cx, r = rng.integers(12, shape[0] - 12), rng.integers(12, shape[1] - 12), rng.integers(6, 11)
    mask = (rows - cy) ** 2 + (cols - cx) ** 2 < r * r
    image = np.clip(rng.normal(60, 15, shape) + 120 * mask, 0, 255).astype(np.uint8)
    return image, (255 * mask).astype(np.uint8)


def _write_dicom(plane: np.ndarray, path: Path) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID, ds.Modality = generate_uid(), generate_uid(), "T", "OT"
    ds.Rows, ds.Columns = plane.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelSpacing = [0.5, 0.6]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [1.0, 2.0, 3.0]
    ds.PixelData = np.ascontiguousarray(plane, dtype=np.uint8).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("seg2d_data")
    (root / "image").mkdir()
    (root / "label").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        image, mask = _disk_image(rng)
        picture = Image.fromarray(np.stack([image] * 3, -1)) if i % 2 else Image.fromarray(image)
        picture.save(root / "image" / f"case{i}.png")
        Image.fromarray(mask).save(root / "label" / f"case{i}.png")
    return root


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory) -> Path:
    """A dense MONAI ViT state dict of the same encoder shape (initialises every director and expert)."""
    from monai.networks.nets import ViT

    torch.manual_seed(2)
    vit = ViT(3, 32, 16, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=2, spatial_dims=2, qkv_bias=True)
    path = tmp_path_factory.mktemp("dense") / "vit.pt"
    torch.save(vit.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset, dense_checkpoint) -> dict:
    root = tmp_path_factory.mktemp("seg2d")
    overrides = {**TINY, "bundle_root": str(root), "dataset_dir": str(dataset), "init": "dense",
                 "pretrained_checkpoint": str(dense_checkpoint), "finetune_mode": "director"}
    proc = _run_bundle([str(CONFIGS / "train.json")], overrides)
    return {"root": root, "log": proc.stdout + proc.stderr, "overrides": overrides}


def test_train_one_epoch_from_dense_checkpoint_through_director(trained, dense_checkpoint):
    root = trained["root"]
    assert "initialised DEXUNETR from dense checkpoint" in trained["log"]
    assert "fine-tuning through director" in trained["log"]
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    dense = torch.load(dense_checkpoint, weights_only=True)
    # director fine-tuning leaves the experts as the dense MLP copied into them
    torch.testing.assert_close(state["vit.blocks.1.dex.experts.linear1_weight"][2], dense["blocks.1.mlp.linear1.weight"])
    assert not torch.equal(state["vit.blocks.1.dex.director.linear1.weight"], dense["blocks.1.mlp.linear1.weight"])

    client, runs = _mlflow_runs(root / "eval" / "mlruns.db", "dex_seg2d")
    (name, run), = runs.items()
    assert name.startswith("seg2d_train_") and run.info.status == "FINISHED"
    for metric in ("val_mean_dice", "train_loss"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1], metric
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 3  # 6 training images, batch 2
    assert run.data.tags["finetune_mode"] == "director"
    artifacts = _artifacts(client, run.info.run_id)
    assert "overlays/val_epoch_1.png" in artifacts and "config/resolved_config.json" in artifacts
    from bundle_helpers import assert_training_records

    assert_training_records(client, run, "dex_seg2d")


def test_evaluate(trained):
    from PIL import Image

    root = trained["root"]
    _run_bundle([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")],
                {**trained["overrides"], "save_predictions": True})
    assert "val_mean_dice" in (root / "eval" / "metrics.csv").read_text()
    written = sorted((root / "eval" / "evaluate_predictions").glob("*_seg.png"))
    assert len(written) == 2
    assert set(np.unique(np.array(Image.open(written[0]))).tolist()) <= {0, 1}
    client, runs = _mlflow_runs(root / "eval" / "mlruns.db", "dex_seg2d")
    evaluate = [r for n, r in runs.items() if n.startswith("seg2d_evaluate_")]
    assert len(evaluate) == 1 and "val_mean_dice" in evaluate[0].data.metrics
    assert "overlays/evaluate_epoch_1.png" in _artifacts(client, evaluate[0].info.run_id)


def test_inference_png_nifti_dicom(trained, dataset, tmp_path):
    import nibabel as nib
    from monai.transforms import LoadImage
    from PIL import Image

    inputs = tmp_path / "inputs"
    (inputs / "sub").mkdir(parents=True)
    rng = np.random.default_rng(5)
    grey, _ = _disk_image(rng, (40, 56))
    Image.fromarray(grey).save(inputs / "grey.png")
    colour, _ = _disk_image(rng, (50, 33))
    Image.fromarray(np.stack([colour] * 3, -1)).save(inputs / "sub" / "colour.png")
    affine = np.diag([0.7, 0.8, 2.0, 1.0])
    affine[:3, 3] = [10.0, -5.0, 3.0]
    plane, _ = _disk_image(rng, (36, 44))
    nib.save(nib.Nifti1Image(plane.T[..., None].astype(np.int16), affine), str(inputs / "slice.nii.gz"))
    _write_dicom(_disk_image(rng, (30, 40))[0], inputs / "sub" / "frame.dcm")
    before = _digest(inputs)
    output = tmp_path / "predictions"
    overrides = {**NETWORK, "bundle_root": str(trained["root"]), "input_dir": str(inputs), "output_dir": str(output),
                 "num_workers": 0, "finetune_mode": "director"}
    _run_bundle([str(CONFIGS / "inference.json")], overrides)

    assert _digest(inputs) == before
    for name in ("grey.png", "sub/colour.png"):
        pred = Image.open(output / name.replace(".png", "_seg.png"))
        assert pred.size == Image.open(inputs / name).size and pred.mode == "L"
        assert set(np.unique(np.array(pred)).tolist()) <= {0, 1}
    pred = nib.load(str(output / "slice_seg.nii.gz"))
    assert pred.shape == (44, 36, 1)
    np.testing.assert_allclose(pred.affine, affine, atol=1e-5)
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1}
    frame = LoadImage(image_only=True)(str(inputs / "sub" / "frame.dcm"))
    pred = nib.load(str(output / "sub" / "frame_seg.nii.gz"))
    assert pred.shape == tuple(frame.shape)
    np.testing.assert_allclose(pred.affine, np.asarray(frame.affine), atol=1e-4)


def test_outputs_never_replace_inputs(tmp_path):
    from dex_monai.data.outputs import plan_outputs
    from dex_monai.transforms import SavePredictiond

    items = [{"image": str(tmp_path / "a.png")}, {"image": str(tmp_path / "a_seg.png")}]
    with pytest.raises(ValueError, match="input folder"):
        plan_outputs(items, tmp_path, "seg", "auto")
    with pytest.raises(ValueError, match="must not be empty"):
        SavePredictiond(output_dir=tmp_path, output_postfix="")


def test_input_files_far_from_output_dir_and_a_fake_png(trained, tmp_path):
    """``--input_files "['/t/a/b/in/good.png', ...]" --output_dir /t/x/y/z/out`` wrote ``/t/a/b/in/good_seg.png``
    (beside the input) before; now everything goes under output_dir, and a text file named .png is reported."""
    from PIL import Image

    rng = np.random.default_rng(7)
    deep, other = tmp_path / "a" / "b" / "in", tmp_path / "c"
    deep.mkdir(parents=True)
    other.mkdir()
    Image.fromarray(_disk_image(rng, (40, 48))[0]).save(deep / "good.png")
    Image.fromarray(_disk_image(rng, (32, 32))[0]).save(other / "good2.png")
    (deep / "fake.png").write_text("a text file named like a picture")
    before = _digest(tmp_path)
    output = tmp_path / "x" / "y" / "z" / "out"
    overrides = {**NETWORK, "bundle_root": str(trained["root"]), "output_dir": str(output), "num_workers": 0,
                 "input_files": [str(deep / "good.png"), str(deep / "fake.png"), str(other / "good2.png")]}
    proc = _run_bundle([str(CONFIGS / "inference.json")], overrides, expect_exit=1)
    assert {k: v for k, v in _digest(tmp_path).items() if not k.startswith("x/")} == before
    assert files_under(output) == {"a/b/in/good_seg.png", "c/good2_seg.png", "failed.csv",
                                   "overlays/inference_epoch_1.png"}
    assert Image.open(output / "a" / "b" / "in" / "good_seg.png").size == (40, 48)[::-1]
    (stage, reason), = read_failures(output).values()
    assert stage == "read" and reason.startswith("corrupt") and "fake.png" in proc.stdout + proc.stderr


def test_bundle_copied_out_of_the_repository_runs(dataset, tmp_path):
    """Model-zoo style: ``cp -r bundles/dex_seg2d /tmp/b && cd /tmp/b && python -m monai.bundle run --config_file
    configs/train.json``; the installed package is used, outputs go into the copy."""
    copy = tmp_path / "b"
    shutil.copytree(BUNDLE, copy, ignore=shutil.ignore_patterns("models", "eval", "data", "logs"))
    overrides = {k: v for k, v in TINY.items()}
    overrides.update({"dataset_dir": str(dataset), "init": "scratch", "experiment_name": "copied"})
    run_bundle([str(copy / "configs" / "train.json")], overrides, copy / "configs", cwd=copy)
    assert (copy / "models" / "model.pt").is_file()
    _, runs = _mlflow_runs(copy / "eval" / "mlruns.db", "copied")
    assert len(runs) == 1


def test_verify_metadata():
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA))


def test_verify_net_in_out():
    from monai.bundle import verify_net_in_out

    verify_net_in_out(
        net_id="network_def", meta_file=str(CONFIGS / "metadata.json"), config_file=str(CONFIGS / "train.json"),
        device="cpu", **NETWORK, **{"_meta_#network_data_format#inputs#image#spatial_shape": NETWORK["roi_size"]},
    )


def test_ckpt_export_matches_checkpoint(trained):
    overrides = {**NETWORK, "finetune_mode": "director"}
    export_and_compare(trained["root"], CONFIGS, overrides, INPUT_SHAPE, batch=3, tolerance=1e-4)


def test_related_system_configs_m4oe_network_and_gm_coord(tmp_path):
    """M4oE (modality experts + gate) as the network and UMD's GM-Coord as the loss, on a two-modality datalist."""
    from PIL import Image

    rng = np.random.default_rng(0)
    items = []
    for i in range(6):
        image, mask = _disk_image(rng)
        Image.fromarray(image).save(tmp_path / f"img_{i}.png")
        Image.fromarray(mask).save(tmp_path / f"img_{i}_mask.png")
        items.append({"image": f"img_{i}.png", "label": f"img_{i}_mask.png",
                      "modality": "ultrasound" if i % 2 else "X-ray"})
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": items[:4], "validation": items[4:]}))
    overrides = {**TINY, "datalist": str(datalist), "dataset_dir": str(tmp_path), "ckpt_dir": str(tmp_path / "models"),
                 "output_dir": str(tmp_path / "eval"), "experiment_name": "related"}
    configs = [str(CONFIGS / "train.json"), str(CONFIGS / "m4oe.json"), str(CONFIGS / "gm_coord.json")]
    _run_bundle(configs, overrides)
    client, runs = _mlflow_runs(tmp_path / "eval" / "mlruns.db", "related")
    run = next(iter(runs.values()))
    coefficients = {k: v for k, v in run.data.metrics.items() if k.startswith("gm_coef_")}
    assert set(coefficients) == {"gm_coef_X-ray", "gm_coef_ultrasound"}
    assert all(0.0 < v <= 1.0 for v in coefficients.values())
    weights = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    state = weights.get("model", weights)
    assert any(".m4oe.gate." in k for k in state)
