"""Modality-balanced sampling: the paper's mixture (proportional to data) or equal shares per modality."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["ModalityBalancedSampler"]

_MODES = ("proportional", "equal")


class ModalityBalancedSampler(Sampler[int]):
    """Draw dataset indices so that modalities appear in the chosen mixture.

    - ``mode="proportional"``: every item equally likely, so each modality appears in proportion to its
      data (the DEX pre-training mixture); without replacement (a permutation) unless more samples than
      items are asked for.
    - ``mode="equal"``: every modality equally likely (``1 / M``), items uniform within a modality;
      with replacement (small modalities are repeated).

    Works under DDP: all ranks draw the same global order (seeded by ``seed + epoch``; call
    :meth:`set_epoch` every epoch), padded to a multiple of ``world_size``, and rank ``r`` takes
    positions ``r, r + world_size, ...``. ``rank`` / ``world_size`` default to the initialised
    ``torch.distributed`` group, else ``0`` / ``1``.

    Args:
        modalities: the modality of every dataset item (e.g. ``SliceDataset.modalities``).
        mode: ``"proportional"`` or ``"equal"``.
        num_samples: samples per epoch over all ranks (default: the dataset length).
        seed: base random seed.
        rank: this process's rank.
        world_size: number of processes.
        drop_last: drop the tail instead of padding it to a multiple of ``world_size``.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        mode: str = "proportional",
        num_samples: int | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
        if len(modalities) == 0:
            raise ValueError("ModalityBalancedSampler needs at least one item.")
        if world_size is None or rank is None:
            dist = torch.distributed
            initialised = dist.is_available() and dist.is_initialized()
            world_size = world_size if world_size is not None else (dist.get_world_size() if initialised else 1)
            rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, {world_size}).")
        self.modalities = [str(m) for m in modalities]
        self.mode = mode
        self.total = int(num_samples) if num_samples is not None else len(self.modalities)
        if self.total <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}.")
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = drop_last
        self.epoch = 0
        counts = Counter(self.modalities)
        if mode == "equal":
            w = [1.0 / (len(counts) * counts[m]) for m in self.modalities]
        else:
            w = [1.0 / len(self.modalities)] * len(self.modalities)
        self.weights = torch.tensor(w, dtype=torch.float64)

    def set_epoch(self, epoch: int) -> None:
        """Change the random order (call at the start of each epoch, as with ``DistributedSampler``)."""
        self.epoch = int(epoch)

    def modality_shares(self) -> dict[str, float]:
        """The expected share of each modality in the samples."""
        shares: dict[str, float] = {}
        for m, w in zip(self.modalities, self.weights.tolist()):
            shares[m] = shares.get(m, 0.0) + w
        return shares

    def _global_indices(self) -> list[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        n = len(self.modalities)
        if self.mode == "proportional" and self.total <= n:
            return torch.randperm(n, generator=g)[: self.total].tolist()
        return torch.multinomial(self.weights, self.total, replacement=True, generator=g).tolist()

    def __len__(self) -> int:
        if self.drop_last:
            return self.total // self.world_size
        return math.ceil(self.total / self.world_size)

    def __iter__(self) -> Iterator[int]:
        indices = self._global_indices()
        per_rank = len(self)
        wanted = per_rank * self.world_size
        if wanted > len(indices):
            indices = (indices * math.ceil(wanted / len(indices)))[:wanted]
        else:
            indices = indices[:wanted]
        return iter(indices[self.rank : wanted : self.world_size])
