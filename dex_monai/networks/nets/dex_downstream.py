"""Downstream networks on a DEX encoder: UNETR segmentation and CLS-token classification (2D and 3D)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock

from dex_monai.networks.nets.dex_vit import DEXViT

__all__ = ["DEXUNETR", "DEXClassifier"]


def _encoder_kwargs(kwargs: dict) -> dict:
    kwargs.setdefault("mode", "experts")
    return kwargs


class DEXUNETR(nn.Module):
    """UNETR (Hatamizadeh et al.) with a :class:`DEXViT` encoder, for ``spatial_dims`` 2 or 3.

    For a cubic patch of side ``2**s`` the decoder has s up-sampling stages, so any power-of-two patch works; with
    patch 16 the module names (``vit``, ``encoder1..4``, ``decoder5..2``, ``out``) and skip layers (outputs of blocks
    ``L/4, L/2, 3L/4``; 3, 6, 9 for L = 12) are MONAI ``UNETR``'s. The CLS token is dropped before the skips.

    Args:
        in_channels: image channels.
        out_channels: segmentation classes (background included).
        img_size: spatial size of the input.
        patch_size: encoder patch size, a power of two of at least 4 on every side.
        spatial_dims: 2 or 3.
        feature_size: decoder base width.
        norm_name: decoder normalisation.
        res_block: residual decoder blocks.
        encoder_kwargs: anything else for :class:`DEXViT` (hidden_size, num_layers, num_experts, mode,
            layer_norm_eps, ...).
            ``mode`` defaults to ``"experts"``; use ``"director"`` for the dense director encoder.

    Input ``[B, C, *img_size]``; output logits ``[B, out_channels, *img_size]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        img_size: Sequence[int] | int,
        patch_size: Sequence[int] | int = 16,
        spatial_dims: int = 3,
        feature_size: int = 16,
        norm_name: str | tuple = "instance",
        res_block: bool = True,
        **encoder_kwargs,
    ) -> None:
        super().__init__()
        self.vit = DEXViT(
            in_channels=in_channels,
            img_size=img_size,
            patch_size=patch_size,
            spatial_dims=spatial_dims,
            **_encoder_kwargs(encoder_kwargs),
        )
        sides = set(self.vit.patch_size)
        side = sides.pop()
        if sides or side < 4 or side & (side - 1):
            raise ValueError(
                f"DEXUNETR needs the same power-of-two patch side of at least 4 on every axis, got {self.vit.patch_size}."
            )
        stages = int(math.log2(side))
        depth = self.vit.num_layers
        hidden = self.vit.hidden_size
        self.stages = stages
        self.spatial_dims = spatial_dims
        self.feat_size = self.vit.grid_size
        self.skip_layers = [min(depth - 1, max(0, depth * j // stages)) for j in range(1, stages)]

        self.encoder1 = UnetrBasicBlock(
            spatial_dims, in_channels, feature_size, kernel_size=3, stride=1, norm_name=norm_name, res_block=res_block
        )
        for j in range(1, stages):
            # 1 + num_layer transposed convolutions take the token grid to 1 / 2**j of the image
            block = UnetrPrUpBlock(
                spatial_dims=spatial_dims,
                in_channels=hidden,
                out_channels=feature_size * 2**j,
                num_layer=stages - j - 1,
                kernel_size=3,
                stride=1,
                upsample_kernel_size=2,
                norm_name=norm_name,
                conv_block=True,
                res_block=res_block,
            )
            setattr(self, f"encoder{j + 1}", block)
        for j in range(stages, 0, -1):
            in_ch = hidden if j == stages else feature_size * 2**j
            setattr(
                self,
                f"decoder{j + 1}",
                UnetrUpBlock(
                    spatial_dims=spatial_dims,
                    in_channels=in_ch,
                    out_channels=feature_size * 2 ** (j - 1),
                    kernel_size=3,
                    upsample_kernel_size=2,
                    norm_name=norm_name,
                    res_block=res_block,
                ),
            )
        self.out = UnetOutBlock(spatial_dims=spatial_dims, in_channels=feature_size, out_channels=out_channels)

    def proj_feat(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + n, D]`` (CLS first) ``-> [B, D, *grid]``."""
        patches = tokens[:, 1:]
        batch = patches.shape[0]
        x = patches.reshape(batch, *self.feat_size, patches.shape[-1])
        return x.permute(0, self.spatial_dims + 1, *range(1, self.spatial_dims + 1)).contiguous()

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        x, hidden_states = self.vit(x_in)
        skips = [self.encoder1(x_in)]
        for j, layer in enumerate(self.skip_layers, start=1):
            skips.append(getattr(self, f"encoder{j + 1}")(self.proj_feat(hidden_states[layer])))
        out = self.proj_feat(x)
        for j in range(self.stages, 0, -1):
            out = getattr(self, f"decoder{j + 1}")(out, skips[j - 1])
        return self.out(out)


class DEXClassifier(nn.Module):
    """Image classifier: a :class:`DEXViT` encoder and a linear head on the normed CLS token.

    Args:
        in_channels: image channels.
        num_classes: output classes.
        img_size, patch_size, spatial_dims: as :class:`DEXViT`.
        head_dropout: dropout before the head.
        encoder_kwargs: anything else for :class:`DEXViT` (``layer_norm_eps`` included); ``mode`` defaults to ``"experts"``.

    Input ``[B, C, *img_size]``; output logits ``[B, num_classes]``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        img_size: Sequence[int] | int,
        patch_size: Sequence[int] | int = 16,
        spatial_dims: int = 2,
        head_dropout: float = 0.0,
        **encoder_kwargs,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}.")
        self.encoder = DEXViT(
            in_channels=in_channels,
            img_size=img_size,
            patch_size=patch_size,
            spatial_dims=spatial_dims,
            **_encoder_kwargs(encoder_kwargs),
        )
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(self.encoder.hidden_size, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.encoder(x)
        return self.head(tokens[:, 0])
