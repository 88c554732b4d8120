# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""UniMed on the DEX encoder: shapes (2D, 3D), the composed token round trip, a joint training step on mixed data,
the mixed datalist, and the bundle's training and inference through ``python -m monai.bundle run``."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bundle_helpers import assert_training_records, files_under, folder_digest, mlflow_runs, read_failures, run_bundle

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "dex_unimed" / "configs"
CLASSES = ["benign", "malignant", "normal"]
ENCODER = {"hidden_size": 48, "mlp_dim": 96, "num_layers": 2, "num_heads": 2, "num_experts": 4, "top_k": 2}


def _unimed(spatial_dims: int, side: int, image_classes: int = 3, pixel_classes: int = 3):
    from dex_monai.networks import UniMed

    return UniMed(1, image_classes, pixel_classes, [side] * spatial_dims, 8, spatial_dims=spatial_dims,
                  pixel_embedding_size=8, **ENCODER)


@pytest.mark.parametrize("spatial_dims, side", [(2, 32), (3, 16)])
def test_shapes_and_probabilities(spatial_dims, side):
    net = _unimed(spatial_dims, side).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 1, *[side] * spatial_dims))
    spatial = [side] * spatial_dims
    # vocabulary: 4 special tokens + 3 image classes + 3 pixel classes; queries: 1 image query + 3 pixel queries
    assert list(out["class_logits"].shape) == [2, 4, 10]
    assert list(out["mask_logits"].shape) == [2, 3, *spatial]
    assert list(out["segmentation"].shape) == [2, 3, *spatial]
    assert list(out["classification"].shape) == [2, 3]
    torch.testing.assert_close(out["segmentation"].sum(1), torch.ones(2, *spatial))
    torch.testing.assert_close(out["classification"].sum(1), torch.ones(2))
    # the image-class probabilities are query 0's softmax restricted to the image-class tokens (ids 4, 5, 6)
    torch.testing.assert_close(out["classification"], out["class_logits"][:, 0, 4:7].softmax(-1))


def test_token_format_by_hand():
    from dex_monai.networks import ComposedVocabulary
    from dex_monai.networks.blocks import IGNORE_INDEX

    vocab = ComposedVocabulary(num_image_classes=3, num_pixel_classes=2)  # ids: 4..6 image, 7..8 pixel classes
    mask = torch.tensor([[[0, 1], [1, 1]]])
    labels = torch.tensor([2, -1, 0])
    masks = torch.stack([mask, torch.zeros_like(mask), torch.full_like(mask, -1)])
    targets = vocab.encode(labels, masks)
    assert targets.tokens.tolist() == [[1, 6, 2, 7, 8], [2, 7, 0, 0, 0], [1, 4, 0, 0, 0]]
    assert targets.token_masks[0, 3].tolist() == [[True, False], [False, False]]
    assert targets.token_masks[0, 4].tolist() == [[False, True], [True, True]]
    assert not targets.token_masks[2].any()
    class_targets, mask_targets, has_mask = vocab.query_targets(targets)
    assert class_targets.tolist() == [[6, 7, 8], [IGNORE_INDEX, 7, vocab.NO_OBJECT], [4, IGNORE_INDEX, IGNORE_INDEX]]
    assert has_mask.tolist() == [True, True, False]
    assert mask_targets[0, 1].tolist() == [[0, 1], [1, 1]] and mask_targets[1, 0].tolist() == [[1, 1], [1, 1]]


@pytest.mark.parametrize("spatial", [(9, 7), (4, 5, 3)])
def test_token_round_trip_is_exact(spatial):
    from dex_monai.networks import ComposedVocabulary

    gen = torch.Generator().manual_seed(1)
    vocab = ComposedVocabulary(num_image_classes=4, num_pixel_classes=5)
    labels = torch.randint(-1, 4, (12,), generator=gen)
    masks = torch.randint(0, 5, (12, 1, *spatial), generator=gen)
    masks[::3] = -1  # every third image without a mask
    masks[1, 0][masks[1, 0] == 3] = 2  # an image lacking some classes
    decoded_labels, decoded_masks = vocab.decode(vocab.encode(labels, masks))
    assert torch.equal(decoded_labels, labels)
    assert torch.equal(decoded_masks, masks)


def test_token_format_refuses_partial_masks_and_bad_labels():
    from dex_monai.networks import ComposedVocabulary

    vocab = ComposedVocabulary(2, 2)
    partial = torch.zeros(1, 1, 2, 2, dtype=torch.long)
    partial[0, 0, 0, 0] = -1
    with pytest.raises(ValueError, match="complete"):
        vocab.encode(torch.tensor([-1]), partial)
    with pytest.raises(ValueError, match="image labels"):
        vocab.encode(torch.tensor([2]), torch.zeros(1, 1, 2, 2))


