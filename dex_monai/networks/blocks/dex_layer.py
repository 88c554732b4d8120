"""The Director-Experts (DEX) layer: a routed pool of expert MLPs and a gradient-free director MLP.

Mathematics follow the DEX paper (He, You, Li, KDD 2026) and its public code
(``DEX_pretraining/model/DEXVisionTransformer.py``); differences are noted where they occur.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock

__all__ = [
    "DEX_MODES",
    "ROUTING_TYPES",
    "ALIGNMENT_LOSSES",
    "RouterOutput",
    "NoisyTopKRouter",
    "StackedExpertMLP",
    "DEXLayer",
    "alignment_loss",
]

DEX_MODES = ("pretrain", "experts", "director")
ROUTING_TYPES = ("image", "token")
ALIGNMENT_LOSSES = ("soft_ce", "cosine")


def alignment_loss(
    expert_features: torch.Tensor,
    director_features: torch.Tensor,
    kind: str = "soft_ce",
    student_temperature: float = 1.0,
    teacher_temperature: float = 0.5,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Loss pulling the experts' output towards the director's.

    Args:
        expert_features: routed expert output, shape ``[..., D]``.
        director_features: director output, same shape; it is treated as a constant target.
        kind: ``"soft_ce"`` (the public code's default: cross-entropy between the softened director
            distribution and the expert distribution over the feature axis) or ``"cosine"``
            (the paper's ``1 - cos``).
        student_temperature: softmax temperature of the experts' distribution (soft_ce only).
        teacher_temperature: softmax temperature of the director's distribution (soft_ce only).
        eps: floor of the expert probabilities before the logarithm, as in the public code.

    Returns:
        a scalar tensor, averaged over every position of ``[...]``.
    """
    target = director_features.detach()
    if kind == "soft_ce":
        student = torch.softmax(expert_features / student_temperature, dim=-1)
        teacher = torch.softmax(target / teacher_temperature, dim=-1)
        return -(teacher * torch.log(torch.clamp(student, min=eps))).sum(dim=-1).mean()
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(expert_features, target, dim=-1).mean()
    raise ValueError(f"unknown alignment loss {kind!r}; expected one of {ALIGNMENT_LOSSES}.")


class RouterOutput(NamedTuple):
    """What the router decides for one batch.

    gates: ``[B, T, K]`` renormalised weights of the chosen experts (T = 1 for image routing, N for token routing).
    indices: ``[B, T, K]`` chosen expert ids.
    probs: ``[B, T, E]`` full softmax probabilities.
    balance_loss: scalar load-balance loss ``E * sum(importance * stop_grad(importance))``.
    """

    gates: torch.Tensor
    indices: torch.Tensor
    probs: torch.Tensor
    balance_loss: torch.Tensor


class NoisyTopKRouter(nn.Module):
    """Noisy top-k router deciding per image (on the CLS token) or per token.

    Logits come from a bias-free linear map ``hidden_size -> num_experts``. In training, exploration noise
    ``noise_std * (N(0, 1) + (1 - load / sum(load)))`` is added, ``load`` being the buffer ``expert_load``
    (an EMA of each expert's share of the gates, kept by :class:`DEXLayer`). Gates are
    ``softmax(logits / tau)``, cut to the top k and renormalised over the k chosen.

    Args:
        hidden_size: token dimension D.
        num_experts: number of experts E.
        top_k: number of experts chosen per routing unit, ``1 <= top_k <= num_experts``.
        tau: softmax temperature.
        routing: ``"image"`` (one decision per image, from token 0, the CLS token) or ``"token"``.
    """

    def __init__(
        self, hidden_size: int, num_experts: int, top_k: int = 2, tau: float = 0.5, routing: str = "image"
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be at least 1, got {num_experts}.")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be between 1 and num_experts={num_experts}, got top_k={top_k}.")
        if routing not in ROUTING_TYPES:
            raise ValueError(f"unknown routing {routing!r}; expected one of {ROUTING_TYPES}.")
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}.")
        self.num_experts = num_experts
        self.top_k = top_k
        self.tau = tau
        self.routing = routing
        self.noise_std = 0.0
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """
        Args:
            x: tokens ``[B, N, D]``; token 0 is the CLS token.
        """
        tokens = x[:, :1] if self.routing == "image" else x
        logits = self.gate(tokens)  # [B, T, E]
        if self.training and self.noise_std > 0:
            load = self.expert_load.to(logits.dtype)
            exploration = 1.0 - load / (load.sum() + 1e-6)
            logits = logits + self.noise_std * (torch.randn_like(logits) + exploration)
        probs = torch.softmax(logits.float() / self.tau, dim=-1)
        top_probs, indices = torch.topk(probs, self.top_k, dim=-1)
        gates = top_probs / top_probs.sum(dim=-1, keepdim=True)
        importance = probs.mean(dim=(0, 1))
        balance = self.num_experts * torch.sum(importance * importance.detach())
        return RouterOutput(gates, indices, probs, balance)


