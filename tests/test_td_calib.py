"""UMD's TD-Calib as continued multi-level reconstruction pre-training on a downstream task's own images (no labels),
through ``python -m monai.bundle run`` of the pre-training bundle, then loaded by a fine-tuning bundle."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bundle_helpers import run_bundle
from dex_monai.engines import load_pretrain_datalist
from dex_monai.engines.initialise import load_pretraining_checkpoint
from dex_monai.networks import DEXMaskedAutoEncoder

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "bundles" / "dex_pretrain" / "configs"
SEG2D = REPO / "bundles" / "dex_seg2d" / "configs"
MAE = dict(hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4, num_experts=4, top_k=2, decoder_hidden_size=32,
           decoder_mlp_dim=64, decoder_num_layers=1, decoder_num_heads=4)


def _mae(umd: bool) -> DEXMaskedAutoEncoder:
    return DEXMaskedAutoEncoder(3, 32, 8, spatial_dims=2, feature_reconstruction_weight=1.0 if umd else 0.0, **MAE)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict:
    """A downstream segmentation datalist (images + labels, no modality) and a UMD pre-training checkpoint."""
    from PIL import Image

    root = tmp_path_factory.mktemp("td_calib_task")
    rng = np.random.default_rng(0)
    items = []
    for i in range(4):
        rows, cols = np.mgrid[:40, :40]
        mask = (rows - 20) ** 2 + (cols - 18 - i) ** 2 < 64
        image = np.clip(rng.normal(60, 15, (40, 40)) + 120 * mask, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / f"img_{i}.png")
        Image.fromarray((255 * mask).astype(np.uint8)).save(root / f"img_{i}_mask.png")
        items.append({"image": f"img_{i}.png", "label": f"img_{i}_mask.png"})
    (root / "datalist.json").write_text(json.dumps({"training": items[:3], "validation": items[3:]}))
    torch.manual_seed(1)
    source = _mae(umd=True)
    torch.save({"model": source.state_dict()}, root / "pretrained.pt")
    return {"root": root, "datalist": root / "datalist.json", "checkpoint": root / "pretrained.pt"}


def test_downstream_datalist_read_without_labels(task):
    items = load_pretrain_datalist(task["datalist"], modality="ultrasound", image_only=True)
    assert [sorted(i) for i in items] == [["image", "modality"]] * 3
    assert all(i["modality"] == "ultrasound" and Path(i["image"]).is_file() for i in items)


def test_load_pretraining_checkpoint_teacher(task):
    """A UMD checkpoint brings its EMA teacher; a plain DEX checkpoint starts the teacher as the loaded encoder."""
    source = torch.load(task["checkpoint"], weights_only=True)["model"]
    umd = _mae(umd=True)
    report = load_pretraining_checkpoint(umd, task["checkpoint"])
    assert report.ok and not any(k.startswith(("teacher.", "feature_pred.")) for k in report.newly_initialised)
    for key, value in umd.state_dict().items():
        assert torch.equal(value, source[key]), key
    plain = {k: v for k, v in source.items() if not k.startswith(("teacher.", "feature_pred."))}
    fresh = _mae(umd=True)
    load_pretraining_checkpoint(fresh, plain)
    for key, value in fresh.teacher.state_dict().items():
        assert torch.equal(value, source["encoder." + key]), key
    with pytest.raises(FileNotFoundError, match="pretrained_checkpoint"):
        load_pretraining_checkpoint(_mae(umd=False), None)


@pytest.mark.slow
def test_td_calib_bundle_from_checkpoint_then_fine_tuning_bundle_loads_it(task, tmp_path):
    overrides = {
        "img_size": 32, "patch_size": 8, "batch_size": 2, "num_workers": 0, "progress_bar": False,
        "mlflow_tracking": False, "log_interval": 1, "save_interval": 3, "base_lr": 0.1, "steps": 3, "modality": "ultrasound",
        "datalist": str(task["datalist"]), "dataset_dir": str(task["root"]),
        "pretrained_checkpoint": str(task["checkpoint"]), "bundle_root": str(tmp_path),
        "slice_cache_dir": str(tmp_path / "cache"), **{f"network_def#{k}": v for k, v in MAE.items()},
    }
    configs = [str(PRETRAIN / "train.json"), str(PRETRAIN / "umd.json"), str(PRETRAIN / "td_calib.json")]
    proc = run_bundle(configs, overrides, PRETRAIN, timeout=300, cwd=tmp_path)
    assert "continuing pre-training from" in proc.stdout + proc.stderr
    out = tmp_path / "models" / "td_calib" / "model.pt"
    last = torch.load(out.parent / "checkpoint_3.pt", weights_only=True)
    assert last["trainer"]["iteration"] == 3  # --steps 3
    assert sorted(p.name for p in out.parent.glob("checkpoint_*.pt")) == ["checkpoint_3.pt"]
    before = torch.load(task["checkpoint"], weights_only=True)["model"]
    after = torch.load(out, weights_only=True)["model"]
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("encoder.blocks.") for k in changed) and any(k.startswith("teacher.") for k in changed)
    # continued from the checkpoint, not from a fresh initialisation: 3 small steps away from it
    kernel = "encoder.patch_embedding.patch_embeddings.weight"
    assert (after[kernel] - before[kernel]).abs().max() < 0.01 < (_mae(True).state_dict()[kernel] - before[kernel]).abs().max()

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(SEG2D / "train.json"))
    parser.update({"roi_size": [32, 32], "patch_size": 8, "in_channels": 3, "num_heads": 4, "init": "dex",
                   "pretrained_checkpoint": str(tmp_path / "models" / "td_calib"),
                   **{k: MAE[k] for k in ("hidden_size", "mlp_dim", "num_layers", "num_experts", "top_k")}})
    report = parser.get_parsed_content("initialise_network")
    assert report.ok, report.summary()
    network = parser.get_parsed_content("network_def")
    torch.testing.assert_close(network.vit.blocks[0].dex.experts.linear1_weight,
                               after["encoder.blocks.0.dex.experts.linear1_weight"])


def test_task_volumes_become_slices_along_the_slicing_axis():
    from dex_monai.benchmark import BenchmarkConfig
    from dex_monai.benchmark.tasks import TaskData, task_images_2d

    z = torch.arange(4, dtype=torch.float32) / 4  # slice z of every volume holds the value z / 4
    volumes = torch.stack([z.expand(1, 6, 5, 4) + n for n in (0.0, 0.5)])  # [2, 1, 6, 5, 4]
    data = TaskData(volumes, torch.zeros(2), volumes, torch.zeros(2), 2, 3, "classification", "CT")
    images = task_images_2d(data, BenchmarkConfig(img_size=8))
    assert images.shape == (8, 3, 8, 8)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    for n in range(2):
        for s in range(4):
            expected = ((n * 0.5 + s / 4) - mean) / std
            torch.testing.assert_close(images[n * 4 + s].mean(dim=(1, 2)), expected)
            assert float(images[n * 4 + s].std(dim=(1, 2)).max()) < 1e-5  # constant slice stays constant


@pytest.mark.slow
def test_transfer_benchmark_td_calib_init(shared_data, tmp_path):
    """``td_calib``: dex_umd pre-training continued on each task's train images for ``td_calib_steps``, then fine-tuned."""
    from dex_monai.benchmark import BenchmarkConfig, run_transfer_benchmark

    cfg = BenchmarkConfig(
        data_root=str(shared_data), out_dir=str(tmp_path), tracking_uri="none", tasks=("hippocampus_seg3d",),
        inits=("dex_umd", "td_calib"), img_size=32, volume_size=16, patch_size=8, hidden_size=48, mlp_dim=96,
        num_layers=2, num_heads=4, num_experts=3, decoder_hidden_size=24, pretrain_steps=3, pretrain_batch=6,
        pretrain_images_per_modality=8, td_calib_steps=2, finetune_steps=2, finetune_batch=4, max_train=4, max_eval=4,
        probe_images_per_modality=6,
    )
    result = run_transfer_benchmark(cfg)
    assert set(result["table"]["hippocampus_seg3d"]) == {"dex_umd", "td_calib"}
    assert all(math.isfinite(v) for v in result["table"]["hippocampus_seg3d"].values())
    start = torch.load(tmp_path / "pretrain_dex_umd.pt", weights_only=True)["model"]
    calibrated = torch.load(tmp_path / "pretrain_td_calib_hippocampus_seg3d.pt", weights_only=True)["model"]
    kernel = "encoder.patch_embedding.patch_embeddings.weight"
    difference = (calibrated[kernel] - start[kernel]).abs().max()
    assert 0 < difference < 0.05  # two steps (lr 1e-3) away from the dex_umd encoder it started from
