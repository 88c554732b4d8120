"""The last differences from the DEX public code: LayerNorm eps, patch-kernel resampling, the expert schedule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.bundle import ConfigParser

from dex_monai.networks import (
    DEXClassifier,
    DEXMaskedAutoEncoder,
    DEXUNETR,
    DEXViT,
    adapt_patch_kernel,
    expert_schedule,
    load_encoder_weights,
)

REPO = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=48, mlp_dim=96, num_heads=4, num_layers=2, num_experts=3)
DECODER = dict(decoder_hidden_size=24, decoder_mlp_dim=48, decoder_num_layers=2, decoder_num_heads=4)


def _networks(eps: float | None) -> dict[str, nn.Module]:
    kw = {} if eps is None else {"layer_norm_eps": eps}
    return {
        "vit2d": DEXViT(3, 32, 8, spatial_dims=2, **TINY, **kw),
        "vit_dense3d": DEXViT(1, 16, 8, spatial_dims=3, dense=True, **TINY, **kw),
        "vit_m4oe": DEXViT(1, 32, 8, spatial_dims=2, mlp_type="m4oe", modalities=("CT", "MR"), **TINY, **kw),
        "mae2d_umd": DEXMaskedAutoEncoder(
            3, 32, 8, spatial_dims=2, feature_reconstruction_weight=1.0, **TINY, **DECODER, **kw
        ),
        "mae3d": DEXMaskedAutoEncoder(1, 16, 8, spatial_dims=3, **TINY, **DECODER, **kw),
        "unetr2d": DEXUNETR(1, 2, 32, 8, spatial_dims=2, **TINY, **kw),
        "unetr3d": DEXUNETR(1, 2, 16, 8, spatial_dims=3, **TINY, **kw),
        "classifier": DEXClassifier(3, 4, 32, 8, spatial_dims=2, **TINY, **kw),
    }


def _norms(model: nn.Module) -> list[nn.LayerNorm]:
    return [m for m in model.modules() if isinstance(m, nn.LayerNorm)]


def test_every_layer_norm_takes_the_requested_eps():
    for name, net in _networks(1e-6).items():
        norms = _norms(net)
        # 2 per encoder block + the final norm; the MAE adds 3 per MONAI decoder block (cross-attention norm
        # included) + decoder_norm, and the UMD teacher is a copy of the encoder
        expected = 2 * 2 + 1
        if name.startswith("mae"):
            expected += 3 * 2 + 1 + (5 if name.endswith("umd") else 0)
        assert len(norms) == expected, name
        assert {m.eps for m in norms} == {1e-6}, name
    for name, net in _networks(None).items():
        assert {m.eps for m in _norms(net)} == {1e-5}, name  # default unchanged: earlier checkpoints behave the same


def test_eps_reaches_every_norm_in_the_forward_pass():
    """Every LayerNorm's output (MONAI decoder blocks included) equals F.layer_norm computed here with eps 1e-6;
    with the CLS token's variance set to 1e-6 the two eps values differ by sqrt(11/2) in the normalised scale."""
    torch.manual_seed(0)
    mae = DEXMaskedAutoEncoder(3, 32, 8, spatial_dims=2, layer_norm_eps=1e-6, **TINY, **DECODER)
    checked: list[str] = []

    def check(name):
        def hook(module, inputs, output):
            x = inputs[0]
            expected = F.layer_norm(x, module.normalized_shape, module.weight, module.bias, eps=1e-6)
            torch.testing.assert_close(output, expected, atol=1e-6, rtol=1e-5)
            checked.append(name)
        return hook

    handles = [m.register_forward_hook(check(n)) for n, m in mae.named_modules() if isinstance(m, nn.LayerNorm)]
    mae(torch.rand(2, 3, 32, 32))
    for h in handles:
        h.remove()
    used = {n for n, m in mae.named_modules() if isinstance(m, nn.LayerNorm) and "norm_cross_attn" not in n}
    assert set(checked) == used  # every norm the forward uses ran with eps 1e-6

    # a token of variance v = 1e-6 (as a CLS token can have): normalised by 1/sqrt(v + eps)
    d = 48
    cls = torch.tensor([1.0, -1.0] * (d // 2)) * 1e-3  # mean 0, variance exactly 1e-6
    tokens = cls.view(1, 1, d)
    scales = {}
    for eps in (1e-5, 1e-6):
        norm = DEXViT(3, 32, 8, spatial_dims=2, layer_norm_eps=eps, **TINY).blocks[0].norm1
        scales[eps] = norm(tokens).std(unbiased=False).item()
    assert scales[1e-6] / scales[1e-5] == pytest.approx(np.sqrt((1e-6 + 1e-5) / (1e-6 + 1e-6)), rel=1e-4)


def _reference_mae_layout(source: DEXViT) -> dict[str, torch.Tensor]:
    """A dense encoder's weights in the MAE / DEX reference layout (timm names, CLS row in ``pos_embed``)."""
    state = {k.replace(".mlp.linear", ".mlp.fc"): v for k, v in source.state_dict().items()}
    state["patch_embed.proj.weight"] = state.pop("patch_embedding.patch_embeddings.weight")
    state["patch_embed.proj.bias"] = state.pop("patch_embedding.patch_embeddings.bias")
    pos = state.pop("patch_embedding.position_embeddings")
    state["pos_embed"] = torch.cat([torch.zeros(1, 1, pos.shape[-1]), pos], 1)
    return state


def test_reference_checkpoint_conversion_notes_or_sets_eps_and_package_checkpoints_keep_it():
    source = DEXViT(3, 32, 8, spatial_dims=2, dense=True, **TINY)
    reference = _reference_mae_layout(source)
    target = DEXViT(3, 32, 8, spatial_dims=2, **TINY)
    report = load_encoder_weights(target, {"model": reference}, reference_layer_norm_eps=1e-6)
    assert report.ok, report.summary()
    assert {m.eps for m in _norms(target)} == {1e-6}
    untouched = DEXViT(3, 32, 8, spatial_dims=2, **TINY)  # by default left as built (train and inference agree)
    report = load_encoder_weights(untouched, {"model": reference})
    assert {m.eps for m in _norms(untouched)} == {1e-5}
    assert any("use LayerNorm eps 1e-06, this network 1e-05" in n for n in report.notes)
    paper = DEXViT(3, 32, 8, spatial_dims=2, layer_norm_eps=1e-6, **TINY)
    assert not any("eps" in n for n in load_encoder_weights(paper, {"model": reference}).notes)
    own = DEXViT(3, 32, 8, spatial_dims=2, **TINY)
    load_encoder_weights(own, source.state_dict())
    assert {m.eps for m in _norms(own)} == {1e-5}


@pytest.mark.parametrize("bundle", ["dex_seg2d", "dex_seg3d", "dex_classification", "dex_pretrain"])
def test_paper_configs_use_reference_eps(bundle):
    configs = REPO / "bundles" / bundle / "configs"
    for files, eps in ((["train.json"], 1e-5), (["train.json", "vit_base_paper.json"], 1e-6)):
        parser = ConfigParser()
        parser.read_config([str(configs / f) for f in files])
        assert parser.get_parsed_content("network_def#layer_norm_eps") == eps
    if (configs / "inference.json").is_file():
        parser = ConfigParser()
        parser.read_config([str(configs / "inference.json"), str(configs / "vit_base_paper.json")])
        assert parser.get_parsed_content("network_def#layer_norm_eps") == 1e-6
    assert json.loads((configs / "train.json").read_text())  # still valid JSON


def _keys_bicubic_1d(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """``[n_out, n_in]`` matrix of Keys cubic convolution (a = -0.75), half-pixel centres, edge samples repeated:
    the bicubic resize written out from its definition."""

    def kernel(s: float) -> float:
        s = abs(s)
        if s <= 1:
            return (a + 2) * s**3 - (a + 3) * s**2 + 1
        if s < 2:
            return a * s**3 - 5 * a * s**2 + 8 * a * s - 4 * a
        return 0.0

    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = (i + 0.5) * n_in / n_out - 0.5
        base = int(np.floor(x))
        for j in range(base - 1, base + 3):
            m[i, min(max(j, 0), n_in - 1)] += kernel(x - j)
    return m


@pytest.mark.parametrize("src,dst", [(8, 16), (16, 8), (14, 16)])
def test_patch_kernel_resampling_is_bicubic_with_the_sum_kept(src, dst):
    """The reference resizes a patch kernel of another size bicubically; the adapter does the same resize, then
    scales by the area ratio and spreads the remaining sum difference evenly (a constant image embeds the same)."""
    torch.manual_seed(0)
    w = torch.randn(6, 3, src, src, dtype=torch.float64)
    m = _keys_bicubic_1d(src, dst)
    reference = np.einsum("ij,dcjk,lk->dcil", m, w.numpy(), m)  # the reference's F.interpolate(bicubic) resize
    adapted, notes = adapt_patch_kernel(w, (6, 3, dst, dst))
    assert notes == [f"kernel resampled ({src}, {src}) -> ({dst}, {dst}) (bicubic)"]
    scaled = reference * (src * src) / (dst * dst)
    offset = (w.numpy().sum(axis=(2, 3)) - scaled.sum(axis=(2, 3))) / (dst * dst)
    np.testing.assert_allclose(adapted.numpy(), scaled + offset[..., None, None], atol=2e-6)  # float32 inside
    np.testing.assert_allclose(adapted.numpy().sum(axis=(2, 3)), w.numpy().sum(axis=(2, 3)), atol=1e-4)


def test_reference_checkpoint_of_another_patch_size_is_resampled_on_load():
    """A timm-layout (reference) checkpoint with patch 8 loads into a patch-16 network through the adapter."""
    state = _reference_mae_layout(DEXViT(3, 64, 8, spatial_dims=2, dense=True, **TINY))
    target = DEXClassifier(3, 2, 64, 16, spatial_dims=2, **TINY)
    report = load_encoder_weights(target, {"model": state})
    assert report.ok, report.summary()
    assert any("kernel resampled (8, 8) -> (16, 16) (bicubic)" in n for n in report.notes)
    w = state["patch_embed.proj.weight"].double()
    m = _keys_bicubic_1d(8, 16)
    expected = np.einsum("ij,dcjk,lk->dcil", m, w.numpy(), m) / 4
    expected += ((w.numpy().sum(axis=(2, 3)) - expected.sum(axis=(2, 3))) / 256)[..., None, None]
    np.testing.assert_allclose(target.encoder.patch_embedding.patch_embeddings.weight.detach().numpy(), expected,
                               atol=1e-5)


def test_expert_schedule_is_cut_short_as_in_the_reference():
    # ceil(4 / (8 - 6 + 1)) = 2 repeats of 8, 7, 6 cut to 4 layers: the minimum 6 is never reached
    assert expert_schedule(4, 6, 8) == [8, 8, 7, 7]
    assert expert_schedule(12, 4, 8) == [8, 8, 8, 7, 7, 7, 6, 6, 6, 5, 5, 5]
    assert expert_schedule(3, 2, 2) == [2, 2, 2]


def test_director_fine_tuning_trains_the_director():
    """Unlike the public code (director forward under no_grad), ``mode="director"`` gives the director gradients."""
    torch.manual_seed(0)
    net = DEXClassifier(3, 2, 32, 8, spatial_dims=2, mode="director", **TINY)
    director = net.encoder.blocks[0].dex.director
    before = director.linear1.weight.detach().clone()
    optimiser = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    F.cross_entropy(net(torch.rand(4, 3, 32, 32)), torch.tensor([0, 1, 0, 1])).backward()
    assert director.linear1.weight.grad is not None and director.linear1.weight.grad.abs().sum() > 0
    optimiser.step()
    assert not torch.equal(director.linear1.weight, before)