class _GroupedExpertMLP(torch.autograd.Function):
    """``E`` GELU MLPs applied to contiguous row groups, with a hand-written backward.

    Each expert's weight gradient is written straight into its slice of the stacked gradient (no zero-filled
    per-expert copies, no stacking).
    Rows: ``x [R, D]``; ``rows[e]`` consecutive rows belong to expert e.
    """

    @staticmethod
    def forward(ctx, x, rows, w1, b1, w2, b2):  # type: ignore[override]
        starts = [0]
        for r in rows:
            starts.append(starts[-1] + r)
        pre = x.new_empty((x.shape[0], w1.shape[1]))
        out = x.new_empty((x.shape[0], w2.shape[1]))
        for e, r in enumerate(rows):
            if r:
                torch.addmm(b1[e], x[starts[e] : starts[e + 1]], w1[e].t(), out=pre[starts[e] : starts[e + 1]])
        hidden = F.gelu(pre)
        for e, r in enumerate(rows):
            if r:
                torch.addmm(b2[e], hidden[starts[e] : starts[e + 1]], w2[e].t(), out=out[starts[e] : starts[e + 1]])
        ctx.save_for_backward(x, pre, hidden, w1, w2)
        ctx.starts = starts
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, pre, hidden, w1, w2 = ctx.saved_tensors
        starts = ctx.starts
        grad_out = grad_out.contiguous()
        num_experts = w1.shape[0]
        grad_w1, grad_b1 = torch.empty_like(w1), torch.empty(w1.shape[:2], dtype=w1.dtype, device=w1.device)
        grad_w2, grad_b2 = torch.empty_like(w2), torch.empty(w2.shape[:2], dtype=w2.dtype, device=w2.device)
        grad_hidden = torch.empty_like(pre)
        for e in range(num_experts):
            lo, hi = starts[e], starts[e + 1]
            if lo == hi:
                grad_w2[e].zero_()
                grad_b2[e].zero_()
                continue
            torch.mm(grad_out[lo:hi].t(), hidden[lo:hi], out=grad_w2[e])
            torch.sum(grad_out[lo:hi], dim=0, out=grad_b2[e])
            torch.mm(grad_out[lo:hi], w2[e], out=grad_hidden[lo:hi])
        grad_pre = torch.ops.aten.gelu_backward(grad_hidden, pre)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        for e in range(num_experts):
            lo, hi = starts[e], starts[e + 1]
            if lo == hi:
                grad_w1[e].zero_()
                grad_b1[e].zero_()
                continue
            torch.mm(grad_pre[lo:hi].t(), x[lo:hi], out=grad_w1[e])
            torch.sum(grad_pre[lo:hi], dim=0, out=grad_b1[e])
            if grad_x is not None:
                torch.mm(grad_pre[lo:hi], w1[e], out=grad_x[lo:hi])
        return grad_x, None, grad_w1, grad_b1, grad_w2, grad_b2


