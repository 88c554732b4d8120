"""DEX invariants that a quick test could miss: where gradients come from, every tensor GEMA touches, the balance
loss's stop-gradient, schedules reaching every layer through the bundle handlers, and the MAE loss by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dex_monai.networks import DEXLayer, DEXMaskedAutoEncoder, NoisyTopKRouter

TINY = dict(hidden_size=48, mlp_dim=96, num_heads=4)


def _mae(**kwargs) -> DEXMaskedAutoEncoder:
    args = dict(in_channels=3, img_size=32, patch_size=8, spatial_dims=2, num_layers=3, num_experts=4, top_k=2,
                decoder_hidden_size=24, decoder_mlp_dim=48, decoder_num_layers=1, decoder_num_heads=4, **TINY)
    args.update(kwargs)
    return DEXMaskedAutoEncoder(**args)


def test_router_learns_from_the_task_loss_alone():
    """The gates weight the experts' outputs, so the reconstruction loss alone must reach every router (detaching the
    gates from the task would leave the routers trained by the balance loss only)."""
    torch.manual_seed(0)
    mae = _mae()
    with torch.no_grad():  # distinct experts, otherwise the gate weighting has no effect on the output
        for block in mae.encoder.blocks:
            block.dex.experts.linear2_weight.add_(0.1 * torch.randn_like(block.dex.experts.linear2_weight))
    _, out = mae(torch.rand(4, 3, 32, 32))
    out["mae"].backward()
    for block in mae.encoder.blocks:
        grad = block.dex.router.gate.weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_gema_updates_all_four_director_tensors_from_distinct_experts():
    torch.manual_seed(1)
    layer = DEXLayer(6, 10, num_experts=3, top_k=2, mode="pretrain").train()
    names = ("linear1_weight", "linear1_bias", "linear2_weight", "linear2_bias")
    with torch.no_grad():
        for name in names:
            getattr(layer.experts, name).copy_(torch.randn_like(getattr(layer.experts, name)))
        for p in layer.director.parameters():
            p.copy_(torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in layer.director.named_parameters()}
    experts = {n: getattr(layer.experts, n).detach().clone() for n in names}
    gates = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.5, 0.5]])
    indices = torch.tensor([[0, 1], [2, 0], [1, 2]])
    mass = [0.6 + 0.1, 0.4 + 0.5, 0.9 + 0.5]  # expert 0, 1, 2, summed by hand
    weights = [m / sum(mass) for m in mass]
    m = 0.8
    layer.gema_momentum = m
    layer._update_statistics(gates, indices)
    for director_name, expert_name in (("linear1.weight", "linear1_weight"), ("linear1.bias", "linear1_bias"),
                                       ("linear2.weight", "linear2_weight"), ("linear2.bias", "linear2_bias")):
        expected = m * before[director_name] + (1 - m) * sum(w * experts[expert_name][e] for e, w in enumerate(weights))
        torch.testing.assert_close(dict(layer.director.named_parameters())[director_name], expected,
                                   atol=1e-5, rtol=1e-5)


def test_balance_loss_gradient_has_the_stop_gradient():
    """``E * sum(imp * stop_grad(imp))``: d/d imp = E * imp, half of what ``E * sum(imp ** 2)`` would give."""
    torch.manual_seed(2)
    router = NoisyTopKRouter(5, num_experts=4, top_k=2, tau=1.0).eval()
    x = torch.randn(6, 3, 5)
    out = router(x)
    grad_auto = torch.autograd.grad(out.balance_loss, router.gate.weight)[0]
    # by hand: probs = softmax(W cls), importance = mean probs; dL/dprobs_b = E * importance / B
    cls = x[:, 0]
    bias = 0.0 if router.gate.bias is None else router.gate.bias.detach()
    probs = torch.softmax(cls @ router.gate.weight.detach().T + bias, -1)
    importance = probs.mean(0)
    upstream = 4 * importance.expand_as(probs) / probs.shape[0]
    jac_term = probs * (upstream - (upstream * probs).sum(-1, keepdim=True))  # softmax backward
    grad_hand = jac_term.T @ cls
    torch.testing.assert_close(grad_auto, grad_hand, atol=1e-6, rtol=1e-5)


def test_schedule_handlers_reach_every_dex_layer():
    from ignite.engine import Engine, Events

    from dex_monai.handlers import GEMAMomentumScheduleHandler, RouterNoiseScheduleHandler

    mae = _mae(num_layers=3)
    engine = Engine(lambda e, b: None)
    GEMAMomentumScheduleHandler(mae, start=0.9, end=0.99).attach(engine)
    RouterNoiseScheduleHandler(mae, start=1.0, end=0.0).attach(engine)
    seen = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(
        [(b.dex.gema_momentum, b.dex.noise_std) for b in mae.encoder.blocks]))
    engine.run([0] * 4, max_epochs=1)
    for i, layers in enumerate(seen):  # value at progress i / 4 of a half cosine
        gema = 0.99 + 0.5 * (0.9 - 0.99) * (1 + np.cos(np.pi * i / 4))
        noise = 0.5 * (1 + np.cos(np.pi * i / 4))
        assert len(layers) == 3
        for g, n in layers:
            assert g == pytest.approx(gema) and n == pytest.approx(noise)


def test_mae_loss_with_norm_pix_by_hand():
    """Mean over hidden patches of the squared error against each target patch normalised by its own mean and
    (unbiased) variance, computed here in image space block by block."""
    torch.manual_seed(3)
    mae = _mae(norm_pix_loss=True).eval()
    images = torch.rand(2, 3, 32, 32)
    recon, out = mae(images, masking_ratio=0.5)
    mask = out["mask"].numpy()
    img, rec = images.numpy().astype(np.float64), recon.detach().numpy().astype(np.float64)
    total, count = 0.0, 0.0
    for b in range(2):
        for i in range(4):
            for j in range(4):
                block = img[b, :, 8 * i:8 * i + 8, 8 * j:8 * j + 8]
                target = (block - block.mean()) / np.sqrt(block.var(ddof=1) + 1e-6)
                err = ((rec[b, :, 8 * i:8 * i + 8, 8 * j:8 * j + 8] - target) ** 2).mean()
                total += err * mask[b, 4 * i + j]
                count += mask[b, 4 * i + j]
    assert count == 16  # half of the 2 x 16 patches hidden
    assert out["mae"].item() == pytest.approx(total / count, rel=1e-5)
