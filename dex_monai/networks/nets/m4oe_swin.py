"""M4oE on its own architecture: MONAI's Swin UNETR with modality experts in every Swin block (Jiang et al., 2024).

M4oE is a Swin-UNet whose every Swin block MLP is replaced by modality-specific experts, first trained each on its own
modality (``"expert"`` stage), then mixed by a gating network learned during fine-tuning (``"gated"`` stage). Here the
host is MONAI's :class:`~monai.networks.nets.SwinUNETR` (2D or 3D through ``spatial_dims``): the MLP of every
``SwinTransformerBlock`` of its Swin encoder becomes a :class:`~dex_monai.networks.blocks.ModalityExpertLayer` (the
same layer as the ViT option; both gates, both stages, ``add_modality``). SwinUNETR's decoder is convolutional, so,
unlike the Swin-UNet of the paper, only the encoder's blocks carry experts.

:class:`M4oESwinClassifier` is the same Swin encoder for classification: the deepest Swin stage's features, averaged
over space, through a linear layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.data import MetaTensor
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import SwinTransformer, SwinTransformerBlock

from dex_monai.networks.blocks.m4oe_layer import M4oEHostMixin, ModalityExpertLayer

__all__ = ["M4oESwinUNETR", "M4oESwinClassifier", "convert_swin_mlps_to_m4oe", "swin_m4oe_layers"]


def convert_swin_mlps_to_m4oe(
    module: nn.Module,
    modalities: Sequence[str],
    stage: str = "gated",
    gate: str = "experts",
    default_modality: str | None = None,
    dropout_rate: float = 0.0,
    experts_from_mlp: bool = False,
) -> list[ModalityExpertLayer]:
    """Replace the MLP of every ``SwinTransformerBlock`` inside ``module`` by a :class:`ModalityExpertLayer` of the
    same widths, in place. The experts are initialised independently, or (``experts_from_mlp``) as copies of the
    block's MLP. Identical experts under a uniform gate receive identical gradients and stay identical, so training
    the gated stage from scratch needs independent experts; copies are for starting from a trained SwinUNETR.

    Returns:
        the new layers in depth order.
    """
    layers = []
    for block in module.modules():
        if not isinstance(block, SwinTransformerBlock):
            continue
        mlp = block.mlp
        layer = ModalityExpertLayer(
            hidden_size=mlp.linear1.in_features,
            mlp_dim=mlp.linear1.out_features,
            modalities=modalities,
            stage=stage,
            gate=gate,
            default_modality=default_modality,
            dropout_rate=dropout_rate,
        )
        if experts_from_mlp:
            _copy_mlp_into_experts(mlp, layer)
        block.mlp = layer
        layers.append(layer)
    if not layers:
        raise ValueError(f"{type(module).__name__} holds no SwinTransformerBlock to convert.")
    return layers


@torch.no_grad()
def _copy_mlp_into_experts(mlp: nn.Module, layer: ModalityExpertLayer) -> None:
    experts = layer.experts
    experts.linear1_weight.copy_(mlp.linear1.weight.expand_as(experts.linear1_weight))
    experts.linear1_bias.copy_(mlp.linear1.bias.expand_as(experts.linear1_bias))
    experts.linear2_weight.copy_(mlp.linear2.weight.expand_as(experts.linear2_weight))
    experts.linear2_bias.copy_(mlp.linear2.bias.expand_as(experts.linear2_bias))


def swin_m4oe_layers(module: nn.Module) -> list[ModalityExpertLayer]:
    """The M4oE layers of the Swin blocks inside ``module``, in depth order."""
    return [block.mlp for block in module.modules() if isinstance(block, SwinTransformerBlock)]


class M4oESwinUNETR(M4oEHostMixin, SwinUNETR):
    """MONAI's Swin UNETR whose Swin blocks' MLPs are M4oE modality-expert layers.

    Args:
        in_channels: input channels.
        out_channels: output channels (classes).
        modalities: names of the modalities, one expert each, in order.
        m4oe_stage: ``"expert"`` (each image through its modality's expert; the modality is given with
            :meth:`set_modality_ids` or ``default_modality``) or ``"gated"`` (the gating network mixes the experts).
        m4oe_gate: ``"experts"`` (softmax over the experts, the paper) or ``"channel"`` (softmax over channels times
            the sum of the experts, the public code).
        default_modality: modality of every image in the expert stage when no per-image ids are set.
        experts_from_mlp: every expert starts as a copy of its block's MLP (as initialised, or as loaded later by
            the caller); default: independent experts (see :func:`convert_swin_mlps_to_m4oe`).
        kwargs: :class:`~monai.networks.nets.SwinUNETR`'s arguments (``spatial_dims``, ``feature_size`` (a multiple
            of 12), ``depths``, ``num_heads``, ``window_size``, ``drop_rate``, ...).

    Input ``[B, in_channels, *spatial]`` with every spatial size divisible by ``patch_size * 2**4`` (32 by default);
    output ``[B, out_channels, *spatial]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        modalities: Sequence[str],
        m4oe_stage: str = "gated",
        m4oe_gate: str = "experts",
        default_modality: str | None = None,
        experts_from_mlp: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(in_channels, out_channels, **kwargs)
        convert_swin_mlps_to_m4oe(
            self.swinViT, modalities, m4oe_stage, m4oe_gate, default_modality, kwargs.get("drop_rate", 0.0),
            experts_from_mlp,
        )

    def m4oe_layers(self) -> list[ModalityExpertLayer]:
        """The M4oE layers of the Swin encoder in depth order."""
        return swin_m4oe_layers(self.swinViT)

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        """``[B, C, *spatial] -> [B, out_channels, *spatial]``."""
        return super().forward(_plain(x_in))


