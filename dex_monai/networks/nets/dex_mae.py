"""Masked auto-encoder pre-training of a DEX encoder (2D and 3D)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import TransformerBlock
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from monai.networks.layers import trunc_normal_

from dex_monai.networks.blocks.dex_transformer import set_layer_norm_eps
from dex_monai.networks.nets.dex_vit import DEXViT

__all__ = ["DEXMaskedAutoEncoder", "patchify", "unpatchify"]


def patchify(images: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """``[B, C, *spatial] -> [B, n_patches, prod(patch_size) * C]``, patches in the order of the patch embedding."""
    batch, channels, *spatial = images.shape
    dims = len(spatial)
    grid = [s // p for s, p in zip(spatial, patch_size)]
    shape = [batch, channels]
    for g, p in zip(grid, patch_size):
        shape += [g, p]
    x = images.reshape(shape)
    grid_axes = [2 + 2 * i for i in range(dims)]
    patch_axes = [3 + 2 * i for i in range(dims)]
    x = x.permute(0, *grid_axes, *patch_axes, 1)
    return x.reshape(batch, int(np.prod(grid)), int(np.prod(patch_size)) * channels)


def unpatchify(patches: torch.Tensor, patch_size: Sequence[int], img_size: Sequence[int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, n_patches, prod(patch_size) * C] -> [B, C, *img_size]``."""
    batch = patches.shape[0]
    dims = len(img_size)
    grid = [s // p for s, p in zip(img_size, patch_size)]
    x = patches.reshape(batch, *grid, *patch_size, channels)
    order = [0, 1 + 2 * dims]
    for i in range(dims):
        order += [1 + i, 1 + dims + i]
    return x.permute(order).reshape(batch, channels, *img_size)


class DEXMaskedAutoEncoder(nn.Module):
    """MAE with a :class:`DEXViT` encoder (DEX layers in ``"pretrain"`` mode) and a dense transformer decoder.

    Random masking per sample (argsort of uniform noise), fixed sin-cos positions, a CLS token, and a normalised-pixel
    MSE on the masked patches. The forward pass also returns the DEX alignment and balance losses and routing records.

    Args:
        in_channels: image channels C.
        img_size: input spatial size.
        patch_size: patch size.
        spatial_dims: 2 or 3.
        hidden_size, mlp_dim, num_layers, num_heads: encoder width, MLP width, depth and heads.
        num_experts, top_k, min_experts, max_experts, min_top_k, max_top_k: expert pool per layer (see :class:`DEXViT`).
        masking_ratio: fraction of patches hidden from the encoder, in (0, 1).
        decoder_hidden_size, decoder_mlp_dim, decoder_num_layers, decoder_num_heads: the dense decoder.
        norm_pix_loss: normalise every target patch by its own mean and variance.
        routing, tau, alignment: see :class:`DEXViT`.
        alignment_layer_weighting: divide layer l's alignment loss by ``L - l`` before averaging (public code).
        dense: plain MLPs in the encoder: the monolithic MAE baseline on the same code path.
        qkv_bias, dropout_rate: as in MONAI's ViT.
        mlp_type, modalities, m4oe_stage, m4oe_gate, default_modality: encoder MLP family (see :class:`DEXViT`);
            ``mlp_type="m4oe"`` with ``m4oe_stage="expert"`` pre-trains each modality expert on its own modality
            (give the modality of every image with ``encoder.set_modality_ids``).
        feature_reconstruction_weight: UMD's multi-level reconstruction: when positive, the decoder also predicts,
            at the masked positions, the features an EMA teacher of the encoder computes from the whole image
            (LayerNorm-ed, without affine, of the blocks in ``teacher_layers``); ``out["feature"]`` is this weight
            times the mean squared error. The teacher follows the encoder with ``teacher_momentum`` at every
            training forward.
        teacher_momentum: EMA momentum of the teacher.
        teacher_layers: encoder blocks (0-based) whose outputs are the feature targets; default the last.
        layer_norm_eps: eps of every LayerNorm of encoder and decoder (MONAI ``TransformerBlock``'s included) and of
            the feature targets' normalisation; 1e-5 by default, 1e-6 in the DEX public code's models.
    """

    def __init__(
        self,
        in_channels: int,
        img_size: Sequence[int] | int,
        patch_size: Sequence[int] | int,
        spatial_dims: int = 2,
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
        masking_ratio: float = 0.75,
        decoder_hidden_size: int = 512,
        decoder_mlp_dim: int = 2048,
        decoder_num_layers: int = 8,
        decoder_num_heads: int = 16,
        norm_pix_loss: bool = True,
        routing: str = "image",
        tau: float = 0.5,
        alignment: str = "soft_ce",
        alignment_layer_weighting: bool = True,
        dense: bool = False,
        qkv_bias: bool = True,
        dropout_rate: float = 0.0,
        mlp_type: str = "dex",
        modalities: Sequence[str] = (),
        m4oe_stage: str = "expert",
        m4oe_gate: str = "experts",
        default_modality: str | None = None,
        feature_reconstruction_weight: float = 0.0,
        teacher_momentum: float = 0.996,
        teacher_layers: Sequence[int] | None = None,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if not 0.0 < masking_ratio < 1.0:
            raise ValueError(f"masking_ratio must be in (0, 1), got {masking_ratio}.")
        if decoder_hidden_size % decoder_num_heads != 0:
            raise ValueError(
                f"decoder_hidden_size={decoder_hidden_size} must be divisible by decoder_num_heads={decoder_num_heads}."
            )
        if decoder_hidden_size % (2 * spatial_dims) != 0:
            raise ValueError(
                f"decoder sin-cos positions in {spatial_dims}D need decoder_hidden_size divisible by "
                f"{2 * spatial_dims}, got {decoder_hidden_size}."
            )
        self.encoder = DEXViT(
            in_channels=in_channels,
            img_size=img_size,
            patch_size=patch_size,
            spatial_dims=spatial_dims,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            num_experts=num_experts,
            top_k=top_k,
            min_experts=min_experts,
            max_experts=max_experts,
            min_top_k=min_top_k,
            max_top_k=max_top_k,
            mode="pretrain",
            routing=routing,
            tau=tau,
            alignment=alignment,
            pos_embed_type="sincos",
            dropout_rate=dropout_rate,
            qkv_bias=qkv_bias,
            dense=dense,
            mlp_type=mlp_type,
            modalities=modalities,
            m4oe_stage=m4oe_stage,
            m4oe_gate=m4oe_gate,
            default_modality=default_modality,
            layer_norm_eps=layer_norm_eps,
        )
        self.layer_norm_eps = layer_norm_eps
        self.in_channels = in_channels
        self.spatial_dims = spatial_dims
        self.masking_ratio = masking_ratio
        self.norm_pix_loss = norm_pix_loss
        self.alignment_layer_weighting = alignment_layer_weighting
        self.img_size = self.encoder.img_size
        self.patch_size = self.encoder.patch_size

        self.decoder_embed = nn.Linear(hidden_size, decoder_hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_hidden_size))
        self.decoder_pos_embedding = build_sincos_position_embedding(
            list(self.encoder.grid_size), decoder_hidden_size, spatial_dims
        )
        self.decoder_blocks = nn.ModuleList(
            [
                TransformerBlock(
                    decoder_hidden_size,
                    decoder_mlp_dim,
                    decoder_num_heads,
                    dropout_rate,
                    qkv_bias=qkv_bias,
                    use_flash_attention=True,
                )
                for _ in range(decoder_num_layers)
            ]
        )
        for blk in self.decoder_blocks:
            # MONAI's TransformerBlock always creates this LayerNorm, used only with cross-attention; frozen so that
            # DistributedDataParallel does not wait for gradients that never come
            blk.norm_cross_attn.requires_grad_(False)
        set_layer_norm_eps(self.decoder_blocks, layer_norm_eps)  # MONAI's TransformerBlock hard-codes 1e-5
        self.decoder_norm = nn.LayerNorm(decoder_hidden_size, eps=layer_norm_eps)
        self.decoder_pred = nn.Linear(decoder_hidden_size, int(np.prod(self.patch_size)) * in_channels)
        trunc_normal_(self.mask_token, mean=0.0, std=0.02, a=-2.0, b=2.0)
        for module in (self.decoder_embed, self.decoder_pred):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)

        if feature_reconstruction_weight < 0:
            raise ValueError(f"feature_reconstruction_weight must be >= 0, got {feature_reconstruction_weight}.")
        self.feature_reconstruction_weight = feature_reconstruction_weight
        self.teacher_momentum = teacher_momentum
        self.teacher_layers = list(teacher_layers) if teacher_layers is not None else [num_layers - 1]
        if any(not 0 <= layer < num_layers for layer in self.teacher_layers):
            raise ValueError(f"teacher_layers must be in [0, {num_layers}), got {self.teacher_layers}.")
        self.teacher: DEXViT | None = None
        if feature_reconstruction_weight > 0:
            self.teacher = copy.deepcopy(self.encoder).requires_grad_(False)
            self.feature_pred = nn.Linear(decoder_hidden_size, hidden_size * len(self.teacher_layers))

    def set_schedule_values(self, gema_momentum: float | None = None, noise_std: float | None = None) -> None:
        """Set GEMA momentum and router noise of every DEX layer (see :meth:`DEXViT.set_schedule_values`)."""
        self.encoder.set_schedule_values(gema_momentum=gema_momentum, noise_std=noise_std)

    def expert_load(self) -> list[torch.Tensor]:
        return self.encoder.expert_load()

    def random_masking(self, tokens: torch.Tensor, masking_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random subset of tokens per sample.

        Args:
            tokens: ``[B, n, D]``.

        Returns:
            kept tokens ``[B, n_keep, D]``, the mask ``[B, n]`` (1 = hidden) and the restoring permutation ``[B, n]``.
        """
        batch, length, dim = tokens.shape
        keep = max(1, int(length * (1.0 - masking_ratio)))
        noise = torch.rand(batch, length, device=tokens.device)
        shuffle = torch.argsort(noise, dim=1)
        restore = torch.argsort(shuffle, dim=1)
        kept = torch.gather(tokens, 1, shuffle[:, :keep].unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(batch, length, device=tokens.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, restore)
        return kept, mask, restore

    def forward_encoder(
        self, images: torch.Tensor, masking_ratio: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = self.encoder.embed(images)
        kept, mask, restore = self.random_masking(tokens, masking_ratio)
        latent, _ = self.encoder.forward_blocks(self.encoder.prepend_cls(kept))
        return latent, mask, restore

    @torch.no_grad()
    def update_teacher(self) -> None:
        """EMA of the encoder into the teacher (UMD feature reconstruction)."""
        if self.teacher is None:
            return
        m = self.teacher_momentum
        for t, s in zip(self.teacher.parameters(), self.encoder.parameters()):
            t.mul_(m).add_(s.detach(), alpha=1.0 - m)
        for t, s in zip(self.teacher.buffers(), self.encoder.buffers()):
            t.copy_(s)

    @torch.no_grad()
    def teacher_targets(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher features of every patch, ``[B, n_patches, D * len(teacher_layers)]``."""
        assert self.teacher is not None
        self.teacher.eval()
        _, hidden = self.teacher(images)
        eps = self.layer_norm_eps
        feats = [F.layer_norm(hidden[i][:, 1:], hidden[i].shape[-1:], eps=eps) for i in self.teacher_layers]
        return torch.cat(feats, dim=-1)

    def forward_decoder(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + n_keep, D] -> [B, n_patches, prod(patch) * C]``."""
        return self.decoder_pred(self.decode_tokens(latent, restore))

    def decode_tokens(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Decoder features of every patch, ``[B, 1 + n_keep, D] -> [B, n_patches, decoder_hidden_size]``."""
        x = self.decoder_embed(latent)
        batch, kept, dim = x.shape
        n_patches = restore.shape[1]
        fill = self.mask_token.expand(batch, n_patches + 1 - kept, -1)
        patches = torch.cat([x[:, 1:], fill], dim=1)
        patches = torch.gather(patches, 1, restore.unsqueeze(-1).expand(-1, -1, dim))
        patches = patches + self.decoder_pos_embedding.to(patches.dtype)
        x = torch.cat([x[:, :1], patches], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_norm(x)[:, 1:]

    def reconstruction_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error on the hidden patches (targets normalised per patch when ``norm_pix_loss``)."""
        target = patchify(images, self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, images: torch.Tensor, masking_ratio: float | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """
        Args:
            images: ``[B, C, *img_size]``.
            masking_ratio: overrides the constructor's ratio for this call.

        Returns:
            the reconstruction ``[B, C, *img_size]`` (in the normalised-patch space when ``norm_pix_loss``), and a
            dict with scalar losses ``"mae"``, ``"alignment"``, ``"balance"``, ``"feature"`` (UMD feature
            reconstruction, already weighted; 0 when off), the ``"mask"`` ``[B, n_patches]``
            (1 = hidden) and ``"routing"``: per layer ``{"indices": [B, K], "gates": [B, K]}`` (empty when dense).
        """
        ratio = self.masking_ratio if masking_ratio is None else masking_ratio
        latent, mask, restore = self.forward_encoder(images, ratio)
        decoded = self.decode_tokens(latent, restore)
        pred = self.decoder_pred(decoded)
        losses = self.encoder.auxiliary_losses(self.alignment_layer_weighting)
        out: dict[str, Any] = {
            "mae": self.reconstruction_loss(images, pred, mask),
            "alignment": losses["alignment"],
            "balance": losses["balance"],
            "feature": pred.new_zeros(()),
            "mask": mask,
            "routing": self.encoder.routing(),
        }
        if self.teacher is not None:
            if self.training:
                self.update_teacher()
            target = self.teacher_targets(images)
            per_patch = ((self.feature_pred(decoded).float() - target.float()) ** 2).mean(dim=-1)
            out["feature"] = self.feature_reconstruction_weight * (per_patch * mask).sum() / mask.sum()
        recon = unpatchify(pred, self.patch_size, self.img_size, self.in_channels)
        return recon, out