class StackedExpertMLP(nn.Module):
    """E expert MLPs (``D -> H -> D``, GELU) held as stacked weights and applied to routed units.

    A routing unit is one image (all its tokens) or one token. Units are grouped by expert with a single sort,
    so each expert runs one dense matrix product over all the units that chose it; no per-expert gathers.

    Parameters use ``nn.Linear`` layouts with a leading expert axis:
    ``linear1_weight [E, H, D]``, ``linear1_bias [E, H]``, ``linear2_weight [E, D, H]``, ``linear2_bias [E, D]``.
    """

    def __init__(self, num_experts: int, hidden_size: int, mlp_dim: int, dropout_rate: float = 0.0) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.linear1_weight = nn.Parameter(torch.empty(num_experts, mlp_dim, hidden_size))
        self.linear1_bias = nn.Parameter(torch.zeros(num_experts, mlp_dim))
        self.linear2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, mlp_dim))
        self.linear2_bias = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.drop = nn.Dropout(dropout_rate)
        for weight in (self.linear1_weight, self.linear2_weight):
            for expert_weight in weight.data:
                nn.init.xavier_uniform_(expert_weight)

    def copy_from_mlp(self, mlp: MLPBlock) -> None:
        """Make every expert an exact copy of a MONAI ``MLPBlock`` (used to start experts from the director)."""
        with torch.no_grad():
            self.linear1_weight.copy_(mlp.linear1.weight.unsqueeze(0).expand_as(self.linear1_weight))
            self.linear1_bias.copy_(mlp.linear1.bias.unsqueeze(0).expand_as(self.linear1_bias))
            self.linear2_weight.copy_(mlp.linear2.weight.unsqueeze(0).expand_as(self.linear2_weight))
            self.linear2_bias.copy_(mlp.linear2.bias.unsqueeze(0).expand_as(self.linear2_bias))

    def _expert(self, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor):
        hidden = self.drop(F.gelu(F.linear(x, w1, b1)))
        return self.drop(F.linear(hidden, w2, b2))

    def forward(self, units: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """
        Args:
            units: ``[U, T, D]``: U routing units of T tokens each.
            gates: ``[U, K]`` weights of the chosen experts.
            indices: ``[U, K]`` chosen expert ids.

        Returns:
            ``[U, T, D]``: for each unit, the gate-weighted sum of its K experts' outputs.
        """
        if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_exporting():
            return self._forward_exportable(units, gates, indices)
        top_k = indices.shape[1]
        flat_experts = indices.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        unit_of = torch.div(order, top_k, rounding_mode="floor")
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        if self._fused_path_applies():
            tokens, dim = units.shape[1], units.shape[2]
            rows = [c * tokens for c in counts]
            grouped_rows = units.index_select(0, unit_of).reshape(-1, dim)
            outputs = _GroupedExpertMLP.apply(
                grouped_rows, rows, self.linear1_weight, self.linear1_bias, self.linear2_weight, self.linear2_bias
            ).reshape(-1, tokens, dim)
            weighted = outputs * gates.reshape(-1)[order].to(units.dtype).view(-1, 1, 1)
            return torch.zeros_like(units, dtype=weighted.dtype).index_add_(0, unit_of, weighted)
        grouped = units.index_select(0, unit_of).split(counts)
        # unbind once: its backward is a single stack, where indexing each expert would zero-fill E full copies
        weights = zip(
            self.linear1_weight.unbind(0),
            self.linear1_bias.unbind(0),
            self.linear2_weight.unbind(0),
            self.linear2_bias.unbind(0),
        )
        outputs = [self._expert(chunk, *w) for chunk, w in zip(grouped, weights) if chunk.shape[0] > 0]
        weighted = torch.cat(outputs) * gates.reshape(-1)[order].to(units.dtype).view(-1, 1, 1)
        out = torch.zeros_like(units, dtype=weighted.dtype)
        return out.index_add_(0, unit_of, weighted)

    def _fused_path_applies(self) -> bool:
        """The hand-written grouped kernel covers float32/float64 without autocast or active dropout."""
        dropout_active = self.training and self.drop.p > 0
        autocast = torch.is_autocast_enabled() or torch.is_autocast_enabled("cpu")
        return not dropout_active and not autocast and self.linear1_weight.dtype in (torch.float32, torch.float64)

    def _forward_exportable(self, units: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The export path (``torch.export``, ONNX, tracing): no host syncs, no data-dependent shapes, routing decided
        per unit at run time. Image routing gathers each image's K weight sets; token routing (one token per unit)
        runs every expert densely and weights them by the gates, as gathering weights per token would hold
        ``U * K * H * D`` values."""
        if units.shape[1] == 1:
            return self._forward_dense(units, gates, indices)
        return self._forward_gathered(units, gates, indices)

    def _forward_dense(self, units: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Every expert on every unit, summed with the gates scattered to ``[U, E]`` (zero for the experts not
        chosen): the same result as the routed paths."""
        weights = torch.zeros(indices.shape[0], self.num_experts, dtype=units.dtype, device=units.device)
        weights = weights.scatter(1, indices, gates.to(units.dtype))  # [U, E]
        hidden = torch.einsum("utd,ehd->uteh", units, self.linear1_weight) + self.linear1_bias
        hidden = self.drop(F.gelu(hidden))
        out = self.drop(torch.einsum("uteh,edh->uted", hidden, self.linear2_weight) + self.linear2_bias)
        return torch.einsum("uted,ue->utd", out, weights)

    def _forward_gathered(self, units: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Same result with per-unit gathered weights (``[U, K, H, D]``) and batched products."""
        w1 = self.linear1_weight[indices]  # [U, K, H, D]
        hidden = torch.einsum("utd,ukhd->ukth", units, w1) + self.linear1_bias[indices].unsqueeze(2)
        hidden = self.drop(F.gelu(hidden))
        w2 = self.linear2_weight[indices]  # [U, K, D, H]
        out = torch.einsum("ukth,ukdh->uktd", hidden, w2) + self.linear2_bias[indices].unsqueeze(2)
        out = self.drop(out)
        return torch.einsum("uktd,uk->utd", out, gates.to(out.dtype))


class DEXLayer(nn.Module):
    """A DEX module replacing a transformer block's MLP.

    Modes:
        - ``"pretrain"``: the output is the routed experts' mixture; the director (no gradient) gives the alignment
          target and, in training mode, is updated by GEMA:
          ``director <- m * director + (1 - m) * sum_e w_e * expert_e``, ``w`` = gates summed per expert over the
          batch, normalised. Experts start as copies of the director.
        - ``"experts"``: fine-tuning through the routed experts (director unused and frozen).
        - ``"director"``: fine-tuning through the director alone, a dense MLP (experts and router unused and frozen).

    The expert-load statistic (EMA, momentum ``load_momentum``) and GEMA change only in training mode. Under
    ``torch.distributed`` the per-expert gate mass is all-reduced first, so every rank applies the same update.
    (The public code also updates both during evaluation passes; this layer does not.)

    After each forward the layer keeps ``alignment_loss``, ``balance_loss`` (scalar tensors, zero where they do not
    apply) and ``routing`` (``{"indices": [B, K] or [B, N, K], "gates": same}``) for the enclosing network.

    Args:
        hidden_size: token dimension D.
        mlp_dim: hidden dimension H of every expert and of the director.
        num_experts: number of experts E.
        top_k: experts chosen per routing unit.
        mode: one of ``DEX_MODES``.
        routing: ``"image"`` (CLS token decides for the whole image) or ``"token"``.
        tau: router softmax temperature.
        alignment: ``"soft_ce"`` (public code, default) or ``"cosine"`` (paper).
        dropout_rate: dropout inside the MLPs.
        load_momentum: EMA momentum of the expert-load statistic.
    """

    def __init__(
        self,
        hidden_size: int,
        mlp_dim: int,
        num_experts: int = 8,
        top_k: int = 2,
        mode: str = "pretrain",
        routing: str = "image",
        tau: float = 0.5,
        alignment: str = "soft_ce",
        dropout_rate: float = 0.0,
        load_momentum: float = 0.99,
    ) -> None:
        super().__init__()
        if mode not in DEX_MODES:
            raise ValueError(f"unknown DEX mode {mode!r}; expected one of {DEX_MODES}.")
        if alignment not in ALIGNMENT_LOSSES:
            raise ValueError(f"unknown alignment loss {alignment!r}; expected one of {ALIGNMENT_LOSSES}.")
        self.num_experts = num_experts
        self.top_k = top_k
        self.alignment = alignment
        self.load_momentum = load_momentum
        self.gema_momentum = 0.99
        self.director = MLPBlock(hidden_size, mlp_dim, dropout_rate, act="GELU", dropout_mode="vit")
        self.experts = StackedExpertMLP(num_experts, hidden_size, mlp_dim, dropout_rate)
        self.router = NoisyTopKRouter(hidden_size, num_experts, top_k, tau=tau, routing=routing)
        self.experts.copy_from_mlp(self.director)
        self.mode = mode
        self.set_mode(mode)
        zero = torch.zeros(())
        self.alignment_loss: torch.Tensor = zero
        self.balance_loss: torch.Tensor = zero
        self.routing: dict[str, torch.Tensor] = {}

    @property
    def noise_std(self) -> float:
        return self.router.noise_std

    @noise_std.setter
    def noise_std(self, value: float) -> None:
        self.router.noise_std = float(value)

    def set_mode(self, mode: str) -> None:
        """Switch between pre-training and the two fine-tuning modes, setting which parameters take gradients."""
        if mode not in DEX_MODES:
            raise ValueError(f"unknown DEX mode {mode!r}; expected one of {DEX_MODES}.")
        self.mode = mode
        self.director.requires_grad_(mode == "director")
        self.experts.requires_grad_(mode != "director")
        self.router.requires_grad_(mode != "director")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: tokens ``[B, N, D]`` (token 0 is the CLS token when routing is ``"image"``).

        Returns:
            ``[B, N, D]``.
        """
        if self.mode == "director":
            if torch.compiler.is_exporting():  # losses and routing records are not part of an exported graph
                return self.director(x)
            self.alignment_loss = self.balance_loss = x.new_zeros(())
            self.routing = {}
            return self.director(x)

        batch, tokens, dim = x.shape
        decision = self.router(x)
        if self.router.routing == "image":
            units, gates, indices = x, decision.gates[:, 0], decision.indices[:, 0]
        else:
            units = x.reshape(batch * tokens, 1, dim)
            gates, indices = decision.gates.reshape(batch * tokens, -1), decision.indices.reshape(batch * tokens, -1)
        out = self.experts(units, gates, indices).reshape(batch, tokens, dim)
        if torch.compiler.is_exporting():
            return out

        if self.mode == "pretrain":
            # the target comes from the director before this step's GEMA update, as in the public code
            with torch.no_grad():
                target = self.director(x)
            self.alignment_loss = alignment_loss(out, target, self.alignment)
        else:
            self.alignment_loss = x.new_zeros(())
        if self.training:
            self._update_statistics(gates.detach(), indices)
        self.balance_loss = decision.balance_loss
        if self.router.routing == "image":
            self.routing = {"indices": indices, "gates": gates.detach()}
        else:
            self.routing = {"indices": decision.indices, "gates": decision.gates.detach()}
        return out

    @torch.no_grad()
    def expert_gate_mass(self, gates: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Gates summed per expert over the batch (all-reduced across ranks when distributed); ``[E]`` float32."""
        mass = torch.zeros(self.num_experts, device=gates.device, dtype=torch.float32)
        mass.scatter_add_(0, indices.reshape(-1), gates.reshape(-1).float())
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(mass)
        return mass

    @torch.no_grad()
    def _update_statistics(self, gates: torch.Tensor, indices: torch.Tensor) -> None:
        weights = self.expert_gate_mass(gates, indices)
        weights = weights / (weights.sum() + 1e-6)
        load = self.router.expert_load
        load.mul_(self.load_momentum).add_(weights.to(load.device), alpha=1.0 - self.load_momentum)
        if self.mode == "pretrain":
            self.gema_update(weights, self.gema_momentum)

    @torch.no_grad()
    def gema_update(self, weights: torch.Tensor, momentum: float) -> None:
        """Group EMA of the director: ``director <- m * director + (1 - m) * sum_e weights[e] * expert_e``.

        Args:
            weights: ``[E]`` non-negative expert weights summing to one.
            momentum: m in [0, 1].
        """
        pairs = (
            (self.director.linear1.weight, self.experts.linear1_weight),
            (self.director.linear1.bias, self.experts.linear1_bias),
            (self.director.linear2.weight, self.experts.linear2_weight),
            (self.director.linear2.bias, self.experts.linear2_bias),
        )
        for director_param, expert_param in pairs:
            flat = director_param.view(1, -1)
            experts = expert_param.detach().reshape(expert_param.shape[0], -1)
            # one fused pass: director <- m * director + (1 - m) * weights @ experts
            torch.addmm(flat, weights.to(experts.dtype).view(1, -1), experts, beta=momentum, alpha=1.0 - momentum, out=flat)
