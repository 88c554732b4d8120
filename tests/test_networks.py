"""Behaviour of the DEX layer, encoder, MAE and downstream networks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dex_monai.networks import (
    DEXClassifier,
    DEXLayer,
    DEXMaskedAutoEncoder,
    DEXUNETR,
    DEXViT,
    NoisyTopKRouter,
    StackedExpertMLP,
    alignment_loss,
    expert_schedule,
    patchify,
    top_k_schedule,
    unpatchify,
)

TINY = dict(hidden_size=48, mlp_dim=96, num_heads=4)


def tiny_mae(spatial_dims: int = 2, **kwargs) -> DEXMaskedAutoEncoder:
    size = 32 if spatial_dims == 2 else 16
    defaults = dict(
        in_channels=3 if spatial_dims == 2 else 1,
        img_size=size,
        patch_size=8,
        spatial_dims=spatial_dims,
        num_layers=3,
        num_experts=4,
        top_k=2,
        decoder_hidden_size=24,
        decoder_mlp_dim=48,
        decoder_num_layers=1,
        decoder_num_heads=4,
        **TINY,
    )
    defaults.update(kwargs)
    return DEXMaskedAutoEncoder(**defaults)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_mae_shapes_and_outputs(spatial_dims):
    mae = tiny_mae(spatial_dims)
    size = (32, 32) if spatial_dims == 2 else (16, 16, 16)
    images = torch.rand(2, mae.in_channels, *size)
    recon, out = mae(images)
    assert recon.shape == images.shape
    n_patches = math.prod(s // 8 for s in size)
    assert out["mask"].shape == (2, n_patches)
    assert int(out["mask"].sum(1)[0]) == n_patches - int(n_patches * 0.25)
    for key in ("mae", "alignment", "balance"):
        assert out[key].dim() == 0 and torch.isfinite(out[key])
    assert len(out["routing"]) == 3
    assert out["routing"][0]["indices"].shape == (2, 2)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_downstream_shapes(spatial_dims):
    size = (32,) * spatial_dims
    x = torch.rand(2, 1, *size)
    for mode in ("experts", "director"):
        unetr = DEXUNETR(1, 3, 32, 16, spatial_dims=spatial_dims, num_layers=4, num_experts=4, mode=mode, **TINY)
        assert unetr(x).shape == (2, 3, *size)
        classifier = DEXClassifier(1, 5, 32, 8, spatial_dims=spatial_dims, num_layers=2, num_experts=4, mode=mode, **TINY)
        assert classifier(x).shape == (2, 5)
    encoder = DEXViT(1, 32, 8, spatial_dims=spatial_dims, num_layers=2, num_experts=4, **TINY)
    tokens, hidden = encoder(x)
    n = (32 // 8) ** spatial_dims
    assert tokens.shape == (2, 1 + n, 48) and len(hidden) == 2 and hidden[0].shape == (2, 1 + n, 48)


def test_unetr_patch_8_has_three_stages():
    net = DEXUNETR(1, 2, 64, 8, spatial_dims=2, num_layers=4, num_experts=4, **TINY)
    assert net.stages == 3 and net.skip_layers == [1, 2]
    assert net(torch.rand(1, 1, 64, 64)).shape == (1, 2, 64, 64)


def test_patchify_round_trip_3d():
    images = torch.rand(2, 2, 16, 8, 24)
    patches = patchify(images, (4, 4, 8))
    assert patches.shape == (2, 4 * 2 * 3, 4 * 4 * 8 * 2)
    assert torch.equal(unpatchify(patches, (4, 4, 8), (16, 8, 24), 2), images)


def test_gates_sum_to_one_over_chosen_k():
    router = NoisyTopKRouter(16, num_experts=6, top_k=3, routing="token").train()
    router.noise_std = 1.0
    out = router(torch.randn(4, 5, 16))
    assert out.gates.shape == (4, 5, 3) and out.indices.shape == (4, 5, 3)
    torch.testing.assert_close(out.gates.sum(-1), torch.ones(4, 5))
    assert (out.gates >= 0).all()
    assert all(len(set(row.tolist())) == 3 for row in out.indices.reshape(-1, 3))


def test_noise_only_in_training():
    router = NoisyTopKRouter(16, num_experts=8, top_k=2)
    router.noise_std = 5.0
    x = torch.randn(64, 3, 16)
    router.eval()
    clean = router(x)
    again = router(x)
    assert torch.equal(clean.indices, again.indices) and torch.equal(clean.probs, again.probs)
    expected = torch.softmax(router.gate(x[:, :1]) / router.tau, dim=-1)
    torch.testing.assert_close(clean.probs, expected)
    router.train()
    noisy = router(x)
    assert not torch.allclose(noisy.probs, clean.probs)


def test_router_exploration_term_uses_load():
    router = NoisyTopKRouter(4, num_experts=2, top_k=1).train()
    with torch.no_grad():
        router.gate.weight.zero_()
        router.expert_load.copy_(torch.tensor([1.0, 0.0]))  # expert 0 over-used -> bonus 0, expert 1 bonus 1
    router.noise_std = 1.0
    torch.manual_seed(0)
    picks = router(torch.randn(4000, 2, 4)).indices.flatten()
    # with the +1 bonus, expert 1 wins whenever N1 + 1 > N0: P = Phi(1 / sqrt(2)) ~ 0.76
    assert 0.72 < (picks == 1).float().mean().item() < 0.80


def test_balance_loss_known_cases():
    router = NoisyTopKRouter(4, num_experts=4, top_k=2).eval()
    with torch.no_grad():
        router.gate.weight.zero_()
    # uniform probabilities: importance 1/E each, loss = E * E * (1/E)^2 = 1
    assert router(torch.randn(3, 2, 4)).balance_loss.item() == pytest.approx(1.0)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[100.0, 0, 0, 0]] + [[0.0] * 4] * 3))
    x = torch.zeros(3, 2, 4)
    x[:, 0, 0] = 1.0  # every image sends all its probability to expert 0 -> loss = E
    assert router(x).balance_loss.item() == pytest.approx(4.0, rel=1e-4)


def _naive_experts(experts: StackedExpertMLP, units, gates, indices):
    out = torch.zeros_like(units)
    for u in range(units.shape[0]):
        for k in range(indices.shape[1]):
            e = int(indices[u, k])
            h = F.gelu(units[u] @ experts.linear1_weight[e].T + experts.linear1_bias[e])
            out[u] += gates[u, k] * (h @ experts.linear2_weight[e].T + experts.linear2_bias[e])
    return out


def test_grouped_experts_match_naive_and_traceable_paths():
    experts = StackedExpertMLP(5, 8, 12)
    units = torch.randn(7, 3, 8)
    indices = torch.stack([torch.randperm(5)[:2] for _ in range(7)])
    gates = torch.softmax(torch.randn(7, 2), -1)
    grouped = experts(units, gates, indices)
    torch.testing.assert_close(grouped, _naive_experts(experts, units, gates, indices))
    torch.testing.assert_close(experts._forward_gathered(units, gates, indices), grouped)


def test_identical_experts_reproduce_the_director():
    layer = DEXLayer(16, 32, num_experts=4, top_k=2, mode="experts").eval()
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x), layer.director(x))


def test_gema_matches_formula_on_hand_made_case():
    layer = DEXLayer(4, 6, num_experts=3, top_k=2, mode="pretrain").train()
    with torch.no_grad():
        for e in range(3):
            layer.experts.linear1_weight[e].fill_(float(e + 1))
            layer.experts.linear1_bias[e].fill_(10.0 * (e + 1))
        layer.director.linear1.weight.fill_(0.5)
        layer.director.linear1.bias.fill_(-1.0)
    gates = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    indices = torch.tensor([[0, 2], [2, 1]])
    # expert mass: e0 = 0.75, e1 = 0.5, e2 = 0.75 -> weights / 2
    weights = torch.tensor([0.375, 0.25, 0.375])
    m = 0.9
    layer.gema_momentum = m
    layer._update_statistics(gates, indices)
    expected_w = m * 0.5 + (1 - m) * float((weights * torch.tensor([1.0, 2.0, 3.0])).sum())
    expected_b = m * -1.0 + (1 - m) * float((weights * torch.tensor([10.0, 20.0, 30.0])).sum())
    torch.testing.assert_close(layer.director.linear1.weight, torch.full((6, 4), expected_w), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.director.linear1.bias, torch.full((6,), expected_b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.router.expert_load, 0.01 * weights, atol=1e-6, rtol=1e-5)


def test_alignment_target_is_the_director_before_this_steps_gema():
    torch.manual_seed(0)
    layer = DEXLayer(8, 16, num_experts=4, top_k=2, mode="pretrain").train()
    layer.gema_momentum = 0.0  # the update replaces the director with the experts' weighted mean
    with torch.no_grad():
        layer.experts.linear1_weight.add_(torch.randn_like(layer.experts.linear1_weight))
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        target_before = layer.director(x)
    out = layer(x)
    with torch.no_grad():
        target_after = layer.director(x)
    assert not torch.allclose(target_before, target_after)
    torch.testing.assert_close(layer.alignment_loss, alignment_loss(out, target_before))


def test_statistics_and_gema_frozen_in_eval_mode():
    mae = tiny_mae()
    mae.set_schedule_values(gema_momentum=0.5, noise_std=1.0)
    layer = mae.encoder.blocks[0].dex
    with torch.no_grad():
        layer.experts.linear1_weight.add_(torch.randn_like(layer.experts.linear1_weight))
    director_before = layer.director.linear1.weight.clone()
    load_before = layer.router.expert_load.clone()
    mae.eval()
    mae(torch.rand(2, 3, 32, 32))
    assert torch.equal(layer.director.linear1.weight, director_before)
    assert torch.equal(layer.router.expert_load, load_before)
    mae.train()
    mae(torch.rand(2, 3, 32, 32))
    assert not torch.equal(layer.director.linear1.weight, director_before)
    assert not torch.equal(layer.router.expert_load, load_before)


def test_gradients_reach_experts_and_router_never_director():
    mae = tiny_mae()
    _, out = mae(torch.rand(4, 3, 32, 32))
    (out["mae"] + out["alignment"] + out["balance"]).backward()
    for block in mae.encoder.blocks:
        dex = block.dex
        assert all(not p.requires_grad and p.grad is None for p in dex.director.parameters())
        assert dex.experts.linear1_weight.grad is not None and dex.experts.linear1_weight.grad.abs().sum() > 0
        assert dex.router.gate.weight.grad is not None and dex.router.gate.weight.grad.abs().sum() > 0


def test_fine_tuning_modes_set_trainable_parts():
    net = DEXClassifier(3, 2, 32, 8, num_layers=2, num_experts=4, mode="director", **TINY)
    dex = net.encoder.blocks[0].dex
    assert all(p.requires_grad for p in dex.director.parameters())
    assert not dex.experts.linear1_weight.requires_grad
    net.encoder.set_mode("experts")
    assert dex.experts.linear1_weight.requires_grad and dex.router.gate.weight.requires_grad
    net(torch.rand(2, 3, 32, 32)).sum().backward()
    assert dex.experts.linear1_weight.grad is not None and dex.director.linear1.weight.grad is None


def test_alignment_losses():
    student, teacher = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    p = torch.softmax(teacher / 0.5, -1)
    q = torch.softmax(student, -1)
    expected = -(p * torch.log(q)).sum(-1).mean()
    torch.testing.assert_close(alignment_loss(student, teacher, "soft_ce"), expected)
    torch.testing.assert_close(alignment_loss(student, teacher, "cosine"), 1 - F.cosine_similarity(student, teacher, -1).mean())
    assert alignment_loss(teacher, teacher, "cosine").item() == pytest.approx(0.0, abs=1e-6)


def test_alignment_layer_weighting_divides_by_remaining_depth():
    mae = tiny_mae(num_layers=3)
    mae(torch.rand(2, 3, 32, 32))
    per_layer = torch.stack([blk.dex.alignment_loss for blk in mae.encoder.blocks])
    weighted = mae.encoder.auxiliary_losses(layer_weighting=True)["alignment"]
    torch.testing.assert_close(weighted, (per_layer / torch.tensor([3.0, 2.0, 1.0])).mean())
    torch.testing.assert_close(mae.encoder.auxiliary_losses(layer_weighting=False)["alignment"], per_layer.mean())


def test_schedules_follow_reference_rule():
    import numpy as np

    for depth, lo, hi in [(12, 4, 8), (6, 8, 8), (24, 2, 16), (5, 3, 4)]:
        reference = np.repeat(np.arange(hi, lo - 1, -1), int(np.ceil(depth / (hi - lo + 1))))[:depth].tolist()
        assert expert_schedule(depth, lo, hi) == reference
        reference_k = np.repeat(np.arange(1, 3), int(np.ceil(depth / 2)))[:depth].tolist()
        assert top_k_schedule(depth, 1, 2) == reference_k
    encoder = DEXViT(3, 32, 8, spatial_dims=2, num_layers=4, min_experts=2, max_experts=4, min_top_k=1, max_top_k=2, **TINY)
    assert [b.dex.num_experts for b in encoder.blocks] == [4, 4, 3, 3]
    assert [b.dex.top_k for b in encoder.blocks] == [1, 1, 2, 2]


def test_token_routing():
    mae = tiny_mae(routing="token")
    _, out = mae(torch.rand(2, 3, 32, 32))
    assert out["routing"][0]["indices"].shape == (2, 1 + 4, 2)
    assert torch.isfinite(out["alignment"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_experts=2, top_k=3), "top_k=3 is larger than its number of experts"),
        (dict(spatial_dims=4), "spatial_dims must be 2 or 3"),
        (dict(img_size=30), "not divisible by patch size"),
        (dict(img_size=(32, 32, 32)), "has 3 values but spatial_dims=2"),
        (dict(mode="teacher"), "unknown DEX mode"),
        (dict(routing="pixel"), "unknown routing"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    args = dict(in_channels=3, img_size=32, patch_size=8, spatial_dims=2, num_layers=2, **TINY)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        DEXViT(**args)


def test_wrong_input_size_is_reported():
    net = DEXClassifier(3, 2, 32, 8, num_layers=1, num_experts=2, **TINY)
    with pytest.raises(ValueError, match=r"expects input \[B, C, 32, 32\]"):
        net(torch.rand(1, 3, 48, 48))


def test_bad_masking_ratio():
    with pytest.raises(ValueError, match="masking_ratio"):
        tiny_mae(masking_ratio=1.0)


def test_dense_baseline_has_monai_block_names():
    mae = tiny_mae(dense=True)
    names = mae.state_dict().keys()
    assert "encoder.blocks.0.mlp.linear1.weight" in names and not any(".dex." in n for n in names)
    _, out = mae(torch.rand(2, 3, 32, 32))
    assert out["alignment"].item() == 0.0 and out["routing"] == []


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_grouped_expert_gradients_match_naive_loop(dropout):
    torch.manual_seed(3)
    experts = StackedExpertMLP(4, 8, 12, dropout_rate=dropout).double()
    if dropout:
        experts.eval()  # dropout inactive: the hand-written kernel must still agree; in train mode autograd is used
    units = torch.randn(6, 3, 8, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([[0, 2], [2, 0], [0, 1], [2, 1], [0, 2], [1, 0]])  # expert 3 unused: zero gradient
    gates = torch.softmax(torch.randn(6, 2, dtype=torch.float64), -1).requires_grad_()
    grouped = experts(units, gates, indices)
    grads = torch.autograd.grad(grouped.pow(2).sum(), [units, gates, *experts.parameters()])
    naive = _naive_experts(experts, units, gates, indices)
    expected = torch.autograd.grad(naive.pow(2).sum(), [units, gates, *experts.parameters()])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    assert grads[2][3].abs().sum() == 0
    torch.autograd.gradcheck(
        lambda u, g: experts(u, g, indices), (units.detach().requires_grad_(), gates.detach().requires_grad_())
    )


def test_meta_tensor_input_from_monai_pipelines():
    from monai.data import MetaTensor

    net = DEXClassifier(3, 3, 32, 16, num_layers=2, num_experts=4, **TINY)
    batch = MetaTensor(torch.rand(2, 3, 32, 32))
    for training in (True, False):
        net.train(training)
        assert net(batch).shape == (2, 3)
    unetr = DEXUNETR(1, 2, 32, 16, spatial_dims=2, num_layers=4, num_experts=4, **TINY)
    assert unetr(MetaTensor(torch.rand(2, 1, 32, 32))).shape == (2, 2, 32, 32)
