"""UniMed (Wang et al., arXiv 2409.19890) on a DEX encoder: learned queries, a decomposed decoder (pixel and semantic
heads) and the composed token format as the output space. No code of the paper is public; the choices made here are
listed in docs/related_systems.md."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import UnetrBasicBlock, UnetrPrUpBlock

from dex_monai.networks.blocks.composed_tokens import ComposedVocabulary
from dex_monai.networks.nets.dex_vit import DEXViT

__all__ = ["UniMed", "UniMedTaskView", "UNIMED_TASKS"]

UNIMED_TASKS = ("segmentation", "classification")


class UniMed(nn.Module):
    """UniMed with a :class:`DEXViT` encoder, for ``spatial_dims`` 2 or 3.

    - Query decoder: ``num_queries = 1 + num_pixel_classes`` learned queries (a fixed queue: query 0 reads the image
      label, query ``1 + c`` pixel class ``c``), each plus the embedding of its task token, refined by a transformer
      decoder (self-attention among queries, cross-attention to the encoder tokens, CLS included).
    - Decomposed heads: the semantic head maps every query to logits over the composed vocabulary
      (:class:`~dex_monai.networks.blocks.ComposedVocabulary`: image classes, pixel classes, ``NO_OBJECT``...); the
      pixel head maps it to a mask embedding whose product with the pixel embeddings gives the query's mask logits
      (as in MaskFormer / Mask2Former). Pixel embeddings: the token grid up-sampled by transposed convolutions to the
      image size, plus a convolution of the image (detail the patch grid lacks).
    - Task outputs (MaskFormer's semantic inference): segmentation probabilities
      ``p[c] = sum_q softmax(semantic_q)[pixel token c] * sigmoid(mask_q)``, normalised over c; image-class
      probabilities from query 0's logits over the image-class tokens.

    Args:
        in_channels: image channels.
        num_image_classes: image-level classes.
        num_pixel_classes: segmentation classes, background included.
        img_size, patch_size, spatial_dims: as :class:`DEXViT`; the patch side must be a power of two, at least 2.
        pixel_embedding_size: channels E of the pixel and mask embeddings.
        decoder_layers: transformer decoder layers of the queries.
        decoder_mlp_dim: MLP width of the decoder layers (default 4 x hidden size).
        norm_name: normalisation of the pixel decoder.
        encoder_kwargs: anything else for :class:`DEXViT`; ``mode`` defaults to ``"experts"``.

    Input ``[B, C, *img_size]``; output a dict: ``class_logits [B, Q, V]``, ``mask_logits [B, Q - 1, *img_size]``
    (the pixel queries), ``segmentation [B, num_pixel_classes, *img_size]`` and ``classification
    [B, num_image_classes]`` (probabilities).
    """

    def __init__(
        self,
        in_channels: int,
        num_image_classes: int,
        num_pixel_classes: int,
        img_size: Sequence[int] | int,
        patch_size: Sequence[int] | int = 16,
        spatial_dims: int = 2,
        pixel_embedding_size: int = 32,
        decoder_layers: int = 2,
        decoder_mlp_dim: int | None = None,
        norm_name: str | tuple = "instance",
        **encoder_kwargs,
    ) -> None:
        super().__init__()
        encoder_kwargs.setdefault("mode", "experts")
        self.encoder = DEXViT(
            in_channels=in_channels, img_size=img_size, patch_size=patch_size, spatial_dims=spatial_dims, **encoder_kwargs
        )
        sides = set(self.encoder.patch_size)
        side = sides.pop()
        if sides or side < 2 or side & (side - 1):
            raise ValueError(f"UniMed needs the same power-of-two patch side on every axis, got {self.encoder.patch_size}.")
        self.vocabulary = ComposedVocabulary(num_image_classes, num_pixel_classes)
        self.spatial_dims = spatial_dims
        hidden = self.encoder.hidden_size
        heads = self.encoder.blocks[0].attn.num_heads
        self.register_buffer("query_roles", self.vocabulary.query_roles(), persistent=False)
        self.query_embedding = nn.Parameter(torch.zeros(self.vocabulary.num_queries, hidden))
        nn.init.trunc_normal_(self.query_embedding, std=0.02)
        self.token_embedding = nn.Embedding(self.vocabulary.size, hidden)
        layer = nn.TransformerDecoderLayer(
            hidden, heads, decoder_mlp_dim or 4 * hidden, dropout=0.0, batch_first=True, norm_first=True
        )
        self.query_decoder = nn.TransformerDecoder(layer, decoder_layers, norm=nn.LayerNorm(hidden))
        self.semantic_head = nn.Linear(hidden, self.vocabulary.size)
        self.mask_head = nn.Sequential(
            nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, pixel_embedding_size)
        )
        self.pixel_upsampler = UnetrPrUpBlock(
            spatial_dims=spatial_dims,
            in_channels=hidden,
            out_channels=pixel_embedding_size,
            num_layer=int(math.log2(side)) - 1,
            kernel_size=3,
            stride=1,
            upsample_kernel_size=2,
            norm_name=norm_name,
            conv_block=False,
        )
        self.pixel_detail = UnetrBasicBlock(
            spatial_dims, in_channels, pixel_embedding_size, kernel_size=3, stride=1, norm_name=norm_name, res_block=True
        )

    def token_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + n, D]`` (CLS first) ``-> [B, D, *grid]``."""
        patches = tokens[:, 1:]
        grid = patches.reshape(patches.shape[0], *self.encoder.grid_size, patches.shape[-1])
        return grid.movedim(-1, 1).contiguous()

    def pixel_embeddings(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, E, *img_size]``."""
        return self.pixel_upsampler(self.token_grid(tokens)) + self.pixel_detail(image)

    def decode_queries(self, tokens: torch.Tensor) -> torch.Tensor:
        """Queries refined against the encoder tokens, ``[B, Q, D]``."""
        queries = self.query_embedding + self.token_embedding(self.query_roles)
        return self.query_decoder(queries.expand(tokens.shape[0], -1, -1), tokens)

    def task_outputs(self, class_logits: torch.Tensor, mask_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Segmentation ``[B, Cp, *S]`` and image-class ``[B, Ci]`` probabilities from the heads' outputs."""
        vocabulary = self.vocabulary
        pixel_probs = class_logits[:, 1:].softmax(-1)[..., vocabulary.pixel_token_ids]  # [B, Q - 1, Cp]
        segmentation = torch.einsum("bqc,bq...->bc...", pixel_probs, mask_logits.sigmoid())
        segmentation = segmentation / segmentation.sum(1, keepdim=True).clamp_min(1e-6)
        classification = class_logits[:, 0, vocabulary.image_token_ids].softmax(-1)
        return {"segmentation": segmentation, "classification": classification}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens, _ = self.encoder(x)
        queries = self.decode_queries(tokens)
        class_logits = self.semantic_head(queries)
        mask_embedding = self.mask_head(queries[:, 1:])
        mask_logits = torch.einsum("bqe,be...->bq...", mask_embedding, self.pixel_embeddings(x, tokens))
        return {"class_logits": class_logits, "mask_logits": mask_logits, **self.task_outputs(class_logits, mask_logits)}


class UniMedTaskView(nn.Module):
    """One task's output of a :class:`UniMed` as a plain tensor, for code that expects a single-task network:
    ``"segmentation"`` gives log-probabilities ``[B, Cp, *S]``, ``"classification"`` log-probabilities ``[B, Ci]``
    (their softmax is the UniMed probability)."""

    def __init__(self, model: UniMed, task: str) -> None:
        super().__init__()
        if task not in UNIMED_TASKS:
            raise ValueError(f"task must be one of {UNIMED_TASKS}, got {task!r}.")
        self.model, self.task = model, task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[self.task].clamp_min(1e-8).log()