def test_joint_training_step_on_mixed_data():
    from dex_monai.engines import PrepareUniMedBatch
    from dex_monai.losses import UniMedLoss

    net = _unimed(2, 32, image_classes=3, pixel_classes=2)
    images = torch.rand(5, 1, 32, 32)
    masks = torch.full((5, 1, 32, 32), -1.0)
    masks[0, 0, 8:20, 8:20], masks[0, 0][masks[0, 0] < 0] = 1.0, 0.0  # a segmentation item
    masks[1] = (torch.rand(1, 32, 32) > 0.5).float()  # a second one
    batch = {"image": images, "mask": masks, "class_label": torch.tensor([-1, -1, 2, 0, -1])}  # 2 cls, 1 unlabelled
    inputs, targets = PrepareUniMedBatch(3, 2)(batch)
    assert inputs.shape[0] == 6 and targets["view_of"].tolist() == [4]
    torch.testing.assert_close(inputs[5], images[4].flip(-1))  # the second view: the unlabelled image flipped
    loss_fn = UniMedLoss(3, 2)
    loss = loss_fn(net(inputs), targets)
    loss.backward()
    assert torch.isfinite(loss) and all(v > 0 and np.isfinite(v) for v in loss_fn.terms.values()), loss_fn.terms
    assert loss.item() == pytest.approx(sum(loss_fn.terms.values()), rel=1e-5)
    for name, module in [("semantic head", net.semantic_head), ("pixel head", net.mask_head),
                         ("pixel decoder", net.pixel_upsampler), ("encoder", net.encoder.patch_embedding)]:
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name


def test_consistency_term_matches_its_formula():
    from dex_monai.losses import UniMedLoss

    torch.manual_seed(3)
    class_logits, mask_logits = torch.randn(2, 3, 8), torch.randn(2, 2, 4, 4)
    targets = {"tokens": torch.zeros(1, 5, dtype=torch.long), "token_masks": torch.zeros(1, 5, 4, 4, dtype=torch.bool),
               "view_of": torch.tensor([0])}
    loss_fn = UniMedLoss(3, 2)
    loss = loss_fn({"class_logits": class_logits, "mask_logits": mask_logits}, targets)
    p, q = class_logits.softmax(-1), mask_logits.sigmoid()
    expected = ((p[0] - p[1]) ** 2).mean() + ((q[0] - q[1].flip(-1)) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # a second view that is exactly the flipped first one is consistent: no loss
    same = {"class_logits": class_logits[[0, 0]], "mask_logits": torch.stack([mask_logits[0], mask_logits[0].flip(-1)])}
    assert loss_fn(same, targets).item() == pytest.approx(0.0, abs=1e-12)


def test_encoder_weights_load_into_unimed():
    from dex_monai.networks import DEXClassifier, load_encoder_weights

    source = DEXClassifier(1, 2, [32, 32], 8, spatial_dims=2, **ENCODER)
    net = _unimed(2, 32)
    report = load_encoder_weights(net, {"model": source.state_dict()}, strict=True)
    for name, value in source.encoder.state_dict().items():
        assert torch.equal(net.encoder.state_dict()[name], value), name
    assert report is not None


def test_mixed_datalist(tmp_path):
    from dex_monai.data.mixed_datalist import NO_CLASS, annotation_level, mixed_datalist

    items = [{"image": f"img{i}.png"} for i in range(6)]
    items[0]["label"], items[1]["label"], items[2]["label"], items[3]["label"] = "masks/m0.png", "malignant", 0, "2"
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps({"training": items}))
    out = mixed_datalist(path, ["benign", "malignant", "normal"], split="all")
    assert [annotation_level(i) for i in out] == ["mask", "class", "class", "class", "none", "none"]
    assert out[0]["mask"] == str(tmp_path / "masks" / "m0.png") and out[0]["class_label"] == NO_CLASS
    assert [i["class_label"] for i in out[1:]] == [1, 0, 2, NO_CLASS, NO_CLASS]
    path.write_text(json.dumps({"training": [{"image": "a.png", "label": "cyst"}]}))
    with pytest.raises(ValueError, match="cyst"):
        mixed_datalist(path, ["benign", "malignant", "normal"])


# ------------------------------------------------------------------------------------------------ the bundle
TINY = {"img_side": 32, "patch_size": 8, **ENCODER, "pixel_embedding_size": 8, "decoder_layers": 1}


