# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Unit tests of dex_monai.engines: schedules, the pre-training engine, schedule / routing handlers, checkpoints."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from ignite.engine import Events

from dex_monai.engines import (
    CheckpointResumeHandler,
    DEXPretrainTrainer,
    GEMAMomentumScheduleHandler,
    LossWeightScheduleHandler,
    ResumableCheckpointSaver,
    RouterNoiseScheduleHandler,
    RoutingStatsHandler,
    cosine_schedule,
    find_latest_checkpoint,
    linear_scaled_lr,
    list_checkpoints,
    output_scalars,
    warmup_cosine_factor,
    warmup_cosine_scheduler,
)
from dex_monai.engines.utils import as_bool


class StubMAE(torch.nn.Module):
    """Minimal network with the DEX MAE interface; ``nan_at`` makes the loss NaN at those forward calls (1-based)."""

    def __init__(self, num_layers: int = 2, num_experts: int = 4, nan_at: tuple[int, ...] = ()):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.gate = torch.nn.Linear(3, num_experts, bias=False)
        self.num_layers, self.num_experts = num_layers, num_experts
        self.nan_at = set(nan_at)
        self.calls = 0
        self.current = {"gema_momentum": None, "noise_std": None}
        self.values: list[dict] = []  # schedule values seen by each forward call
        self.register_buffer("load", torch.full((num_layers, num_experts), 1.0 / num_experts))

    def set_schedule_values(self, gema_momentum=None, noise_std=None):
        if gema_momentum is not None:
            self.current["gema_momentum"] = gema_momentum
        if noise_std is not None:
            self.current["noise_std"] = noise_std

    def expert_load(self):
        return list(self.load)

    def forward(self, images):
        self.calls += 1
        self.values.append(dict(self.current))
        feats = images.mean(dim=(2, 3))  # [B, 3]
        mae = ((feats * self.weight) ** 2).mean()
        if self.calls in self.nan_at:
            mae = mae * float("nan")
        logits = self.gate(feats)
        indices = torch.topk(logits, 2, dim=-1).indices
        routing = [{"indices": (indices + layer) % self.num_experts, "gates": torch.full(indices.shape, 0.5)} for layer in range(self.num_layers)]
        out = {"mae": mae, "alignment": self.weight.sum() * 0.0 + 1.0, "balance": logits.softmax(-1).pow(2).sum(-1).mean(), "routing": routing}
        return images, out


def _loader(n: int = 8, batch: int = 2):
    modalities = ["CT", "MR"] * (n // 2)
    data = [{"image": torch.randn(3, 8, 8), "modality": modalities[i]} for i in range(n)]
    return torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False)


def _trainer(net, epochs=2, handlers=(), lr=0.1, **kwargs):
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    return DEXPretrainTrainer(
        device="cpu", max_epochs=epochs, train_data_loader=_loader(), network=net, optimizer=opt,
        train_handlers=list(handlers), **kwargs,
    )


def test_schedules():
    assert cosine_schedule(0.0, 0.99, 0.999) == pytest.approx(0.99)
    assert cosine_schedule(1.0, 0.99, 0.999) == pytest.approx(0.999)
    assert cosine_schedule(0.5, 1.0, 0.0) == pytest.approx(0.5)
    assert cosine_schedule(2.0, 1.0, 0.0) == pytest.approx(0.0)  # clamped
    assert linear_scaled_lr(1e-4, 64, world_size=8) == pytest.approx(1e-4)
    assert [warmup_cosine_factor(s, 4, 12) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert warmup_cosine_factor(8, 4, 12) == pytest.approx(0.5)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_cosine_scheduler(opt, total_steps=10, warmup_epochs=1, epoch_length=2)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)  # first step at half the peak
    state = sched.state_dict()
    assert state["lr_lambdas"] == [None]  # the schedule lengths come from the config, not the checkpoint
    assert as_bool("false") is False and as_bool("True") is True and as_bool(0) is False


def test_trainer_output_and_schedule_handlers():
    net = StubMAE()
    handlers = [
        GEMAMomentumScheduleHandler(net, 0.99, 0.999),
        RouterNoiseScheduleHandler(net, 1.0, 0.0),
        LossWeightScheduleHandler(end=0.0),
    ]
    trainer = _trainer(net, epochs=2, handlers=handlers, lambda_bal=0.02, lambda_co=0.5)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(output_scalars(e.state.output)))
    trainer.run()
    total = 8
    assert len(seen) == total
    for i, record in enumerate(seen):
        progress = i / total
        assert record["noise_std"] == pytest.approx(cosine_schedule(progress, 1.0, 0.0))
        assert record["gema_momentum"] == pytest.approx(cosine_schedule(progress, 0.99, 0.999))
        assert record["lambda_bal"] == pytest.approx(cosine_schedule(progress, 0.02, 0.0))
        assert net.values[i]["noise_std"] == pytest.approx(record["noise_std"])
        expected = record["mae"] + 0.5 * record["alignment"] + record["lambda_bal"] * record["balance"]
        assert record["loss"] == pytest.approx(expected, rel=1e-5)
        assert {"grad_norm", "lr", "skipped_steps"} <= set(record)
    # decollated output: one dict per image with the scalars replicated, modality and routing per image
    assert isinstance(trainer.state.output, list) and len(trainer.state.output) == 2
    assert trainer.state.output[0]["modality"] in ("CT", "MR")


