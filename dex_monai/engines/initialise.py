# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Initialisation of a downstream DEX network (UNETR, classifier) from a DEX pre-training checkpoint, a dense
ViT/MAE checkpoint or nothing, with the patch kernel fitted by :func:`dex_monai.networks.kernel.adapt_patch_kernel`."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dex_monai.engines.checkpoint import find_latest_checkpoint
from dex_monai.engines.utils import unwrap_network

__all__ = [
    "INIT_MODES",
    "initialise_m4oe_swin",
    "initialise_network",
    "load_pretraining_checkpoint",
    "resolve_checkpoint",
]


logger = logging.getLogger(__name__)


#: how a downstream network is initialised
INIT_MODES = ("scratch", "dex", "dense")


def resolve_checkpoint(checkpoint: str | os.PathLike | None) -> Path | None:
    """
    The checkpoint file to initialise from: ``None``/empty gives None; a folder (e.g. the pre-training bundle's
    ``models``) gives its ``model.pt``, else its newest ``checkpoint_<iteration>.pt``; a file is returned as is.

    Raises:
        FileNotFoundError: when the path or the folder holds no checkpoint; the message says what was looked for.
    """
    if checkpoint in (None, "", "None", "none"):
        return None
    path = Path(os.path.expanduser(os.fspath(checkpoint)))
    if path.is_dir():
        if (path / "model.pt").is_file():
            return path / "model.pt"
        latest = find_latest_checkpoint(path)
        if latest is not None:
            return Path(latest)
        raise FileNotFoundError(
            f"pretrained checkpoint folder {path} holds neither model.pt nor checkpoint_<iteration>.pt files."
        )
    if not path.is_file():
        raise FileNotFoundError(f"pretrained checkpoint {path} does not exist.")
    return path


def _is_dex_state(state: Mapping[str, torch.Tensor]) -> bool:
    return any(".dex." in k or ".DEX." in k for k in state)


def initialise_network(
    network: torch.nn.Module,
    init: str = "scratch",
    checkpoint: str | os.PathLike | None = None,
    strict: bool = True,
    adapt_input: bool = True,
) -> Any:
    """
    Initialise a :class:`~dex_monai.networks.DEXUNETR` / :class:`~dex_monai.networks.DEXClassifier` before training.

    Args:
        network: the downstream network (possibly wrapped); fine-tuning through the experts or the director is its
            ``mode`` (the bundle key ``finetune_mode``), set when it is built.
        init: ``"scratch"`` (no checkpoint), ``"dex"`` (a DEX pre-training checkpoint: directors, experts and routers
            are loaded, e.g. the pre-training bundle's ``models/model.pt``) or ``"dense"`` (a dense ViT / UNETR / MAE
            checkpoint: each MLP initialises the director and every expert of its layer; routers start fresh).
        checkpoint: file, or folder holding ``model.pt`` / ``checkpoint_<iteration>.pt``.
        strict: stop on missing, unexpected or mismatched encoder tensors (a dense checkpoint without CLS token, as
            MONAI's ``ViT``/``UNETR`` save them, is accepted: the CLS token keeps its initialisation).
        adapt_input: adapt the patch embedding when only its input channels, its dimensionality (2D checkpoint for
            a 3D network: inflated along the slicing axis) or its kernel size differ
            (:func:`dex_monai.networks.kernel.adapt_patch_kernel`, the one adapter of every loading path).

    Returns:
        the :class:`~dex_monai.networks.ConversionReport` of the load, or None from scratch.

    Raises:
        ValueError: unknown ``init``; a dense checkpoint for ``init="dex"`` or the reverse; or (``strict``) a
            checkpoint that does not fit, the message naming the file and the missing / unexpected / mismatched keys.
        FileNotFoundError: no checkpoint where one is needed.
    """
    from dex_monai.networks.convert import (
        encoder_of,
        load_encoder_weights,
        read_state_dict,
    )

    init = str(init).lower()
    if init not in INIT_MODES:
        raise ValueError(f"unknown init {init!r}; expected one of {INIT_MODES}.")
    if init == "scratch":
        if checkpoint not in (None, "", "None", "none"):
            logger.warning(f"init='scratch': pretrained checkpoint {checkpoint} is not used.")
        logger.info("training from scratch (random initialisation).")
        return None
    path = resolve_checkpoint(checkpoint)
    if path is None:
        raise FileNotFoundError(f"init={init!r} needs `pretrained_checkpoint` (a file or a bundle's models folder).")
    state = read_state_dict(path)
    if init == "dex" and not _is_dex_state(state):
        raise ValueError(f"init='dex' but {path} holds a dense ViT/MAE checkpoint (no DEX layers); use init='dense'.")
    if init == "dense" and _is_dex_state(state):
        raise ValueError(f"init='dense' but {path} holds a DEX checkpoint (DEX layers found); use init='dex'.")
    net = unwrap_network(network)
    encoder, _ = encoder_of(net)
    report = load_encoder_weights(net, state, strict=False, adapt_input=adapt_input)
    if init == "dense" and "cls_token" in report.missing:
        # MONAI ViT (without classification) and UNETR checkpoints have no CLS token: it keeps its initialisation
        report.missing.remove("cls_token")
        report.newly_initialised.append("cls_token")
        report.notes.append("the dense checkpoint has no CLS token: the CLS token starts from its initialisation.")
    if strict and not report.ok:
        raise ValueError(f"pretrained checkpoint {path} does not fit {type(net).__name__}:\n{report.summary()}")
    mode = {getattr(layer, "mode", None) for layer in encoder.dex_layers()} if hasattr(encoder, "dex_layers") else set()
    logger.info(
        f"initialised {type(net).__name__} from {init} checkpoint {path} (fine-tuning through "
        f"{'/'.join(sorted(m for m in mode if m)) or 'dense MLPs'}):\n{report.summary()}"
    )
    return report


