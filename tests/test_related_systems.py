"""M4oE modality experts with gating and UMD options (GM-Coord, multi-level feature reconstruction)."""

from __future__ import annotations

import math

import pytest
import torch

from dex_monai.handlers import GMCoordHandler
from dex_monai.losses import GMCoordLoss, gm_coefficient
from dex_monai.networks import DEXMaskedAutoEncoder, DEXUNETR, DEXViT, ModalityExpertLayer, load_encoder_weights

TINY = dict(hidden_size=48, mlp_dim=96, num_heads=4)
MODALITIES = ("CT", "MR", "X-ray")


def test_paper_gate_weights_sum_to_one_and_mix_experts():
    layer = ModalityExpertLayer(16, 32, MODALITIES, stage="gated", gate="experts")
    with torch.no_grad():
        layer.gate.weight.normal_()
    x = torch.randn(2, 5, 16)
    out = layer(x)
    gates = layer.last_gates
    assert gates.shape == (2, 5, 3)
    torch.testing.assert_close(gates.sum(-1), torch.ones(2, 5))
    per_expert = [layer.experts(x, torch.ones(2, 1), torch.full((2, 1), e)) for e in range(3)]
    expected = sum(gates[..., e : e + 1] * per_expert[e] for e in range(3))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_code_gate_is_channel_softmax_times_sum_of_experts():
    layer = ModalityExpertLayer(16, 32, MODALITIES, stage="gated", gate="channel")
    with torch.no_grad():
        layer.gate.weight.normal_()
    x = torch.randn(2, 4, 16)
    out = layer(x)
    torch.testing.assert_close(layer.last_gates.sum(-1), torch.ones(2, 4))
    total = sum(layer.experts(x, torch.ones(2, 1), torch.full((2, 1), e)) for e in range(3))
    torch.testing.assert_close(out, layer.last_gates * total, atol=1e-5, rtol=1e-5)


def test_expert_stage_routes_each_image_to_its_modality():
    layer = ModalityExpertLayer(16, 32, MODALITIES, stage="expert")
    x = torch.randn(3, 4, 16)
    layer.set_modality_ids(["MR", "CT", "MR"])
    out = layer(x)
    for i, e in enumerate([1, 0, 1]):
        torch.testing.assert_close(out[i : i + 1], layer.experts(x[i : i + 1], torch.ones(1, 1), torch.tensor([[e]])))
    layer.set_modality_ids(None)
    with pytest.raises(ValueError, match="needs the modality of every image"):
        layer(x)
    with pytest.raises(KeyError, match="PET"):
        layer.set_modality_ids(["PET"] * 3)


@pytest.mark.parametrize("gate", ["experts", "channel"])
def test_adding_a_modality_keeps_the_others_outputs(gate):
    encoder = DEXViT(3, 32, 8, spatial_dims=2, num_layers=2, mlp_type="m4oe", modalities=MODALITIES, m4oe_gate=gate,
                     **TINY).eval()
    with torch.no_grad():
        for layer in encoder.m4oe_layers():
            layer.gate.weight.normal_(std=0.1)
    x = torch.randn(3, 3, 32, 32)
    encoder.set_m4oe_stage("gated")
    gated_before = encoder(x)[0]
    encoder.set_m4oe_stage("expert")
    encoder.set_modality_ids(["CT", "X-ray", "MR"])
    expert_before = encoder(x)[0]
    encoder.add_modality("ultrasound", init_from="CT")
    assert all(layer.num_experts == 4 for layer in encoder.m4oe_layers())
    torch.testing.assert_close(encoder(x)[0], expert_before)
    encoder.set_m4oe_stage("gated")
    torch.testing.assert_close(encoder(x)[0], gated_before, atol=1e-5, rtol=1e-5)
    encoder.set_m4oe_stage("expert")
    encoder.set_modality_ids(["ultrasound"] * 3)
    assert torch.isfinite(encoder(x)[0]).all()


