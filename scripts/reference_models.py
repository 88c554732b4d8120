"""The public DEX code's MAE (GitHub YutingHe-list/DEX), built from a checkout the user points to, for timing.

Nothing of the reference is copied into this repository: :func:`load_reference` imports
``DEX_pretraining/model/models_mae_DEX.py`` from the given folder (which needs ``timm``, as the public code does).
Two models are built with the dimensions of a benchmark configuration: the reference DEX MAE, and its dense twin
(the same MAE whose encoder blocks are timm ``Block`` s, i.e. the plain MAE the DEX code starts from).
"""

from __future__ import annotations

import importlib
import sys
from functools import partial
from pathlib import Path
from types import ModuleType

import torch
import torch.nn as nn

__all__ = ["load_reference", "build_reference", "reference_losses"]


def load_reference(folder: str | Path) -> ModuleType:
    """Import ``models_mae_DEX`` from a checkout of the public DEX code (the repository or its DEX_pretraining)."""
    root = Path(folder).expanduser().resolve()
    if (root / "DEX_pretraining").is_dir():
        root = root / "DEX_pretraining"
    if not (root / "model" / "models_mae_DEX.py").is_file():
        raise FileNotFoundError(f"{root} holds no model/models_mae_DEX.py: pass a checkout of YutingHe-list/DEX.")
    for name in [m for m in sys.modules if m == "model" or m.startswith("model.")]:
        del sys.modules[name]  # a package "model" imported earlier (another checkout) would shadow this one
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("model.models_mae_DEX")
    finally:
        sys.path.remove(str(root))


class _DenseBlock(nn.Module):
    """A timm ``Block`` answering the reference DEX block's call: ``(x, m, noise_std, alpha) -> (x, 0, 0)``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, m: float = 0.999, noise_std: float = 0.0, alpha: float = 1.0):
        zero = x.new_zeros(())
        return self.block(x), zero, zero


def build_reference(module: ModuleType, config: dict, dense: bool, norm_pix_loss: bool = True) -> nn.Module:
    """The reference MAE with a benchmark configuration's dimensions (LayerNorm eps 1e-6 as the public configs).

    Args:
        module: the imported ``models_mae_DEX``.
        config: ``img_size, patch_size, hidden_size, mlp_dim, num_layers, num_heads, num_experts, top_k,
            decoder_hidden_size, decoder_mlp_dim, decoder_num_layers, decoder_num_heads`` (one ``mlp_ratio`` serves
            encoder and decoder in the reference, so both MLP ratios must agree).
        dense: replace the encoder's DEX blocks by timm ``Block`` s.
    """
    ratio = config["mlp_dim"] / config["hidden_size"]
    if config["decoder_mlp_dim"] != ratio * config["decoder_hidden_size"]:
        raise ValueError("the reference MAE has one mlp_ratio: decoder_mlp_dim / decoder_hidden_size must match.")
    norm = partial(nn.LayerNorm, eps=1e-6)
    model = module.MaskedAutoencoderViT(
        img_size=config["img_size"], patch_size=config["patch_size"], in_chans=3,
        min_experts=config["num_experts"], max_experts=config["num_experts"],
        min_topk=config["top_k"], max_topk=config["top_k"],
        embed_dim=config["hidden_size"], depth=config["num_layers"], num_heads=config["num_heads"],
        decoder_embed_dim=config["decoder_hidden_size"], decoder_depth=config["decoder_num_layers"],
        decoder_num_heads=config["decoder_num_heads"], mlp_ratio=ratio, norm_layer=norm, norm_pix_loss=norm_pix_loss,
    )
    if dense:
        blocks = [
            module.Block(config["hidden_size"], config["num_heads"], ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(config["num_layers"])
        ]
        model.blocks = nn.ModuleList(_DenseBlock(block) for block in blocks)
        model.blocks.apply(model._init_weights)
    return model


def reference_losses(model: nn.Module, images: torch.Tensor, masking_ratio: float, momentum: float, noise_std: float):
    """The reference forward (GEMA included): ``(mae, alignment, balance)`` scalar losses."""
    mae, alignment, balance, _, _ = model(images, mask_ratio=masking_ratio, m=momentum, noise_std=noise_std)
    return mae, alignment, balance