def load_pretraining_checkpoint(
    network: torch.nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any] | None, strict: bool = True
) -> Any:
    """
    Start a :class:`~dex_monai.networks.DEXMaskedAutoEncoder` from a pre-training checkpoint, to continue
    pre-training (UMD's TD-Calib: ``bundles/dex_pretrain/configs/td_calib.json``).

    Encoder and decoder go through :func:`~dex_monai.networks.load_encoder_weights` (any layout it reads). For UMD's
    feature reconstruction, the EMA teacher and the feature head are loaded when the checkpoint has them (a UMD
    pre-training checkpoint); otherwise the teacher starts as a copy of the loaded encoder, as at the start of UMD
    pre-training, and the feature head keeps its initialisation.

    Args:
        network: the MAE (possibly wrapped).
        checkpoint: file, folder holding ``model.pt`` / ``checkpoint_<iteration>.pt``, or a state dict.
        strict: stop when an encoder or decoder tensor is missing, unexpected or mismatched.

    Returns:
        the :class:`~dex_monai.networks.ConversionReport` of the load.

    Raises:
        FileNotFoundError: no checkpoint given, or none at the path.
        ValueError: (``strict``) a checkpoint that does not fit, naming the file and the keys.
    """
    from dex_monai.networks import DEXMaskedAutoEncoder
    from dex_monai.networks.convert import load_encoder_weights, read_state_dict

    path = checkpoint if isinstance(checkpoint, Mapping) else resolve_checkpoint(checkpoint)
    if path is None:
        raise FileNotFoundError("continued pre-training needs `pretrained_checkpoint` (a file or a models folder).")
    net = unwrap_network(network)
    if not isinstance(net, DEXMaskedAutoEncoder):
        raise TypeError(f"continued pre-training starts a DEXMaskedAutoEncoder, got {type(net).__name__}.")
    state = read_state_dict(path)
    name = "the given state dict" if isinstance(path, Mapping) else str(path)
    report = load_encoder_weights(net, state, strict=False)
    extra = {k: v for k, v in state.items() if k.startswith(("teacher.", "feature_pred."))}
    own = net.state_dict()
    fitting = {k: v for k, v in extra.items() if k in own and own[k].shape == v.shape}
    if net.teacher is not None:
        teacher_keys = {k for k in own if k.startswith("teacher.")}
        if teacher_keys <= set(fitting):
            report.notes.append("EMA teacher and feature head loaded from the checkpoint.")
        else:
            net.teacher.load_state_dict(net.encoder.state_dict())
            fitting = {k: v for k, v in fitting.items() if not k.startswith("teacher.")}
            report.notes.append("the checkpoint has no fitting EMA teacher: the teacher starts as the loaded encoder.")
        net.load_state_dict(fitting, strict=False)
        report.newly_initialised = [k for k in report.newly_initialised if k not in fitting and not k.startswith("teacher.")]
    if strict and not report.ok:
        raise ValueError(f"pretrained checkpoint {name} does not fit {type(net).__name__}:\n{report.summary()}")
    logger.info(f"continuing pre-training from {name}:\n{report.summary()}")
    return report
def initialise_m4oe_swin(
    network: torch.nn.Module, init: str = "scratch", checkpoint: str | os.PathLike | None = None
) -> list[str] | None:
    """Initialise an :class:`~dex_monai.networks.M4oESwinUNETR` before training: from scratch, or (``checkpoint``) from
    an M4oE Swin UNETR checkpoint of the same modalities, e.g. the expert stage's ``models/model.pt`` before the gated
    stage. The ViT encoders' ``init="dex"`` / ``"dense"`` checkpoints do not fit a Swin encoder and are refused.

    Returns:
        the checkpoint's keys that were loaded, or None from scratch.

    Raises:
        ValueError: ``init`` other than ``"scratch"``; a checkpoint that does not fit (strict load).
    """
    from dex_monai.networks.convert import read_state_dict

    if str(init).lower() != "scratch":
        raise ValueError(
            f"init={init!r}: the M4oE Swin UNETR has no ViT encoder to take a DEX/dense checkpoint; start from scratch "
            "or give an M4oE Swin UNETR checkpoint as `m4oe_checkpoint`."
        )
    path = resolve_checkpoint(checkpoint)
    if path is None:
        logger.info("training the M4oE Swin UNETR from scratch (every expert starts as its block's initial MLP).")
        return None
    net = unwrap_network(network)
    state = read_state_dict(path)
    net.load_state_dict(state, strict=True)
    logger.info(f"initialised {type(net).__name__} from M4oE Swin checkpoint {path} ({len(state)} tensors).")
    return list(state)
