"""M4oE on its own architecture: MONAI's SwinUNETR with modality-expert layers in every Swin block."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import SwinTransformerBlock

from dex_monai.networks import M4oESwinClassifier, M4oESwinUNETR, ModalityExpertLayer

MODALITIES = ("CT", "MR")
SWIN = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4)


def _pair(spatial_dims: int = 2, gate: str = "experts", stage: str = "expert"):
    """A MONAI SwinUNETR and the M4oE network built from the same seed (so every expert equals its block's MLP)."""
    torch.manual_seed(0)
    plain = SwinUNETR(1, 3, spatial_dims=spatial_dims, **SWIN)
    torch.manual_seed(0)
    m4oe = M4oESwinUNETR(1, 3, MODALITIES, m4oe_stage=stage, m4oe_gate=gate, spatial_dims=spatial_dims,
                         experts_from_mlp=True, **SWIN)
    return plain, m4oe


def _perturb_expert(net: M4oESwinUNETR, expert: int) -> None:
    with torch.no_grad():
        for layer in net.m4oe_layers():
            layer.experts.linear1_weight[expert].add_(0.5 * torch.randn_like(layer.experts.linear1_weight[expert]))


def _plain_with_expert(plain: SwinUNETR, net: M4oESwinUNETR, expert: int) -> SwinUNETR:
    """A copy of the MONAI network whose MLPs carry expert ``expert``'s weights (the reference for routing)."""
    ref = copy.deepcopy(plain)
    blocks = [b for b in ref.swinViT.modules() if isinstance(b, SwinTransformerBlock)]
    with torch.no_grad():
        for block, layer in zip(blocks, net.m4oe_layers()):
            block.mlp.linear1.weight.copy_(layer.experts.linear1_weight[expert])
            block.mlp.linear1.bias.copy_(layer.experts.linear1_bias[expert])
            block.mlp.linear2.weight.copy_(layer.experts.linear2_weight[expert])
            block.mlp.linear2.bias.copy_(layer.experts.linear2_bias[expert])
    return ref


def test_every_swin_block_mlp_is_a_modality_expert_layer_and_shapes_2d_3d():
    net = M4oESwinUNETR(1, 3, MODALITIES, spatial_dims=2, **SWIN)
    blocks = [b for b in net.swinViT.modules() if isinstance(b, SwinTransformerBlock)]
    assert len(blocks) == 4 and all(isinstance(b.mlp, ModalityExpertLayer) for b in blocks)
    assert net(torch.randn(2, 1, 64, 64)).shape == (2, 3, 64, 64)
    net3d = M4oESwinUNETR(1, 3, MODALITIES, spatial_dims=3, **SWIN)
    with torch.no_grad():
        assert net3d(torch.randn(1, 1, 64, 64, 64)).shape == (1, 3, 64, 64, 64)
    assert M4oESwinClassifier(1, 4, MODALITIES, spatial_dims=2, **SWIN)(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    assert M4oESwinClassifier(1, 4, MODALITIES, spatial_dims=3, **SWIN)(torch.randn(2, 1, 32, 32, 32)).shape == (2, 4)


@pytest.mark.parametrize("gate", ["experts", "channel"])
def test_experts_start_as_the_blocks_mlp(gate):
    """Every expert is a copy of MONAI's MLP: in the expert stage, and in the gated stage with the paper's
    (zero-initialised, uniform) gate, the network computes exactly what MONAI's SwinUNETR computes."""
    plain, net = _pair(gate=gate)
    x = torch.randn(2, 1, 64, 64)
    expected = plain(x)
    net.set_modality_ids(["CT", "MR"])
    torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=1e-5)
    if gate == "experts":
        net.set_m4oe_stage("gated")
        torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=1e-5)


