"""ModalityBalancedSampler: proportional (the paper's mixture) or equal per modality, also under DDP."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from dex_monai.data import ModalityBalancedSampler

MODS = ["CT"] * 10 + ["MR"] * 100 + ["X-ray"] * 1000


def test_proportional_is_a_permutation():
    s = ModalityBalancedSampler(MODS, mode="proportional", seed=1)
    order = list(s)
    assert len(s) == len(order) == len(MODS)
    assert sorted(order) == list(range(len(MODS)))
    s.set_epoch(1)
    assert list(s) != order  # a new order every epoch
    assert list(ModalityBalancedSampler(MODS, seed=1)) == order  # same seed, same order
    shares = s.modality_shares()
    assert shares["X-ray"] == pytest.approx(1000 / 1110)


def test_proportional_with_more_samples_than_items():
    s = ModalityBalancedSampler(MODS, mode="proportional", num_samples=5000, seed=0)
    counts = Counter(MODS[i] for i in s)
    assert len(s) == 5000
    assert counts["X-ray"] / 5000 == pytest.approx(1000 / 1110, abs=0.03)


def test_equal_gives_each_modality_the_same_share():
    s = ModalityBalancedSampler(MODS, mode="equal", num_samples=30000, seed=0)
    counts = Counter(MODS[i] for i in s)
    for m in ("CT", "MR", "X-ray"):
        assert counts[m] / 30000 == pytest.approx(1 / 3, abs=0.02)
    assert s.modality_shares() == pytest.approx({"CT": 1 / 3, "MR": 1 / 3, "X-ray": 1 / 3})


@pytest.mark.parametrize("mode", ["proportional", "equal"])
def test_ddp_shards_are_disjoint_and_cover_the_epoch(mode):
    world = 3
    full = ModalityBalancedSampler(MODS, mode=mode, seed=4, rank=0, world_size=1)
    shards = [list(ModalityBalancedSampler(MODS, mode=mode, seed=4, rank=r, world_size=world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # the same number of steps on every rank
    merged = [shards[r][i] for i in range(len(shards[0])) for r in range(world)]
    assert merged[: len(MODS)] == list(full)  # rank r takes positions r, r + world, ...
    if mode == "proportional":
        assert set(shards[0]).isdisjoint(shards[1])
    with pytest.raises(ValueError, match="rank 3"):
        ModalityBalancedSampler(MODS, rank=3, world_size=3)


def test_drop_last_and_errors():
    s = ModalityBalancedSampler(["CT"] * 7, rank=1, world_size=2, drop_last=True)
    assert len(s) == len(list(s)) == 3
    with pytest.raises(ValueError, match="mode"):
        ModalityBalancedSampler(MODS, mode="inverse")
    with pytest.raises(ValueError, match="at least one"):
        ModalityBalancedSampler([])


def test_with_a_dataloader():
    data = torch.arange(len(MODS))
    loader = torch.utils.data.DataLoader(data, batch_size=64, sampler=ModalityBalancedSampler(MODS, mode="equal"))
    seen = torch.cat(list(loader))
    assert len(seen) == len(MODS)
