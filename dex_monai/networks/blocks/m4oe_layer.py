"""M4oE-style modality experts with a gating network (Jiang et al., MICCAI 2024), as a member of the DEX layer family.

One expert MLP per modality. Two stages:

- ``"expert"``: hard routing by modality: each image goes through its own modality's expert only (how each expert is
  first trained on its modality). The modality of each image is given with :meth:`ModalityExpertLayer.set_modality_ids`,
  or a fixed ``default_modality`` is used for single-modality data.
- ``"gated"``: a gating network mixes the experts, learned during fine-tuning. Two gates:

  - ``gate="experts"`` (the paper, default): per token, ``softmax(W_g x + b_g)`` over the E experts;
    ``out = sum_e g_e(x) * expert_e(x)``.
  - ``gate="channel"`` (the public code): per token, ``softmax(W_c x + b_c)`` over the D channels, multiplied
    element-wise with the *sum* of the experts' outputs: ``out = g(x) * sum_e expert_e(x)``.

:meth:`ModalityExpertLayer.add_modality` adds an expert for a new modality without changing what the layer computes
for the existing ones (its gate logit starts at -30 with zero weights; in the expert stage other images never see it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from dex_monai.networks.blocks.dex_layer import StackedExpertMLP

__all__ = ["ModalityExpertLayer", "M4oEHostMixin", "M4OE_STAGES", "M4OE_GATES"]

M4OE_STAGES = ("expert", "gated")
M4OE_GATES = ("experts", "channel")
_NEW_EXPERT_LOGIT = -30.0


class ModalityExpertLayer(nn.Module):
    """Modality-specific experts plus a gating network, replacing a transformer block's MLP.

    Args:
        hidden_size: token dimension D.
        mlp_dim: hidden dimension of every expert.
        modalities: names of the modalities, one expert each, in order.
        stage: ``"expert"`` (hard routing by modality) or ``"gated"`` (learned mixture).
        gate: ``"experts"`` (paper) or ``"channel"`` (public code), see the module docstring.
        default_modality: modality used in the expert stage when no per-image ids were set.
        dropout_rate: dropout inside the experts.

    Input and output ``[B, N, D]``, or channel-last ``[B, *spatial, D]`` (a Swin block's tokens, e.g.
    ``[B, H, W, D]``), which is flattened to ``N = prod(spatial)`` tokens. After a gated forward, ``last_gates``
    holds the gate ``[B, N, E]`` (or ``[B, N, D]`` for the channel gate).
    """

    def __init__(
        self,
        hidden_size: int,
        mlp_dim: int,
        modalities: Sequence[str],
        stage: str = "gated",
        gate: str = "experts",
        default_modality: str | None = None,
        dropout_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if not modalities:
            raise ValueError("M4oE needs at least one modality.")
        if len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities must be unique, got {list(modalities)}.")
        if stage not in M4OE_STAGES:
            raise ValueError(f"unknown M4oE stage {stage!r}; expected one of {M4OE_STAGES}.")
        if gate not in M4OE_GATES:
            raise ValueError(f"unknown M4oE gate {gate!r}; expected one of {M4OE_GATES}.")
        self.hidden_size = hidden_size
        self.mlp_dim = mlp_dim
        self.modalities = list(modalities)
        self.stage = stage
        self.gate_type = gate
        self.default_modality = default_modality
        self.dropout_rate = dropout_rate
        self.experts = StackedExpertMLP(len(modalities), hidden_size, mlp_dim, dropout_rate)
        gate_out = len(modalities) if gate == "experts" else hidden_size
        self.gate = nn.Linear(hidden_size, gate_out)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self._modality_ids: torch.Tensor | None = None
        self.last_gates: torch.Tensor | None = None
        self.alignment_loss = torch.zeros(())
        self.balance_loss = torch.zeros(())
        self.routing: dict[str, torch.Tensor] = {}

    @property
    def num_experts(self) -> int:
        return len(self.modalities)

    def modality_id(self, name: str) -> int:
        if name not in self.modalities:
            raise KeyError(f"modality {name!r} has no expert; known: {self.modalities} (use add_modality).")
        return self.modalities.index(name)

    def set_modality_ids(self, ids: torch.Tensor | Sequence[int | str] | None) -> None:
        """Modality of each image of the next forward passes (names or expert ids), or ``None`` to clear."""
        if ids is None:
            self._modality_ids = None
            return
        if not torch.is_tensor(ids):
            ids = torch.tensor([self.modality_id(i) if isinstance(i, str) else int(i) for i in ids])
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.num_experts):
            raise ValueError(f"modality ids must be in [0, {self.num_experts}), got {ids.tolist()}.")
        self._modality_ids = ids.long()

    def set_stage(self, stage: str) -> None:
        if stage not in M4OE_STAGES:
            raise ValueError(f"unknown M4oE stage {stage!r}; expected one of {M4OE_STAGES}.")
        self.stage = stage

    @torch.no_grad()
    def add_modality(self, name: str, init_from: str | None = None) -> int:
        """Add an expert for ``name``, a copy of ``init_from``'s expert (default: the mean of the experts).

        Returns the new expert's id. The others' outputs do not change in either stage.
        """
        if name in self.modalities:
            raise ValueError(f"modality {name!r} already has an expert.")
        old = self.experts
        new = StackedExpertMLP(old.num_experts + 1, self.hidden_size, self.mlp_dim, self.dropout_rate).to(
            old.linear1_weight.device, old.linear1_weight.dtype
        )
        for param in ("linear1_weight", "linear1_bias", "linear2_weight", "linear2_bias"):
            source = getattr(old, param)
            fresh = source[self.modality_id(init_from)] if init_from is not None else source.mean(0)
            getattr(new, param).copy_(torch.cat([source, fresh.unsqueeze(0)]))
        self.experts = new
        if self.gate_type == "experts":
            gate = nn.Linear(self.hidden_size, old.num_experts + 1).to(self.gate.weight.device, self.gate.weight.dtype)
            gate.weight.copy_(torch.cat([self.gate.weight, torch.zeros_like(self.gate.weight[:1])]))
            gate.bias.copy_(torch.cat([self.gate.bias, self.gate.bias.new_full((1,), _NEW_EXPERT_LOGIT)]))
            self.gate = gate
        else:
            # the channel gate multiplies the sum of the experts: the new expert starts with a zero output so the
            # sum is unchanged; it learns from there
            new.linear2_weight[-1].zero_()
            new.linear2_bias[-1].zero_()
        self.modalities.append(name)
        return self.num_experts - 1

    def _all_experts(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, D] -> [E, B, N, D]``: every expert on every token."""
        e = self.experts
        hidden = torch.einsum("bnd,ehd->ebnh", x, e.linear1_weight) + e.linear1_bias[:, None, None, :]
        hidden = e.drop(torch.nn.functional.gelu(hidden))
        out = torch.einsum("ebnh,edh->ebnd", hidden, e.linear2_weight) + e.linear2_bias[:, None, None, :]
        return e.drop(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``[B, N, D]`` or ``[B, *spatial, D]``; the output has the same shape.
        """
        if x.dim() != 3:
            return self._forward_tokens(x.reshape(x.shape[0], -1, x.shape[-1])).reshape(x.shape)
        return self._forward_tokens(x)

    def _forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, D] -> [B, N, D]`` in the current stage."""
        batch = x.shape[0]
        zero = x.new_zeros(())
        self.alignment_loss = self.balance_loss = zero
        if self.stage == "expert":
            ids = self._modality_ids
            if ids is None:
                if self.default_modality is None:
                    raise ValueError(
                        "M4oE expert stage needs the modality of every image: call set_modality_ids() "
                        "or give default_modality."
                    )
                ids = torch.full((batch,), self.modality_id(self.default_modality), dtype=torch.long)
            if ids.numel() != batch:
                raise ValueError(f"{ids.numel()} modality ids for a batch of {batch} images.")
            ids = ids.to(x.device)
            gates = torch.ones(batch, 1, device=x.device, dtype=x.dtype)
            self.routing = {"indices": ids[:, None], "gates": gates}
            return self.experts(x, gates, ids[:, None])
        outputs = self._all_experts(x)
        logits = self.gate(x)
        if self.gate_type == "experts":
            gates = torch.softmax(logits.float(), dim=-1).to(x.dtype)  # [B, N, E]
            self.last_gates = gates.detach()
            self.routing = {"indices": gates.mean(1).argmax(-1, keepdim=True), "gates": gates.mean(1).detach()}
            return torch.einsum("ebnd,bne->bnd", outputs, gates)
        gates = torch.softmax(logits.float(), dim=-1).to(x.dtype)  # [B, N, D]
        self.last_gates = gates.detach()
        self.routing = {}
        return gates * outputs.sum(0)


class M4oEHostMixin:
    """The M4oE controls of a network that hosts :class:`ModalityExpertLayer` s (the ViT or the Swin UNETR).

    The host defines ``m4oe_layers()``, its M4oE layers in depth order (empty when it has none).
    """

    def m4oe_layers(self) -> list[ModalityExpertLayer]:
        raise NotImplementedError

    def set_modality_ids(self, ids: torch.Tensor | Sequence[int | str] | None) -> None:
        """M4oE: modality (name or expert id) of every image of the next forward passes; ``None`` clears."""
        for layer in self.m4oe_layers():
            layer.set_modality_ids(ids)

    def set_m4oe_stage(self, stage: str) -> None:
        """M4oE: ``"expert"`` (hard routing by modality) or ``"gated"`` (learned gate)."""
        for layer in self.m4oe_layers():
            layer.set_stage(stage)

    def add_modality(self, name: str, init_from: str | None = None) -> None:
        """M4oE: add an expert for a new modality in every layer, leaving the other modalities' outputs unchanged."""
        if not self.m4oe_layers():
            raise ValueError("add_modality needs M4oE layers (mlp_type='m4oe').")
        for layer in self.m4oe_layers():
            layer.add_modality(name, init_from)
