"""Weight conversion: dense <-> DEX, reference layouts, MONAI export, clear reports."""

from __future__ import annotations

import re

import pytest
import torch
from monai.networks.nets import UNETR, MaskedAutoEncoderViT, ViT

from dex_monai.networks import (
    DEXClassifier,
    DEXMaskedAutoEncoder,
    DEXUNETR,
    DEXViT,
    export_to_monai,
    load_encoder_weights,
)
from dex_monai.networks.convert import canonical_state_dict, read_state_dict

TINY = dict(hidden_size=48, mlp_dim=96, num_heads=4)


class ArbitraryObject:
    """Not a tensor: ``weights_only`` loading must refuse to unpickle it."""


def _dense_vit() -> ViT:
    return ViT(3, 32, 8, num_layers=3, classification=True, spatial_dims=2, qkv_bias=True, **TINY).eval()


def test_round_trip_dense_to_dex_to_director_export_is_exact():
    dense = _dense_vit()
    dex = DEXViT(3, 32, 8, spatial_dims=2, num_layers=3, num_experts=4, top_k=2, mode="experts", **TINY).eval()
    report = load_encoder_weights(dex, dense.state_dict())
    assert report.ok and any("routers" in n for n in report.notes)
    assert all(".dex.router." in k for k in report.newly_initialised)
    x = torch.randn(2, 3, 32, 32)
    _, dense_hidden = dense(x)
    _, dex_hidden = dex(x)  # identical experts with gates summing to one give the dense MLP back
    for a, b in zip(dense_hidden, dex_hidden):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    exported = ViT(3, 32, 8, num_layers=3, classification=True, spatial_dims=2, qkv_bias=True, **TINY).eval()
    export_report = export_to_monai(dex, exported)
    assert export_report.missing == ["classification_head.0.weight", "classification_head.0.bias"]
    exported.classification_head.load_state_dict(dense.classification_head.state_dict())
    out_a, hidden_a = dense(x)
    out_b, hidden_b = exported(x)
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(a, b) for a, b in zip(hidden_a, hidden_b))


def test_monai_mae_checkpoint_into_dex_mae():
    monai_mae = MaskedAutoEncoderViT(
        3, 32, 8, num_layers=2, spatial_dims=2, decoder_hidden_size=24, decoder_mlp_dim=48, decoder_num_layers=1,
        decoder_num_heads=4, qkv_bias=True, **TINY,
    )
    dex = DEXMaskedAutoEncoder(
        3, 32, 8, spatial_dims=2, num_layers=2, num_experts=3, decoder_hidden_size=24, decoder_mlp_dim=48,
        decoder_num_layers=1, decoder_num_heads=4, **TINY,
    )
    report = load_encoder_weights(dex, {"model": monai_mae.state_dict()})
    assert report.ok, report.summary()
    assert any("final LayerNorm" in n for n in report.notes)
    torch.testing.assert_close(dex.encoder.norm.weight, monai_mae.blocks[2].weight)
    torch.testing.assert_close(dex.decoder_norm.weight, monai_mae.decoder_blocks[1].weight)
    torch.testing.assert_close(dex.mask_token, monai_mae.mask_tokens)
    for e in range(3):
        torch.testing.assert_close(dex.encoder.blocks[1].dex.experts.linear2_weight[e], monai_mae.blocks[1].mlp.linear2.weight)


def _reference_dex_state(model: DEXViT) -> dict[str, torch.Tensor]:
    """This model's weights renamed into the DEX public code's layout (timm names, one module per expert)."""
    out = {"cls_token": model.cls_token, "norm.weight": model.norm.weight, "norm.bias": model.norm.bias}
    out["patch_embed.proj.weight"] = model.patch_embedding.patch_embeddings.weight
    out["patch_embed.proj.bias"] = model.patch_embedding.patch_embeddings.bias
    pos = model.patch_embedding.position_embeddings
    out["pos_embed"] = torch.cat([torch.zeros(1, 1, pos.shape[-1]), pos], 1)
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}."
        for name in ("norm1", "norm2"):
            out[p + name + ".weight"] = getattr(block, name).weight
            out[p + name + ".bias"] = getattr(block, name).bias
        out[p + "attn.qkv.weight"], out[p + "attn.qkv.bias"] = block.attn.qkv.weight, block.attn.qkv.bias
        out[p + "attn.proj.weight"], out[p + "attn.proj.bias"] = block.attn.out_proj.weight, block.attn.out_proj.bias
        dex = block.dex
        out[p + "DEX.director.fc1.weight"] = dex.director.linear1.weight
        out[p + "DEX.director.fc1.bias"] = dex.director.linear1.bias
        out[p + "DEX.director.fc2.weight"] = dex.director.linear2.weight
        out[p + "DEX.director.fc2.bias"] = dex.director.linear2.bias
        for e in range(dex.num_experts):
            out[p + f"DEX.experts.{e}.fc1.weight"] = dex.experts.linear1_weight[e]
            out[p + f"DEX.experts.{e}.fc1.bias"] = dex.experts.linear1_bias[e]
            out[p + f"DEX.experts.{e}.fc2.weight"] = dex.experts.linear2_weight[e]
            out[p + f"DEX.experts.{e}.fc2.bias"] = dex.experts.linear2_bias[e]
        out[p + "DEX.router.linear.weight"] = dex.router.gate.weight
        out[p + "DEX.expert_activation_count"] = dex.router.expert_load
    return {k: v.detach().clone() for k, v in out.items()}