def test_expert_stage_routes_each_image_by_its_modality():
    plain, net = _pair(stage="expert")
    _perturb_expert(net, 1)  # MR's expert now differs from CT's
    x = torch.randn(2, 1, 64, 64)
    net.set_modality_ids(["MR", "CT"])
    out = net(x)
    with_mr, with_ct = _plain_with_expert(plain, net, 1), _plain_with_expert(plain, net, 0)
    torch.testing.assert_close(out[:1], with_mr(x[:1]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1:], with_ct(x[1:]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[:1], with_ct(x[:1]), atol=1e-3)
    from monai.data import MetaTensor  # a MONAI batch (per-image metadata) is routed the same way

    torch.testing.assert_close(net(MetaTensor(x)), out)
    # without per-image modalities the expert stage needs a default modality
    net.set_modality_ids(None)
    with pytest.raises(ValueError, match="modality of every image"):
        net(x)


def test_gated_stage_follows_the_gate_not_the_modality():
    plain, net = _pair(stage="gated")
    _perturb_expert(net, 1)
    with torch.no_grad():
        for layer in net.m4oe_layers():  # a gate that picks MR's expert for every token
            layer.gate.bias.copy_(torch.tensor([-40.0, 40.0]))
    x = torch.randn(2, 1, 64, 64)
    net.set_modality_ids(["CT", "CT"])  # ignored in the gated stage
    out = net(x)
    torch.testing.assert_close(out, _plain_with_expert(plain, net, 1)(x), atol=1e-5, rtol=1e-5)
    gates = net.m4oe_layers()[0].last_gates
    assert gates.shape == (2, 32 * 32, 2) and torch.all(gates[..., 1] > 0.999)


@pytest.mark.parametrize("gate", ["experts", "channel"])
def test_add_modality_leaves_existing_outputs_unchanged(gate):
    _, net = _pair(gate=gate)
    net.eval()
    _perturb_expert(net, 1)
    with torch.no_grad():
        for layer in net.m4oe_layers():
            layer.gate.weight.normal_(std=0.2)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        net.set_m4oe_stage("expert")
        net.set_modality_ids(["CT", "MR"])
        expert_before = net(x)
        net.set_m4oe_stage("gated")
        gated_before = net(x)
        net.add_modality("ultrasound", init_from="MR")
        assert all(layer.num_experts == 3 for layer in net.m4oe_layers())
        net.set_m4oe_stage("expert")
        net.set_modality_ids(["CT", "MR"])
        assert torch.equal(net(x), expert_before)
        net.set_m4oe_stage("gated")
        gated_after = net(x)
    if gate == "channel":  # the new expert adds an exact zero to the sum
        assert torch.equal(gated_after, gated_before)
    else:  # the new gate logit is -30 below: its weight exp(-30) ~ 1e-13 vanishes below float32 resolution
        torch.testing.assert_close(gated_after, gated_before, atol=1e-6, rtol=0)


def test_training_step_expert_stage_trains_only_the_routed_expert_and_gated_stage_trains_the_gate():
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    net = M4oESwinUNETR(1, 2, MODALITIES, m4oe_stage="expert", spatial_dims=2, **SWIN)
    x = torch.randn(2, 1, 64, 64)
    y = (x > 0.5).long()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net.set_modality_ids(["MR", "MR"])
    loss = loss_fn(net(x), y)
    loss.backward()
    layer = net.m4oe_layers()[0]
    assert float(layer.experts.linear1_weight.grad[1].abs().sum()) > 0
    assert float(layer.experts.linear1_weight.grad[0].abs().sum()) == 0  # CT's expert saw no image
    assert layer.gate.weight.grad is None
    optimizer.step()
    optimizer.zero_grad()
    net.set_m4oe_stage("gated")
    before = loss_fn(net(x), y)
    before.backward()
    assert float(layer.gate.weight.grad.abs().sum()) > 0
    assert torch.isfinite(before)


# ------------------------------------------------------------------------------------------- bundles (monai.bundle run)
SWIN_BUNDLE = {"swin_feature_size": 12, "swin_depths": [1, 1, 1, 1], "swin_num_heads": [1, 1, 1, 1],
               "swin_window_size": 4}


@pytest.mark.slow
def test_seg2d_bundle_expert_stage_then_gated_stage_then_inference(tmp_path):
    """The expert stage trains X-ray's expert only (one modality per run, ``m4oe_default_modality``); the gated stage
    starts from its checkpoint; inference writes a prediction per image."""
    import json
    from pathlib import Path

    import numpy as np
    from bundle_helpers import run_bundle
    from PIL import Image

    configs = Path(__file__).resolve().parents[1] / "bundles" / "dex_seg2d" / "configs"
    rng = np.random.default_rng(0)
    items = []
    for i in range(4):
        rows, cols = np.mgrid[:48, :64]
        mask = (rows - rng.integers(14, 34)) ** 2 + (cols - rng.integers(14, 50)) ** 2 < 64
        image = np.clip(rng.normal(60, 15, mask.shape) + 120 * mask, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / f"img_{i}.png")
        Image.fromarray((255 * mask).astype(np.uint8)).save(tmp_path / f"img_{i}_mask.png")
        items.append({"image": f"img_{i}.png", "label": f"img_{i}_mask.png"})
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": items[:3], "validation": items[3:]}))
    common = {"roi_size": [64, 64], "epochs": 1, "batch_size": 2, "num_samples": 1, "num_workers": 0,
              "sw_batch_size": 2, "log_interval": 1, "overlay_images": 1, "datalist": str(datalist),
              "dataset_dir": str(tmp_path), "m4oe_modalities": ["X-ray", "ultrasound"], "mlflow_tracking": False,
              **SWIN_BUNDLE}
    stage_configs = [str(configs / "train.json"), str(configs / "m4oe_swin.json")]
    expert_dir = tmp_path / "expert"
    run_bundle(stage_configs, {**common, "m4oe_stage": "expert", "m4oe_default_modality": "X-ray",
                               "ckpt_dir": str(expert_dir / "models"), "output_dir": str(expert_dir / "eval")}, configs)
    expert_state = torch.load(expert_dir / "models" / "model.pt", weights_only=True)
    torch.manual_seed(0)  # the bundle's seed (set_determinism): the network the expert stage started from
    start = M4oESwinUNETR(3, 2, ["X-ray", "ultrasound"], spatial_dims=2, feature_size=12, depths=(1, 1, 1, 1),
                          num_heads=(1, 1, 1, 1), window_size=4).state_dict()
    key = "swinViT.layers1.0.blocks.0.mlp.experts.linear1_weight"
    # ultrasound's expert saw no image: AdamW's weight decay only scales it (one ratio for every weight); X-ray's
    # expert trained (its ratios differ)
    ratio_unused = expert_state[key][1] / start[key][1]
    ratio_trained = expert_state[key][0] / start[key][0]
    torch.testing.assert_close(ratio_unused, torch.full_like(ratio_unused, float(ratio_unused.mean())), atol=1e-5, rtol=0)
    assert float(ratio_unused.mean()) < 1.0
    assert float((ratio_trained - ratio_trained.mean()).abs().max()) > 1e-3
    gate_key = "swinViT.layers1.0.blocks.0.mlp.gate.weight"
    assert torch.equal(expert_state[gate_key], torch.zeros_like(expert_state[gate_key]))  # no gate in this stage

    gated_dir = tmp_path / "gated"
    run_bundle(stage_configs, {**common, "m4oe_stage": "gated", "m4oe_checkpoint": str(expert_dir / "models"),
                               "ckpt_dir": str(gated_dir / "models"), "output_dir": str(gated_dir / "eval")}, configs)
    gated_state = torch.load(gated_dir / "models" / "model.pt", weights_only=True)
    assert gated_state[gate_key].abs().sum() > 0  # the gate learned

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.open(tmp_path / "img_0.png").save(inputs / "a.png")
    output = tmp_path / "predictions"
    run_bundle([str(configs / "inference.json"), str(configs / "m4oe_swin.json")],
               {"roi_size": [64, 64], "num_workers": 0, "bundle_root": str(gated_dir), "ckpt_dir": str(gated_dir / "models"),
                "input_dir": str(inputs), "output_dir": str(output), "m4oe_modalities": ["X-ray", "ultrasound"],
                "mlflow_tracking": False, **SWIN_BUNDLE}, configs)
    pred = Image.open(output / "a_seg.png")
    assert pred.size == (64, 48)


@pytest.mark.slow
def test_seg3d_bundle_trains_the_m4oe_swin_unetr(shared_data, tmp_path):
    from pathlib import Path

    from bundle_helpers import run_bundle

    configs = Path(__file__).resolve().parents[1] / "bundles" / "dex_seg3d" / "configs"
    hippocampus = shared_data / "mr" / "hippocampus"
    overrides = {"roi_size": [64, 64, 64], "epochs": 1, "batch_size": 1, "num_samples": 1, "num_workers": 0,
                 "sw_batch_size": 1, "max_train_items": 1, "max_val_items": 1, "log_interval": 1, "overlay_images": 1,
                 "dataset_dir": str(hippocampus), "ckpt_dir": str(tmp_path / "models"),
                 "output_dir": str(tmp_path / "eval"), "m4oe_modalities": ["MR", "CT"], "mlflow_tracking": False,
                 **SWIN_BUNDLE}
    run_bundle([str(configs / "train.json"), str(configs / "m4oe_swin.json")], overrides, configs)
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert state["swinViT.layers4.0.blocks.0.mlp.experts.linear1_weight"].shape[0] == 2
    assert state["swinViT.layers4.0.blocks.0.mlp.gate.weight"].abs().sum() > 0


# ------------------------------------------------------------------------------------ stage handler and benchmark init
def test_stage_handler_routes_each_batch_by_its_modality_then_switches_to_the_gate():
    from monai.engines import SupervisedTrainer

    from dex_monai.handlers import M4oEStageHandler

    torch.manual_seed(0)
    net = M4oESwinClassifier(1, 2, MODALITIES, m4oe_stage="gated", spatial_dims=2, **SWIN)
    items = [{"image": torch.randn(1, 32, 32), "label": torch.tensor(i % 2), "modality": MODALITIES[i % 2]}
             for i in range(8)]
    seen = []
    layer = net.m4oe_layers()[0]
    layer.register_forward_pre_hook(lambda module, args: seen.append(
        (module.stage, None if module._modality_ids is None else module._modality_ids.tolist())))
    trainer = SupervisedTrainer(
        device="cpu", max_epochs=1, train_data_loader=torch.utils.data.DataLoader(items, batch_size=2), network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.01), loss_function=torch.nn.CrossEntropyLoss(),
        decollate=False,
    )
    M4oEStageHandler(net, "modality", expert_iterations=2).attach(trainer)
    trainer.run()
    # batches alternate CT, MR: ids [0, 1] every time; expert stage for 2 iterations, then gated
    assert seen == [("expert", [0, 1]), ("expert", [0, 1]), ("gated", [0, 1]), ("gated", [0, 1])]
    assert layer.stage == "gated" and layer._modality_ids is None


@pytest.mark.slow
@pytest.mark.parametrize("task_name", ["mixed_seg2d", "busi_cls"])
def test_benchmark_m4oe_swin_init(shared_data, task_name):
    import math

    import numpy as np

    from dex_monai.benchmark import TASKS, BenchmarkConfig
    from dex_monai.benchmark.transfer import _build_downstream, finetune

    cfg = BenchmarkConfig(data_root=str(shared_data), tracking_uri="none", img_size=32, finetune_steps=2,
                          finetune_batch=4, max_train=8, max_eval=8)
    task = TASKS[task_name]
    data = task.loader(shared_data, cfg, np.random.default_rng(cfg.seed))
    model = _build_downstream(task, data, cfg, "m4oe_swin")
    expected = {"mixed_seg2d": (M4oESwinUNETR, ["MR", "pathology"]), "busi_cls": (M4oESwinClassifier, [task.modality])}
    assert type(model) is expected[task_name][0]
    assert model.m4oe_layers()[0].modalities == expected[task_name][1]
    metrics = finetune(task, data, cfg, "m4oe_swin", None, None, {})
    assert math.isfinite(metrics["score"]) and 0.0 <= metrics["score"] <= 1.0
