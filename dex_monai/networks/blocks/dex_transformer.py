"""Transformer block whose MLP is a DEX layer, and the per-layer expert / top-k schedules."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from monai.networks.blocks import MLPBlock, SABlock

from dex_monai.networks.blocks.dex_layer import DEXLayer
from dex_monai.networks.blocks.m4oe_layer import ModalityExpertLayer

__all__ = ["DEXTransformerBlock", "MLP_TYPES", "expert_schedule", "set_layer_norm_eps", "top_k_schedule"]

MLP_TYPES = ("dex", "m4oe", "dense")
_MLP_ATTRIBUTE = {"dense": "mlp", "m4oe": "m4oe", "dex": "dex"}


def expert_schedule(num_layers: int, min_experts: int, max_experts: int) -> list[int]:
    """Expert count per layer, from ``max_experts`` in the first layers down towards ``min_experts``.

    As the public code: each count from max to min is repeated ``ceil(L / (max - min + 1))`` times and the list is cut
    to L, so the schedule is cut short and the deepest layers may never reach ``min_experts``: 8 experts down to a
    minimum of 6 over 4 layers gives ``[8, 8, 7, 7]``.
    """
    if min_experts < 1 or max_experts < min_experts:
        raise ValueError(f"need 1 <= min_experts <= max_experts, got min={min_experts}, max={max_experts}.")
    repeat = math.ceil(num_layers / (max_experts - min_experts + 1))
    counts = [e for e in range(max_experts, min_experts - 1, -1) for _ in range(repeat)]
    return counts[:num_layers]


def top_k_schedule(num_layers: int, min_top_k: int, max_top_k: int) -> list[int]:
    """Top-k per layer, from ``min_top_k`` in the first layers up towards ``max_top_k``; cut short to L as
    :func:`expert_schedule` (as the public code)."""
    if min_top_k < 1 or max_top_k < min_top_k:
        raise ValueError(f"need 1 <= min_top_k <= max_top_k, got min={min_top_k}, max={max_top_k}.")
    repeat = math.ceil(num_layers / (max_top_k - min_top_k + 1))
    values = [k for k in range(min_top_k, max_top_k + 1) for _ in range(repeat)]
    return values[:num_layers]


def set_layer_norm_eps(module: nn.Module, eps: float) -> int:
    """Set ``eps`` on every ``nn.LayerNorm`` inside ``module`` (read at each forward, so it takes effect at once).

    MONAI's ``TransformerBlock`` takes no eps argument; setting it on the built block keeps MONAI's block and its
    state-dict names, where a subclass would copy its constructor. Returns how many norms had another eps.
    """
    changed = 0
    for norm in module.modules():
        if isinstance(norm, nn.LayerNorm):
            changed += int(norm.eps != eps)
            norm.eps = eps
    for owner in module.modules():
        if hasattr(owner, "layer_norm_eps"):
            owner.layer_norm_eps = eps  # networks that normalise functionally (the MAE's feature targets)
    return changed


class DEXTransformerBlock(nn.Module):
    """Pre-norm ViT block (MONAI ``SABlock`` attention) whose MLP is a :class:`DEXLayer`.

    ``mlp_type`` chooses the MLP: ``"dex"`` (a :class:`DEXLayer` stored as ``dex``), ``"m4oe"`` (modality experts
    with a gating network, :class:`ModalityExpertLayer`, stored as ``m4oe``) or ``"dense"`` (a MONAI ``MLPBlock``
    stored as ``mlp``, so the state dict has MONAI ``TransformerBlock``'s names: the monolithic baseline on the same
    code path). ``dense=True`` is short for ``mlp_type="dense"``. ``layer_norm_eps`` is the eps of both LayerNorms
    (1e-5, PyTorch's default; the DEX public code's models use 1e-6).

    Input and output: ``[B, N, D]``.
    """

    def __init__(
        self,
        hidden_size: int,
        mlp_dim: int,
        num_heads: int,
        num_experts: int = 8,
        top_k: int = 2,
        mode: str = "pretrain",
        routing: str = "image",
        tau: float = 0.5,
        alignment: str = "soft_ce",
        dropout_rate: float = 0.0,
        qkv_bias: bool = True,
        dense: bool = False,
        mlp_type: str = "dex",
        modalities: tuple[str, ...] = (),
        m4oe_stage: str = "gated",
        m4oe_gate: str = "experts",
        default_modality: str | None = None,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if dense:
            mlp_type = "dense"
        if mlp_type not in MLP_TYPES:
            raise ValueError(f"unknown mlp_type {mlp_type!r}; expected one of {MLP_TYPES}.")
        self.norm1 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.attn = SABlock(hidden_size, num_heads, dropout_rate, qkv_bias=qkv_bias, use_flash_attention=True)
        self.norm2 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.mlp_type = mlp_type
        self.dense = mlp_type == "dense"
        if mlp_type == "dense":
            self.mlp = MLPBlock(hidden_size, mlp_dim, dropout_rate, act="GELU", dropout_mode="vit")
        elif mlp_type == "m4oe":
            self.m4oe = ModalityExpertLayer(
                hidden_size, mlp_dim, modalities, stage=m4oe_stage, gate=m4oe_gate,
                default_modality=default_modality, dropout_rate=dropout_rate,
            )
        else:
            self.dex = DEXLayer(
                hidden_size,
                mlp_dim,
                num_experts=num_experts,
                top_k=top_k,
                mode=mode,
                routing=routing,
                tau=tau,
                alignment=alignment,
                dropout_rate=dropout_rate,
            )

    @property
    def feed_forward(self) -> nn.Module:
        """The block's MLP, whichever type it is."""
        return getattr(self, _MLP_ATTRIBUTE[self.mlp_type])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.feed_forward(self.norm2(x))