def test_non_finite_step_is_skipped_and_counted():
    net = StubMAE(nan_at=(3,))
    trainer = _trainer(net, epochs=1)
    weights = {}
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: weights.__setitem__(e.state.iteration, net.weight.detach().clone()))
    flags = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: flags.append(output_scalars(e.state.output)["skipped"]))
    trainer.run()
    assert flags == [0.0, 0.0, 1.0, 0.0]
    assert trainer.state.skipped_steps == 1
    assert torch.equal(weights[3], weights[4])  # the NaN step changed nothing
    assert not torch.equal(weights[2], weights[3])
    assert torch.isfinite(net.weight).all()
    assert "skipped_steps" in trainer.state_dict()


def test_gradient_clipping():
    net = StubMAE()
    with torch.no_grad():
        net.weight.fill_(100.0)
    before = net.weight.detach().clone()
    trainer = _trainer(net, epochs=1, lr=1.0, max_grad_norm=0.01, epoch_length=1)
    trainer.run()
    step = (net.weight.detach() - before).norm()
    assert step <= 0.01 + 1e-6


def _routing_output(batch, names, layers=2, experts=4):
    return {
        "modality": names,
        "routing": [{"indices": torch.tensor([[0, 1]] * batch) + layer, "gates": torch.full((batch, 2), 0.5)} for layer in range(layers)],
    }


def test_routing_stats_handler(tmp_path):
    net = StubMAE()
    handler = RoutingStatsHandler(net, output_dir=tmp_path)

    class Engine:  # the handler only reads engine.state
        class state:
            output = None
            epoch = 1

    engine = Engine()
    engine.state.output = _routing_output(3, ["CT", "MR", "CT"])
    handler.iteration_completed(engine)
    # decollated form of one more batch
    decollated = [{"modality": "MR", "routing": [{"indices": torch.tensor([2, 3]), "gates": torch.tensor([0.5, 0.5])}] * 2}]
    engine.state.output = decollated
    handler.iteration_completed(engine)
    assert handler.counts["CT"].tolist() == [[2, 2, 0, 0], [0, 2, 2, 0]]
    restored = RoutingStatsHandler(net)
    restored.load_state_dict(handler.state_dict())
    assert restored.counts["MR"].tolist() == handler.counts["MR"].tolist()
    handler.epoch_completed(engine)
    usage = handler.last_usage
    assert set(usage) == {"CT", "MR"} and np.allclose(usage["MR"].sum(axis=1), 1.0)
    record = json.loads((tmp_path / "routing" / "expert_usage_epoch_1.json").read_text())
    assert record["modalities"] == ["CT", "MR"] and record["layers"] == 2 and record["num_experts"] == [4, 4]
    assert record["usage"]["CT"][0] == pytest.approx([0.5, 0.5, 0.0, 0.0])
    assert (tmp_path / "routing" / "expert_usage_epoch_1.png").stat().st_size > 0
    # summary metrics only (2 per layer + 2 means), from sklearn's mutual information over the expanded choices:
    # layer 0: CT -> experts 0,1,0,1; MR -> 0,1,2,3. layer 1: CT -> 1,2,1,2; MR -> 1,2,2,3 (4 choices each)
    from scipy.stats import entropy
    from sklearn.metrics import mutual_info_score

    mods = ["CT"] * 4 + ["MR"] * 4
    nmi = [mutual_info_score(mods, e) / entropy([0.5, 0.5]) for e in ([0, 1, 0, 1, 0, 1, 2, 3], [1, 2, 1, 2, 1, 2, 2, 3])]
    metrics = engine.state.tracking_metrics
    assert set(metrics) == {"routing/load_entropy/layer_0", "routing/load_entropy/layer_1", "routing/load_entropy_mean",
                            "routing/nmi/layer_0", "routing/nmi/layer_1", "routing/nmi_mean"}
    assert metrics["routing/nmi/layer_0"] == pytest.approx(nmi[0]) and metrics["routing/nmi/layer_1"] == pytest.approx(nmi[1])
    assert metrics["routing/nmi_mean"] == pytest.approx(np.mean(nmi))
    assert metrics["routing/load_entropy_mean"] == pytest.approx(1.0)  # the stub's load is uniform
    assert record["expert_load"] == [[0.25] * 4] * 2 and record["summary"]["routing/nmi/layer_0"] == pytest.approx(nmi[0])
    assert [a for _, a in engine.state.tracking_artifacts] == ["routing", "routing"]
    assert handler.counts == {}


