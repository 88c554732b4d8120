"""UMD's gradient-guided modality coordination (GM-Coord) for multi-modality fine-tuning.

When a batch mixes modalities, a modality that learns fast can dominate the shared gradient. GM-Coord (Zhang et al.
2024, in the family of OGM-GE) measures each modality's optimisation status and slows the dominant one:

- per modality m, an EMA (momentum ``momentum``) of its mean loss ``L_m`` over the batches it appears in, and its
  first observed loss ``L_m^0``;
- status ``s_m = L_m^0 / L_m`` (``status="loss_descent"``: how far its loss has come down, 1 at the start), or the EMA
  of its mean softmax probability of the true class (``status="confidence"``, OGM-GE's score, classification only);
- ratio ``rho_m = s_m / mean_{j != m} s_j`` over the other modalities seen so far;
- coefficient ``k_m = 1 - tanh(alpha * max(0, rho_m - 1))``: a modality ahead of the others (rho > 1) is slowed,
  the rest keep 1.

The batch loss is ``sum_m k_m * (n_m / B) * loss(pred_m, target_m)``. Because the loss is linear in those weights,
modality m's contribution to every gradient is scaled by exactly ``k_m``.

Use with any MONAI trainer: wrap the loss in :class:`GMCoordLoss` and attach
:class:`dex_monai.handlers.GMCoordHandler` to the trainer;
it hands the batch's modalities (``batch["modality"]``) to the loss and writes the coefficients into
``engine.state.metrics`` as ``gm_coef_<modality>`` (so MONAI's ``MLFlowHandler`` and ``StatsHandler`` log them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

__all__ = ["GMCoordLoss", "gm_coefficient", "GM_COORD_STATUS"]

GM_COORD_STATUS = ("loss_descent", "confidence")


def gm_coefficient(status: dict[str, float], alpha: float) -> dict[str, float]:
    """``k_m = 1 - tanh(alpha * max(0, s_m / mean_{j != m} s_j - 1))`` for every modality in ``status``."""
    coefficients = {}
    for name, value in status.items():
        others = [v for other, v in status.items() if other != name]
        if not others:
            coefficients[name] = 1.0
            continue
        ratio = value / max(sum(others) / len(others), 1e-12)
        coefficients[name] = 1.0 - math.tanh(alpha * max(0.0, ratio - 1.0))
    return coefficients


class GMCoordLoss(nn.Module):
    """Wraps a loss so that each modality's share of the batch loss is scaled by its GM-Coord coefficient.

    Args:
        loss: the task loss ``loss(pred, target) -> scalar`` (e.g. MONAI ``DiceCELoss``, ``nn.CrossEntropyLoss``).
        alpha: strength of the slow-down.
        momentum: EMA momentum of the per-modality status.
        status: ``"loss_descent"`` (default, any task) or ``"confidence"`` (classification).

    Call :meth:`set_modalities` before each forward (the :class:`GMCoordHandler` does); without modalities the loss
    is the plain wrapped loss.
    """

    def __init__(
        self, loss: Callable[..., torch.Tensor], alpha: float = 0.5, momentum: float = 0.9, status: str = "loss_descent"
    ) -> None:
        super().__init__()
        if status not in GM_COORD_STATUS:
            raise ValueError(f"unknown GM-Coord status {status!r}; expected one of {GM_COORD_STATUS}.")
        if alpha < 0 or not 0 <= momentum < 1:
            raise ValueError(f"need alpha >= 0 and 0 <= momentum < 1, got alpha={alpha}, momentum={momentum}.")
        self.loss = loss
        self.alpha = alpha
        self.momentum = momentum
        self.status_kind = status
        self._modalities: list[str] | None = None
        self.initial_loss: dict[str, float] = {}
        self.running_loss: dict[str, float] = {}
        self.running_confidence: dict[str, float] = {}
        self.coefficients: dict[str, float] = {}

    def set_modalities(self, modalities: Sequence[str] | None) -> None:
        self._modalities = [str(m) for m in modalities] if modalities is not None else None

    def status(self) -> dict[str, float]:
        if self.status_kind == "confidence":
            return dict(self.running_confidence)
        return {m: self.initial_loss[m] / max(self.running_loss[m], 1e-12) for m in self.running_loss}

    def _ema(self, store: dict[str, float], name: str, value: float) -> None:
        store[name] = value if name not in store else self.momentum * store[name] + (1 - self.momentum) * value

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        modalities = self._modalities
        if modalities is None:
            return self.loss(pred, target)
        if len(modalities) != pred.shape[0]:
            raise ValueError(f"GM-Coord got {len(modalities)} modalities for a batch of {pred.shape[0]}.")
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(modalities):
            groups.setdefault(name, []).append(i)
        group_losses = {}
        for name, rows in groups.items():
            index = torch.tensor(rows, device=pred.device)
            group_pred, group_target = pred.index_select(0, index), target.index_select(0, index)
            group_losses[name] = self.loss(group_pred, group_target)
            value = float(group_losses[name].detach())
            self.initial_loss.setdefault(name, value)
            self._ema(self.running_loss, name, value)
            if self.status_kind == "confidence":
                probs = torch.softmax(group_pred.detach().float(), dim=1)
                labels = group_target.long().reshape(-1)
                self._ema(self.running_confidence, name, float(probs[torch.arange(len(labels)), labels].mean()))
        self.coefficients = gm_coefficient(self.status(), self.alpha)
        batch = pred.shape[0]
        return sum(self.coefficients[name] * len(groups[name]) / batch * value for name, value in group_losses.items())