def test_reference_dex_layout_loads_into_classifier():
    # the reference models' LayerNorms use eps 1e-6: the classifier is built with it (as the paper configs do)
    source = DEXViT(3, 32, 8, spatial_dims=2, num_layers=2, num_experts=4, layer_norm_eps=1e-6, **TINY)
    with torch.no_grad():
        for block in source.blocks:
            block.dex.experts.linear1_weight.add_(torch.randn_like(block.dex.experts.linear1_weight))
    classifier = DEXClassifier(3, 2, 32, 8, spatial_dims=2, num_layers=2, num_experts=4, layer_norm_eps=1e-6,
                               **TINY).eval()
    report = load_encoder_weights(classifier, {"model": _reference_dex_state(source)})
    assert report.ok, report.summary()
    assert set(report.newly_initialised) == {"head.1.weight", "head.1.bias"}
    assert not any("eps" in n for n in report.notes)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(classifier.encoder(x)[0], source.eval()(x)[0])


def test_pretraining_checkpoint_into_unetr_through_director(tmp_path):
    mae = DEXMaskedAutoEncoder(
        1, 32, 16, spatial_dims=3, num_layers=4, num_experts=3, decoder_hidden_size=24, decoder_mlp_dim=48,
        decoder_num_layers=1, decoder_num_heads=4, **TINY,
    )
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": mae.state_dict(), "iteration": torch.tensor(5)}, path)
    unetr = DEXUNETR(1, 2, 32, 16, spatial_dims=3, num_layers=4, num_experts=3, mode="director", **TINY)
    report = load_encoder_weights(unetr, path)
    assert report.ok
    assert any("MAE-decoder" in n for n in report.notes)
    assert all(not k.startswith("vit.") for k in report.newly_initialised)
    torch.testing.assert_close(unetr.vit.blocks[2].dex.director.linear1.weight, mae.encoder.blocks[2].dex.director.linear1.weight)
    monai_unetr = UNETR(1, 2, 32, feature_size=16, qkv_bias=True, **TINY)
    with pytest.raises(ValueError, match="does not fit"):
        load_encoder_weights(DEXUNETR(1, 2, 32, 16, spatial_dims=3, num_layers=4, num_experts=5, **TINY), path)
    # a 4-layer encoder does not fill MONAI's 12-layer UNETR: reported, not hidden
    export = export_to_monai(unetr, monai_unetr, strict=False)
    assert "vit.cls_token" in export.unexpected
    assert any(k.startswith("vit.blocks.11.") for k in export.missing)


def test_mismatch_names_keys_and_file(tmp_path):
    path = tmp_path / "wide.pt"
    torch.save(DEXViT(3, 32, 8, spatial_dims=2, num_layers=2, hidden_size=64, mlp_dim=96, num_heads=4).state_dict(), path)
    target = DEXViT(3, 32, 8, spatial_dims=2, num_layers=2, **TINY)
    with pytest.raises(ValueError) as info:
        load_encoder_weights(target, path)
    message = str(info.value)
    assert str(path) in message and "mismatched" in message and "blocks.0.attn.qkv.weight" in message
    report = load_encoder_weights(target, path, strict=False)
    assert not report.ok and report.mismatched