def _plain(x: torch.Tensor) -> torch.Tensor:
    """The experts regroup images along the batch axis; per-image metadata does not follow (as in the ViT)."""
    return x.as_tensor() if isinstance(x, MetaTensor) else x


class M4oESwinClassifier(M4oEHostMixin, nn.Module):
    """Classification on the M4oE Swin encoder: the deepest stage's features ``[B, 16 * feature_size, *spatial/32]``,
    averaged over space, through dropout and a linear layer.

    Args:
        in_channels: input channels.
        num_classes: output classes.
        modalities, m4oe_stage, m4oe_gate, default_modality: as :class:`M4oESwinUNETR`.
        spatial_dims: 2 or 3.
        feature_size: width of the first Swin stage (a multiple of 12).
        depths, num_heads, window_size, patch_size, drop_rate: the Swin encoder's settings (SwinUNETR's defaults).
        head_dropout: dropout before the linear layer.

    Input ``[B, in_channels, *spatial]``, spatial sizes divisible by ``patch_size * 2**4``; output ``[B, num_classes]``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        modalities: Sequence[str],
        m4oe_stage: str = "gated",
        m4oe_gate: str = "experts",
        default_modality: str | None = None,
        spatial_dims: int = 3,
        feature_size: int = 24,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        patch_size: int = 2,
        drop_rate: float = 0.0,
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.swinViT = SwinTransformer(
            in_chans=in_channels,
            embed_dim=feature_size,
            window_size=(window_size,) * spatial_dims,
            patch_size=(patch_size,) * spatial_dims,
            depths=depths,
            num_heads=num_heads,
            drop_rate=drop_rate,
            spatial_dims=spatial_dims,
        )
        convert_swin_mlps_to_m4oe(self.swinViT, modalities, m4oe_stage, m4oe_gate, default_modality, drop_rate)
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(feature_size * 2 ** len(depths), num_classes))

    def m4oe_layers(self) -> list[ModalityExpertLayer]:
        """The M4oE layers of the Swin encoder in depth order."""
        return swin_m4oe_layers(self.swinViT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, *spatial] -> [B, num_classes]``."""
        deepest = self.swinViT(_plain(x), normalize=True)[-1]
        return self.head(deepest.flatten(2).mean(-1))
