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
    m4oe = M4oESwinUNETR(1, 3, MODALITIES, m4oe_stage=stage, m4oe_gate=gate, spatial_dims=spatial_dims, **SWIN)
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