def test_m4oe_unetr_initialised_from_dex_pretraining(tmp_path):
    mae = DEXMaskedAutoEncoder(1, 32, 16, spatial_dims=3, num_layers=2, num_experts=3, decoder_hidden_size=24,
                               decoder_mlp_dim=48, decoder_num_layers=1, decoder_num_heads=4, **TINY)
    torch.save({"model": mae.state_dict()}, tmp_path / "dex.pt")
    net = DEXUNETR(1, 2, 32, 16, spatial_dims=3, num_layers=2, mlp_type="m4oe", modalities=MODALITIES, **TINY)
    report = load_encoder_weights(net, tmp_path / "dex.pt")
    assert report.ok, report.summary()
    director = mae.encoder.blocks[1].dex.director.linear1.weight
    for e in range(3):
        torch.testing.assert_close(net.vit.blocks[1].m4oe.experts.linear1_weight[e], director)
    assert any(k.endswith("m4oe.gate.weight") for k in report.newly_initialised)
    assert net(torch.rand(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)


def test_gm_coefficient_formula():
    coefficients = gm_coefficient({"CT": 3.0, "MR": 1.0, "US": 1.0}, alpha=0.5)
    assert coefficients["CT"] == pytest.approx(1 - math.tanh(0.5 * (3.0 / 1.0 - 1)))
    assert coefficients["MR"] == 1.0 and coefficients["US"] == 1.0
    assert gm_coefficient({"CT": 2.0}, alpha=1.0) == {"CT": 1.0}


def test_gm_coord_scales_the_dominant_modalitys_gradient():
    weight = torch.nn.Parameter(torch.ones(1))
    per_item = torch.nn.MSELoss()
    loss = GMCoordLoss(per_item, alpha=1.0, momentum=0.0)
    modalities = ["CT", "CT", "MR", "MR"]
    target = torch.zeros(4, 1)
    x = torch.tensor([[1.0], [1.0], [2.0], [2.0]])
    loss.set_modalities(modalities)
    loss(weight * x, target)  # first batch: status 1 for both
    assert loss.coefficients == {"CT": 1.0, "MR": 1.0}
    # CT's loss falls to a quarter, MR's stays: CT status 4, MR 1 -> CT slowed by 1 - tanh(3)
    x2 = torch.tensor([[0.5], [0.5], [2.0], [2.0]])
    value = loss(weight * x2, target)
    k_ct = 1 - math.tanh(3.0)
    assert loss.coefficients["CT"] == pytest.approx(k_ct) and loss.coefficients["MR"] == 1.0
    value.backward()
    plain_ct = torch.autograd.grad(per_item(weight * x2[:2], target[:2]), weight)[0] * 0.5
    plain_mr = torch.autograd.grad(per_item(weight * x2[2:], target[2:]), weight)[0] * 0.5
    torch.testing.assert_close(weight.grad, k_ct * plain_ct + plain_mr)


def test_gm_coord_handler_feeds_modalities_and_publishes_coefficients():
    from ignite.engine import Engine

    loss = GMCoordLoss(torch.nn.MSELoss(), alpha=0.5)
    model = torch.nn.Linear(2, 1)

    def step(engine, batch):
        value = loss(model(batch["image"]), batch["label"])
        value.backward()
        return value.item()

    engine = Engine(step)
    GMCoordHandler(loss).attach(engine)
    data = [{"image": torch.randn(4, 2), "label": torch.randn(4, 1), "modality": ["CT", "MR", "CT", "US"]}] * 3
    engine.run(data, max_epochs=1)
    assert set(k for k in engine.state.metrics if k.startswith("gm_coef_")) == {"gm_coef_CT", "gm_coef_MR", "gm_coef_US"}
    bad = Engine(step)
    GMCoordHandler(loss).attach(bad)
    with pytest.raises(KeyError, match="modality"):
        bad.run([{"image": torch.randn(2, 2), "label": torch.randn(2, 1)}], max_epochs=1)


def test_feature_reconstruction_pretraining_option():
    mae = DEXMaskedAutoEncoder(3, 32, 8, spatial_dims=2, num_layers=2, num_experts=3, decoder_hidden_size=24,
                               decoder_mlp_dim=48, decoder_num_layers=1, decoder_num_heads=4,
                               feature_reconstruction_weight=0.5, teacher_momentum=0.9, **TINY)
    assert mae.teacher is not None and not any(p.requires_grad for p in mae.teacher.parameters())
    with torch.no_grad():
        mae.encoder.blocks[0].norm1.weight.add_(1.0)  # the student moves away from the teacher
    before = mae.teacher.blocks[0].norm1.weight.clone()
    _, out = mae(torch.rand(2, 3, 32, 32))
    assert out["feature"] > 0
    torch.testing.assert_close(mae.teacher.blocks[0].norm1.weight, 0.9 * before + 0.1 * mae.encoder.blocks[0].norm1.weight)
    out["feature"].backward()
    assert mae.feature_pred.weight.grad is not None and mae.encoder.blocks[0].attn.qkv.weight.grad is not None
    plain = DEXMaskedAutoEncoder(3, 32, 8, spatial_dims=2, num_layers=2, num_experts=3, decoder_hidden_size=24,
                                 decoder_mlp_dim=48, decoder_num_layers=1, decoder_num_heads=4, **TINY)
    assert plain(torch.rand(1, 3, 32, 32))[1]["feature"].item() == 0.0