@pytest.mark.slow
def test_bundle_joint_training_and_inference(shared_data, tmp_path):
    em, busi = shared_data / "em" / "isbi2012", shared_data / "us" / "busi"
    items = [{"image": str(em / "image" / f"{i}.png"), "label": str(em / "label" / f"{i}.png"), "modality": "range"}
             for i in range(3)]
    pictures = {c: sorted(p for p in (busi / c).glob("*.png") if "_mask" not in p.name) for c in CLASSES}
    items += [{"image": str(pictures[c][0]), "label": c, "modality": "ultrasound"} for c in CLASSES]
    items += [{"image": str(p), "modality": "ultrasound"} for p in pictures["benign"][1:3]]  # unlabelled
    datalist = tmp_path / "mixed.json"
    datalist.write_text(json.dumps({"training": items}))
    root = tmp_path / "bundle"
    shutil.copytree(CONFIGS.parent, root)
    common = {**TINY, "bundle_root": str(root), "mlflow_tracking": False}
    proc = run_bundle(["configs/train.json"], {**common, "datalist": str(datalist), "epochs": 1, "batch_size": 8,
                                               "num_workers": 0, "log_interval": 1, "mlflow_tracking": True},
                      CONFIGS, cwd=root)
    assert (root / "models" / "model.pt").is_file(), proc.stdout[-2000:]
    client, runs = mlflow_runs(root / "eval" / "mlruns.db", "dex_unimed")
    (run,) = runs.values()
    assert run.info.status == "FINISHED"
    assert_training_records(client, run, "dex_unimed", contexts=("training",))

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(em / "image" / "5.png", inputs / "em5.png")
    shutil.copy(pictures["malignant"][1], inputs / "malignant2.png")
    (inputs / "broken.png").write_bytes(b"not a picture")  # failure-tolerant: listed, the others predicted
    before = folder_digest(inputs)
    out = tmp_path / "predictions"
    run_bundle(["configs/inference.json"], {**common, "input_dir": str(inputs), "output_dir": str(out),
                                           "num_workers": 0}, CONFIGS, cwd=root, expect_exit=1)
    assert folder_digest(inputs) == before  # nothing written beside the inputs
    assert files_under(out) == {"em5_seg.png", "malignant2_seg.png", "classes.csv", "failed.csv"}
    assert set(read_failures(out)) == {"broken.png"}
    from PIL import Image

    for name, source in (("em5_seg.png", "em5.png"), ("malignant2_seg.png", "malignant2.png")):
        mask, image = np.asarray(Image.open(out / name)), Image.open(inputs / source)
        assert mask.shape[:2] == image.size[::-1] and set(np.unique(mask)) <= {0, 1}
    with open(out / "classes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(r["image"]).name for r in rows) == ["em5.png", "malignant2.png"]
    for row in rows:
        probs = [float(row[f"prob_{c}"]) for c in CLASSES]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4) and row["predicted_class"] == CLASSES[int(np.argmax(probs))]


# ---------------------------------------------------------------------------------------- the transfer benchmark
@pytest.mark.slow
def test_transfer_benchmark_unimed_init(shared_data, tmp_path):
    from dex_monai.benchmark import BenchmarkConfig, run_transfer_benchmark

    cfg = BenchmarkConfig(
        data_root=str(shared_data), out_dir=str(tmp_path), tracking_uri="none",
        tasks=("em_membrane_seg", "busi_cls", "hippocampus_seg3d"), inits=("unimed",), img_size=32, volume_size=16,
        patch_size=8, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4, num_experts=3, decoder_hidden_size=24,
        pretrain_steps=2, pretrain_batch=6, pretrain_images_per_modality=6, finetune_steps=2, finetune_batch=4,
        max_train=8, max_eval=8, probe_images_per_modality=6,
    )
    result = run_transfer_benchmark(cfg)
    scores = {task: row["unimed"] for task, row in result["table"].items()}
    assert set(scores) == {"em_membrane_seg", "busi_cls", "hippocampus_seg3d"}
    assert all(np.isfinite(v) and 0.0 <= v <= 1.0 for v in scores.values()), scores


def test_bundle_metadata_verifies():
    from monai.bundle import verify_metadata

    meta = json.loads((CONFIGS / "metadata.json").read_text())
    outputs = meta["network_data_format"]["outputs"]
    assert list(outputs["classification"]["channel_def"].values()) == CLASSES
    assert json.loads((CONFIGS / "train.json").read_text())["class_names"] == CLASSES
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(REPO / "bundles" / "schemas" / "meta_schema_20240725.json"))
