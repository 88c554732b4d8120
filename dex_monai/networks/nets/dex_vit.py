"""DEX vision transformer encoder for 2D and 3D images."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.data import MetaTensor
from monai.networks.blocks import PatchEmbeddingBlock
from monai.networks.layers import trunc_normal_
from monai.utils import ensure_tuple_rep

from dex_monai.networks.blocks.dex_layer import ALIGNMENT_LOSSES, DEX_MODES, ROUTING_TYPES, DEXLayer
from dex_monai.networks.blocks.dex_transformer import DEXTransformerBlock, expert_schedule, top_k_schedule
from dex_monai.networks.blocks.m4oe_layer import M4oEHostMixin, ModalityExpertLayer

__all__ = ["DEXViT", "check_image_geometry"]


def check_image_geometry(
    img_size: Sequence[int] | int, patch_size: Sequence[int] | int, spatial_dims: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validate and expand image and patch sizes; raise a ``ValueError`` that says what is wrong."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    for name, value in (("img_size", img_size), ("patch_size", patch_size)):
        if isinstance(value, Sequence) and len(value) != spatial_dims:
            raise ValueError(f"{name}={tuple(value)} has {len(value)} values but spatial_dims={spatial_dims}.")
    img = ensure_tuple_rep(img_size, spatial_dims)
    patch = ensure_tuple_rep(patch_size, spatial_dims)
    for i, p in zip(img, patch):
        if p < 1 or i < p or i % p != 0:
            raise ValueError(
                f"image size {tuple(img)} is not divisible by patch size {tuple(patch)} "
                "(every image side must be a positive multiple of the patch side)."
            )
    return tuple(int(i) for i in img), tuple(int(p) for p in patch)


class DEXViT(M4oEHostMixin, nn.Module):
    """Vision transformer encoder whose MLPs are DEX layers, for ``spatial_dims`` 2 or 3.

    Built from MONAI blocks (``PatchEmbeddingBlock``, ``SABlock``, ``MLPBlock``), with a CLS token prepended to the
    patch tokens (the image-wise router reads it). Parameter names follow MONAI's ``ViT`` (``patch_embedding``,
    ``cls_token``, ``blocks.i.norm1/attn/norm2``, ``norm``) with the MLP under ``blocks.i.dex`` (or ``blocks.i.mlp``
    when ``dense=True``).

    Expert counts and top-k may vary over depth: give ``min_experts``/``max_experts`` and ``min_top_k``/``max_top_k``
    (the public code's schedules: fewer experts and larger k in deeper layers), or a single ``num_experts``/``top_k``.

    Args:
        in_channels: image channels C.
        img_size: spatial size of the input.
        patch_size: patch size; must divide ``img_size``.
        spatial_dims: 2 or 3.
        hidden_size: token dimension D.
        mlp_dim: MLP hidden dimension H.
        num_layers: depth L.
        num_heads: attention heads.
        num_experts: experts per layer when no min/max is given.
        top_k: experts chosen per image when no min/max is given.
        mode: DEX mode of every layer: ``"pretrain"``, ``"experts"`` or ``"director"``.
        routing: ``"image"`` or ``"token"``.
        tau: router temperature.
        alignment: ``"soft_ce"`` or ``"cosine"``.
        pos_embed_type: MONAI position embedding type (``"sincos"``, ``"learnable"``, ``"none"``).
        dropout_rate: dropout rate.
        qkv_bias: bias of the attention's qkv projection.
        dense: plain MLPs instead of DEX layers (the monolithic baseline); short for ``mlp_type="dense"``.
        mlp_type: ``"dex"``, ``"m4oe"`` (modality experts + gating network, see
            :class:`~dex_monai.networks.blocks.ModalityExpertLayer`) or ``"dense"``.
        modalities, m4oe_stage, m4oe_gate, default_modality: the M4oE layers' settings (``mlp_type="m4oe"``).
        layer_norm_eps: eps of every LayerNorm (each block's two and the final one). 1e-5 (PyTorch's default) keeps
            earlier checkpoints' behaviour; the DEX public code's models (``mae_DEX_vit_base`` ...) use 1e-6.
    """

    def __init__(
        self,
        in_channels: int,
        img_size: Sequence[int] | int,
        patch_size: Sequence[int] | int,
        spatial_dims: int = 3,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        num_experts: int = 8,
        top_k: int = 2,
        min_experts: int | None = None,
        max_experts: int | None = None,
        min_top_k: int | None = None,
        max_top_k: int | None = None,
        mode: str = "experts",
        routing: str = "image",
        tau: float = 0.5,
        alignment: str = "soft_ce",
        pos_embed_type: str = "sincos",
        dropout_rate: float = 0.0,
        qkv_bias: bool = True,
        dense: bool = False,
        mlp_type: str = "dex",
        modalities: Sequence[str] = (),
        m4oe_stage: str = "gated",
        m4oe_gate: str = "experts",
        default_modality: str | None = None,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if dense:
            mlp_type = "dense"
        self.img_size, self.patch_size = check_image_geometry(img_size, patch_size, spatial_dims)
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}.")
        if mode not in DEX_MODES:
            raise ValueError(f"unknown DEX mode {mode!r}; expected one of {DEX_MODES}.")
        if routing not in ROUTING_TYPES:
            raise ValueError(f"unknown routing {routing!r}; expected one of {ROUTING_TYPES}.")
        if alignment not in ALIGNMENT_LOSSES:
            raise ValueError(f"unknown alignment loss {alignment!r}; expected one of {ALIGNMENT_LOSSES}.")
        if pos_embed_type == "sincos" and hidden_size % (2 * spatial_dims) != 0:
            raise ValueError(
                f"sin-cos position embedding in {spatial_dims}D needs hidden_size divisible by {2 * spatial_dims}, "
                f"got {hidden_size}."
            )
        self.spatial_dims = spatial_dims
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.mlp_type = mlp_type
        self.dense = mlp_type == "dense"
        self.grid_size = tuple(i // p for i, p in zip(self.img_size, self.patch_size))
        self.experts_per_layer = expert_schedule(
            num_layers, min_experts or num_experts, max_experts or min_experts or num_experts
        )
        self.top_k_per_layer = top_k_schedule(num_layers, min_top_k or top_k, max_top_k or min_top_k or top_k)
        for layer, (experts, k) in enumerate(zip(self.experts_per_layer, self.top_k_per_layer)):
            if mlp_type == "dex" and k > experts:
                raise ValueError(f"layer {layer}: top_k={k} is larger than its number of experts ({experts}).")

        self.patch_embedding = PatchEmbeddingBlock(
            in_channels=in_channels,
            img_size=self.img_size,
            patch_size=self.patch_size,
            hidden_size=hidden_size,
            num_heads=num_heads,
            proj_type="conv",
            pos_embed_type=pos_embed_type,
            dropout_rate=dropout_rate,
            spatial_dims=spatial_dims,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        trunc_normal_(self.cls_token, mean=0.0, std=0.02, a=-2.0, b=2.0)
        self.blocks = nn.ModuleList(
            [
                DEXTransformerBlock(
                    hidden_size,
                    mlp_dim,
                    num_heads,
                    num_experts=experts,
                    top_k=k,
                    mode=mode,
                    routing=routing,
                    tau=tau,
                    alignment=alignment,
                    dropout_rate=dropout_rate,
                    qkv_bias=qkv_bias,
                    mlp_type=mlp_type,
                    modalities=tuple(modalities),
                    m4oe_stage=m4oe_stage,
                    m4oe_gate=m4oe_gate,
                    default_modality=default_modality,
                    layer_norm_eps=layer_norm_eps,
                )
                for experts, k in zip(self.experts_per_layer, self.top_k_per_layer)
            ]
        )
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.layer_norm_eps = layer_norm_eps

    @property
    def n_patches(self) -> int:
        return int(self.patch_embedding.n_patches)

    def dex_layers(self) -> list[DEXLayer]:
        """The DEX layers in depth order (empty unless ``mlp_type="dex"``)."""
        return [blk.dex for blk in self.blocks] if self.mlp_type == "dex" else []

    def m4oe_layers(self) -> list[ModalityExpertLayer]:
        """The M4oE layers in depth order (empty unless ``mlp_type="m4oe"``)."""
        return [blk.m4oe for blk in self.blocks] if self.mlp_type == "m4oe" else []

    def set_mode(self, mode: str) -> None:
        """Set the mode of every DEX layer (``"pretrain"``, ``"experts"`` or ``"director"``)."""
        for layer in self.dex_layers():
            layer.set_mode(mode)

    def set_schedule_values(self, gema_momentum: float | None = None, noise_std: float | None = None) -> None:
        """Set the GEMA momentum and the router exploration noise of every layer (called by schedule handlers)."""
        for layer in self.dex_layers():
            if gema_momentum is not None:
                layer.gema_momentum = float(gema_momentum)
            if noise_std is not None:
                layer.noise_std = float(noise_std)

    def expert_load(self) -> list[torch.Tensor]:
        """Per layer the EMA of each expert's share of the gates, ``[E_l]``."""
        return [layer.router.expert_load.detach().clone() for layer in self.dex_layers()]

    def check_input(self, x: torch.Tensor) -> None:
        expected = (self.spatial_dims + 2, self.img_size)
        if x.dim() != expected[0] or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"{type(self).__name__} expects input [B, C, {', '.join(map(str, self.img_size))}], "
                f"got {list(x.shape)}."
            )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with position embeddings, ``[B, C, *spatial] -> [B, n_patches, D]``."""
        if isinstance(x, MetaTensor):
            x = x.as_tensor()  # routing regroups images along the batch axis; per-image metadata does not follow
        self.check_input(x)
        return self.patch_embedding(x)

    def prepend_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, n, D] -> [B, 1 + n, D]``."""
        return torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)

    def forward_blocks(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the blocks on ``[B, 1 + n, D]``; return the final normed tokens and every block's output."""
        hidden_states = []
        for blk in self.blocks:
            tokens = blk(tokens)
            hidden_states.append(tokens)
        return self.norm(tokens), hidden_states

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """
        Args:
            x: ``[B, C, *img_size]``.

        Returns:
            the normed tokens ``[B, 1 + n_patches, D]`` (token 0 is CLS) and the list of the L blocks' outputs,
            each ``[B, 1 + n_patches, D]``, as MONAI's ``ViT`` returns them.
        """
        return self.forward_blocks(self.prepend_cls(self.embed(x)))

    def auxiliary_losses(self, layer_weighting: bool = True) -> dict[str, torch.Tensor]:
        """Alignment and balance losses of the last forward, averaged over layers.

        With ``layer_weighting`` the alignment loss of layer l (from 0) is divided by ``L - l`` before averaging,
        so deeper layers weigh more (the public code's rule).
        """
        layers = self.dex_layers()
        if not layers:
            zero = self.cls_token.new_zeros(())
            return {"alignment": zero, "balance": zero}
        count = len(layers)
        alignment = torch.stack(
            [layer.alignment_loss / (float(count - i) if layer_weighting else 1.0) for i, layer in enumerate(layers)]
        ).mean()
        balance = torch.stack([layer.balance_loss for layer in layers]).mean()
        return {"alignment": alignment, "balance": balance}

    def routing(self) -> list[dict[str, torch.Tensor]]:
        """Per layer the experts chosen in the last forward: ``{"indices": [B, K], "gates": [B, K]}``.

        For M4oE layers: the modality expert (expert stage) or the expert with the largest mean gate (gated stage).
        """
        return [layer.routing for layer in self.dex_layers() + self.m4oe_layers()]