def test_unreadable_and_pickled_checkpoints_are_refused(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        read_state_dict(missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        read_state_dict(garbage)
    pickled = tmp_path / "object.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "obj": ArbitraryObject()}, pickled)
    with pytest.raises(ValueError, match="object.pt"):
        read_state_dict(pickled)  # weights_only=True refuses arbitrary objects


def test_canonical_names_of_reference_mae():
    state = {
        "patch_embed.proj.weight": torch.zeros(48, 3, 8, 8),
        "pos_embed": torch.zeros(1, 17, 48),
        "blocks.0.attn.proj.weight": torch.zeros(48, 48),
        "blocks.0.mlp.fc1.weight": torch.zeros(96, 48),
        "decoder_pos_embed": torch.zeros(1, 17, 24),
        "mask_token": torch.zeros(1, 1, 24),
        "decoder_blocks.0.mlp.fc2.bias": torch.zeros(24),
    }
    encoder, decoder, other, _ = canonical_state_dict(state)
    assert set(encoder) == {
        "patch_embedding.patch_embeddings.weight",
        "patch_embedding.position_embeddings",
        "blocks.0.attn.out_proj.weight",
        "blocks.0.mlp.linear1.weight",
    }
    assert encoder["patch_embedding.position_embeddings"].shape == (1, 16, 48)
    assert set(decoder) == {"decoder_pos_embedding", "mask_token", "decoder_blocks.0.mlp.linear2.bias"}
    assert not other
    assert all(not re.search(r"\bfc\d", k) for k in list(encoder) + list(decoder))


def _embed(conv: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return conv(x)


def test_2d_rgb_encoder_inflates_into_3d_grey_unetr_along_the_slicing_axis(tmp_path):
    """Pre-training slices volumes along the last spatial axis (ExtractSlice axis=2), so a volume constant along that
    axis must embed exactly like its 2D slice (grey replicated into RGB), through every loading path: the network
    loader, the fine-tuning initialisation from a checkpoint file, and the adapter itself."""
    from dex_monai.engines.initialise import initialise_network
    from dex_monai.networks import adapt_patch_kernel

    source = DEXViT(3, 32, 16, spatial_dims=2, num_layers=4, num_experts=3, **TINY)
    conv2d = source.patch_embedding.patch_embeddings
    slice_2d = torch.rand(1, 1, 32, 32)
    volume = slice_2d.unsqueeze(-1).repeat(1, 1, 1, 1, 16)  # [B, C, X, Y, Z], constant along Z
    expected = _embed(conv2d, slice_2d.repeat(1, 3, 1, 1))  # [B, D, 2, 2]

    direct = DEXUNETR(1, 2, 32, 16, spatial_dims=3, num_layers=4, num_experts=3, **TINY)
    report = load_encoder_weights(direct, source.state_dict())
    assert report.ok and any("inflated to 3D along spatial axis 2" in n for n in report.notes)
    assert any("position_embeddings" in n for n in report.notes)  # the 3D grid keeps its own sin-cos table

    torch.save({"model": source.state_dict()}, tmp_path / "model.pt")
    bundle = DEXUNETR(1, 2, 32, 16, spatial_dims=3, num_layers=4, num_experts=3, **TINY)
    initialise_network(bundle, "dex", tmp_path)

    weight, _ = adapt_patch_kernel(conv2d.weight, tuple(direct.vit.patch_embedding.patch_embeddings.weight.shape))
    for net in (direct, bundle):
        out3d = _embed(net.vit.patch_embedding.patch_embeddings, volume)[..., 0]  # [B, D, 2, 2]
        torch.testing.assert_close(out3d, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(net.vit.patch_embedding.patch_embeddings.weight, weight)
    # along the first axis it is a different kernel: the old inflation axis no longer holds
    across = slice_2d.unsqueeze(2).repeat(1, 1, 16, 1, 1)
    assert not torch.allclose(_embed(direct.vit.patch_embedding.patch_embeddings, across)[:, :, 0], expected, atol=1e-3)


def test_patch_kernel_channels_and_size():
    """Channels are summed and shared: equal-channel images embed as before. Another kernel size is resampled and
    rescaled: a constant image embeds the same."""
    from dex_monai.networks import adapt_patch_kernel

    w = torch.randn(8, 3, 4, 4)
    grey, notes = adapt_patch_kernel(w, (8, 1, 4, 4))
    assert notes == ["input channels 3 -> 1 (kernel summed and shared)"]
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(torch.nn.functional.conv2d(x, grey, stride=4),
                               torch.nn.functional.conv2d(x.repeat(1, 3, 1, 1), w, stride=4))
    rgb, _ = adapt_patch_kernel(grey, (8, 3, 4, 4))
    torch.testing.assert_close(torch.nn.functional.conv2d(x.repeat(1, 3, 1, 1), rgb, stride=4),
                               torch.nn.functional.conv2d(x, grey, stride=4))
    bigger, notes = adapt_patch_kernel(w, (8, 3, 8, 8))
    assert notes == ["kernel resampled (4, 4) -> (8, 8) (bicubic)"]
    ones = torch.ones(1, 3, 8, 8)
    torch.testing.assert_close(torch.nn.functional.conv2d(ones, bigger, stride=8)[..., 0, 0],
                               torch.nn.functional.conv2d(ones[..., :4, :4], w, stride=4)[..., 0, 0],
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="token dimension differs"):
        adapt_patch_kernel(w, (16, 3, 4, 4))