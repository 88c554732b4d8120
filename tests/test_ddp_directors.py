"""Two gloo processes on CPU: GEMA weights and load statistics are all-reduced, so directors stay identical."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from dex_monai.networks import DEXMaskedAutoEncoder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # same initial weights on both ranks (DDP also broadcasts them)
    model = DEXMaskedAutoEncoder(
        3, 32, 8, spatial_dims=2, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4, num_experts=4, top_k=2,
        decoder_hidden_size=24, decoder_mlp_dim=48, decoder_num_layers=1, decoder_num_heads=4,
    )
    model.set_schedule_values(gema_momentum=0.5, noise_std=1.0)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(100 + rank)  # different data, masks and router noise on each rank
    for _ in range(3):
        _, out = ddp(torch.rand(4, 3, 32, 32))
        loss = out["mae"] + out["alignment"] + out["balance"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    state = {k: v for k, v in model.state_dict().items() if ".dex.director." in k or "expert_load" in k}
    torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_directors_identical_across_two_gloo_ranks(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys() and len(rank0) == 2 * 5
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    torch.manual_seed(0)
    initial = DEXMaskedAutoEncoder(
        3, 32, 8, spatial_dims=2, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4, num_experts=4
    )
    # the directors did move (GEMA ran), so equality is not trivial
    assert rank0["encoder.blocks.0.dex.router.expert_load"].sum() > 0
    assert not torch.equal(
        rank0["encoder.blocks.0.dex.director.linear1.weight"], initial.state_dict()["encoder.blocks.0.dex.director.linear1.weight"]
    )