def test_checkpoint_rotation_and_resume(tmp_path):
    def build(epochs=3):
        net = StubMAE()
        routing = RoutingStatsHandler(net)
        trainer = _trainer(net, epochs=epochs)
        save = {"model": net, "optimizer": trainer.optimizer, "routing": routing}
        return net, routing, trainer, save

    net, routing, trainer, save = build()
    saver = ResumableCheckpointSaver(tmp_path, save, save_interval=3, n_saved=2)
    routing.attach(trainer)
    saver.attach(trainer)

    def crash(engine):
        raise KeyboardInterrupt  # an interruption right after iteration 7 (checkpoint at 6)

    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=7), crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 6]
    assert find_latest_checkpoint(tmp_path).endswith("checkpoint_6.pt")
    ckpt = torch.load(find_latest_checkpoint(tmp_path), weights_only=True)
    assert {"model", "optimizer", "routing", "trainer"} <= set(ckpt) and ckpt["trainer"]["iteration"] == 6

    net2, routing2, trainer2, save2 = build()
    resume = CheckpointResumeHandler(tmp_path, save2, enabled="true")
    saver2 = ResumableCheckpointSaver(tmp_path, save2, save_interval=3, n_saved=2)
    noise = RouterNoiseScheduleHandler(net2, 1.0, 0.0)
    for h in (resume, noise, routing2, saver2):
        h.attach(trainer2)
    first = []
    trainer2.add_event_handler(Events.ITERATION_STARTED(once=7), lambda e: first.append(e.state.iteration))
    started = []
    trainer2.add_event_handler(Events.STARTED, lambda e: started.append(sum(t.sum() for t in routing2.counts.values())))
    trainer2.run()
    # the routing counts of the interrupted epoch are restored: 2 iterations x 2 images x 2 layers x top-2
    assert started == [16]
    assert first == [7] and trainer2.state.iteration == 12
    assert net2.values[0]["noise_std"] == pytest.approx(cosine_schedule(6 / 12, 1.0, 0.0))
    assert [step for step, _ in list_checkpoints(tmp_path)] == [9, 12]
    final = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(final) == {"model"} and torch.equal(final["model"]["weight"], net2.weight.detach())

    # a fresh (non-resumed) run removes the stale checkpoints of the earlier run
    net3, routing3, trainer3, save3 = build(epochs=1)
    ResumableCheckpointSaver(tmp_path, save3, save_interval=0, n_saved=2).attach(trainer3)
    trainer3.run()
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4]


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    net = StubMAE()
    trainer = _trainer(net, epochs=1)
    CheckpointResumeHandler(tmp_path / "none", {"model": net}).attach(trainer)
    trainer.run()
    assert trainer.state.iteration == 4


def test_output_scalars():
    assert output_scalars({"loss": torch.tensor(1.5), "routing": [], "lr": 0.1}) == {"loss": 1.5, "lr": 0.1}
    assert output_scalars([{"loss": 2.0, "modality": "CT"}], keys=["loss"]) == {"loss": 2.0}
    assert output_scalars(None) is None
    assert math.isnan(output_scalars({"loss": float("nan")})["loss"])


def test_load_pretrain_datalist(tmp_path):
    from dex_monai.engines import load_pretrain_datalist

    items = load_pretrain_datalist(None, tmp_path / "generated", synthetic_n_per_modality=1, synthetic_size=16)
    assert (tmp_path / "generated" / "datalist.json").is_file()
    assert {item["modality"] for item in items} >= {"CT", "MR", "X-ray"}
    again = load_pretrain_datalist(tmp_path / "generated" / "datalist.json", tmp_path / "generated", max_items=3)
    assert [i["image"] for i in again] == [i["image"] for i in items[:3]]
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "scan.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no datalist.json"):
        load_pretrain_datalist(None, tmp_path / "real")  # never writes the generated set into real data


def test_m4oe_expert_stage_reads_the_configured_modality_key():
    """The trainer hands the batch's modalities to the M4oE layers from its own ``modality_key``."""
    from dex_monai.networks import DEXMaskedAutoEncoder

    mae = DEXMaskedAutoEncoder(3, 16, 8, spatial_dims=2, hidden_size=24, mlp_dim=48, num_layers=1, num_heads=2,
                               decoder_hidden_size=16, decoder_mlp_dim=32, decoder_num_layers=1, decoder_num_heads=2,
                               mlp_type="m4oe", modalities=("CT", "MR"), m4oe_stage="expert")
    seen = []
    layer = mae.encoder.m4oe_layers()[0]
    original = layer.set_modality_ids
    layer.set_modality_ids = lambda ids: (seen.append(None if ids is None else list(ids)), original(ids))[1]
    data = [{"image": torch.rand(3, 16, 16), "scan_type": m} for m in ("MR", "CT")]
    trainer = DEXPretrainTrainer(
        device="cpu", max_epochs=1, train_data_loader=torch.utils.data.DataLoader(data, batch_size=2),
        network=mae, optimizer=torch.optim.SGD(mae.parameters(), lr=0.01), modality_key="scan_type", decollate=False,
    )
    trainer.run()
    assert seen == [["MR", "CT"]]
