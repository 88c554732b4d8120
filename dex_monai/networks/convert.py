"""Weight conversion between dense ViT/MAE checkpoints, DEX checkpoints and the networks of this package.

Understood source layouts (with or without a ``module.`` DDP prefix, wrapped in ``{"model"|"state_dict"|
"network"|"net": ...}`` or bare):

- MONAI ``ViT`` / ``UNETR`` (``vit.`` prefix) / ``MaskedAutoEncoderViT`` (final norm stored as ``blocks.{L}``);
- the MAE reference layout (timm names: ``patch_embed.proj``, ``pos_embed``, ``blocks.i.attn.proj``,
  ``blocks.i.mlp.fc1``, ``decoder_*``) used by the DEX public code;
- the DEX public code's pre-training checkpoints (``blocks.i.DEX.director``, ``blocks.i.DEX.experts.e``,
  ``blocks.i.DEX.router.linear``);
- this package's networks (``encoder.`` in the MAE and classifier, ``vit.`` in the UNETR).

Nothing is dropped silently: every conversion returns a :class:`ConversionReport` listing what was loaded, what the
target lacks in the checkpoint (missing), what the checkpoint has that the target does not use (unexpected),
shape mismatches and notes; the loading functions raise a ``ValueError`` naming the keys when ``strict``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn

from dex_monai.networks.blocks.dex_transformer import set_layer_norm_eps
from dex_monai.networks.kernel import adapt_patch_kernel
from dex_monai.networks.nets.dex_downstream import DEXClassifier, DEXUNETR
from dex_monai.networks.nets.dex_mae import DEXMaskedAutoEncoder
from dex_monai.networks.nets.dex_vit import DEXViT

__all__ = [
    "ConversionReport",
    "read_state_dict",
    "canonical_state_dict",
    "load_encoder_weights",
    "encoder_of",
    "dex_to_dense_state_dict",
    "export_to_monai",
    "REFERENCE_LAYER_NORM_EPS",
    "is_reference_layout",
]

#: LayerNorm eps of the reference models: the DEX public code's ``mae_DEX_vit_*`` and the MAE code's ``mae_vit_*``
REFERENCE_LAYER_NORM_EPS = 1e-6

StateDict = dict[str, torch.Tensor]
_WRAPPER_KEYS = ("model", "state_dict", "network", "net", "module")
_EXPERT_PARAMS = ("linear1_weight", "linear1_bias", "linear2_weight", "linear2_bias")


@dataclass
class ConversionReport:
    """What a conversion or load did. ``ok`` is true when nothing was missing, unexpected or mismatched."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    newly_initialised: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 12) -> str:
        def show(keys: list[str]) -> str:
            head = ", ".join(keys[:limit])
            return head + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")

        lines = [f"loaded {len(self.loaded)} tensors"]
        for name in ("missing", "unexpected", "mismatched", "newly_initialised"):
            keys = getattr(self, name)
            if keys:
                lines.append(f"{name} ({len(keys)}): {show(keys)}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def read_state_dict(checkpoint: str | os.PathLike | Mapping[str, Any]) -> StateDict:
    """A flat ``{name: tensor}`` from a checkpoint path or object, unwrapping common containers and ``module.``.

    Files are read with ``torch.load(..., weights_only=True)``: no arbitrary objects are unpickled.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {path} does not exist.")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"a checkpoint must be a mapping of tensors, got {type(checkpoint).__name__}.")
    for key in _WRAPPER_KEYS:
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping) and any(torch.is_tensor(v) for v in inner.values()):
            checkpoint = inner
            break
    state = {k: v for k, v in checkpoint.items() if torch.is_tensor(v)}
    if not state:
        raise ValueError("the checkpoint holds no tensors (expected a state dict or {'model': state_dict}).")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


_BLOCK_RENAMES = (
    (r"\.attn\.proj\.", ".attn.out_proj."),
    (r"\.mlp\.fc1\.", ".mlp.linear1."),
    (r"\.mlp\.fc2\.", ".mlp.linear2."),
    (r"\.DEX\.director\.fc1\.", ".dex.director.linear1."),
    (r"\.DEX\.director\.fc2\.", ".dex.director.linear2."),
    (r"\.DEX\.router\.linear\.", ".dex.router.gate."),
    (r"\.DEX\.expert_activation_count$", ".dex.router.expert_load"),
)


def _encoder_prefix(state: StateDict) -> str:
    for prefix in ("encoder.", "vit.", ""):
        if any(k.startswith(prefix + "blocks.") for k in state):
            return prefix
    raise ValueError("the checkpoint has no transformer blocks ('blocks.N...' under '', 'encoder.' or 'vit.').")


def is_reference_layout(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict is in the MAE / DEX public code's layout (timm names, ``DEX.`` experts)."""
    return any(re.search(r"(^|\.)(patch_embed\.proj\.|pos_embed$|blocks\.\d+\.DEX\.)", k) for k in state)


def canonical_state_dict(state: StateDict) -> tuple[StateDict, StateDict, StateDict, list[str]]:
    """Rename a checkpoint into this package's names.

    Returns:
        ``(encoder, decoder, other, notes)``: encoder tensors named as in :class:`DEXViT` (dense MLPs as
        ``blocks.i.mlp.*``, DEX layers as ``blocks.i.dex.*``), MAE-decoder tensors named as in
        :class:`DEXMaskedAutoEncoder`, everything else with its original name, and notes on what was renamed.
    """
    prefix = _encoder_prefix(state)
    notes: list[str] = []
    encoder: StateDict = {}
    decoder: StateDict = {}
    other: StateDict = {}
    expert_parts: dict[tuple[int, int, str], torch.Tensor] = {}
    block_ids = sorted({int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k))})
    # MONAI MaskedAutoEncoderViT keeps the encoder's final LayerNorm as the last entry of ``blocks``
    final_norm_id = None
    last = f"{prefix}blocks.{block_ids[-1]}." if block_ids else ""
    if block_ids and {k[len(last):] for k in state if k.startswith(last)} <= {"weight", "bias"}:
        final_norm_id = block_ids[-1]
        notes.append(f"'blocks.{final_norm_id}' is a final LayerNorm (MONAI MAE layout): read as 'norm'.")

    for key, value in state.items():
        if not key.startswith(prefix) and prefix:
            if key.startswith("decoder") or key in ("mask_token", "mask_tokens"):
                decoder[key] = value
            else:
                other[key] = value
            continue
        name = key[len(prefix):]
        if final_norm_id is not None and name.startswith(f"blocks.{final_norm_id}."):
            encoder["norm." + name.split(".", 2)[2]] = value
            continue
        if name.startswith("patch_embed.proj."):
            encoder["patch_embedding.patch_embeddings." + name.split(".", 2)[2]] = value
            continue
        if name == "pos_embed":
            encoder["patch_embedding.position_embeddings"] = value[:, 1:] if value.dim() == 3 else value
            notes.append("reference 'pos_embed' [1, 1 + n, D]: CLS row dropped, patch rows used.")
            continue
        expert = re.match(r"blocks\.(\d+)\.DEX\.experts\.(\d+)\.(fc1|fc2)\.(weight|bias)$", name)
        if expert:
            layer, index, fc, kind = int(expert.group(1)), int(expert.group(2)), expert.group(3), expert.group(4)
            expert_parts[(layer, index, f"linear{fc[-1]}_{kind}")] = value
            continue
        if ".norm_cross_attn." in name:
            continue  # MONAI TransformerBlock's LayerNorm of its (disabled) cross-attention: never used
        if name.startswith("blocks.") or name in ("cls_token",) or name.startswith(("norm.", "patch_embedding.")):
            for pattern, repl in _BLOCK_RENAMES:
                name = re.sub(pattern, repl, name)
            encoder[name] = value
            continue
        if name.startswith("decoder") or name in ("mask_token", "mask_tokens"):
            decoder[name] = value
        else:
            other[name] = value

    for layer in sorted({k[0] for k in expert_parts}):
        count = 1 + max(k[1] for k in expert_parts if k[0] == layer)
        for param in _EXPERT_PARAMS:
            parts = [expert_parts.get((layer, e, param)) for e in range(count)]
            if any(p is None for p in parts):
                raise ValueError(f"reference DEX checkpoint: layer {layer} lacks {param} for some experts.")
            encoder[f"blocks.{layer}.dex.experts.{param}"] = torch.stack(parts)
    if expert_parts:
        notes.append("reference DEX experts (one module each) stacked into the expert pools.")

    decoder = _canonical_decoder(decoder, notes)
    return encoder, decoder, other, notes


def _canonical_decoder(decoder: StateDict, notes: list[str]) -> StateDict:
    out: StateDict = {}
    ids = sorted({int(m.group(1)) for k in decoder if (m := re.match(r"decoder_blocks\.(\d+)\.", k))})
    final_norm_id = None
    last = f"decoder_blocks.{ids[-1]}." if ids else ""
    if ids and {k[len(last):] for k in decoder if k.startswith(last)} <= {"weight", "bias"}:
        final_norm_id = ids[-1]
    for key, value in decoder.items():
        if key == "mask_tokens":
            out["mask_token"] = value
        elif key == "decoder_pos_embed":
            out["decoder_pos_embedding"] = value[:, 1:] if value.dim() == 3 else value
        elif final_norm_id is not None and key.startswith(f"decoder_blocks.{final_norm_id}."):
            out["decoder_norm." + key.split(".", 2)[2]] = value
        else:
            for pattern, repl in _BLOCK_RENAMES:
                key = re.sub(pattern, repl, key)
            out[key] = value
    return out


def _adapt_encoder(encoder: StateDict, target: DEXViT, report: ConversionReport) -> StateDict:
    """Turn canonical encoder tensors into the target's layout (dense <-> DEX), filling ``report``."""
    out: StateDict = {}
    if target.mlp_type == "m4oe":
        return _adapt_to_m4oe(encoder, target, report)
    for key, value in encoder.items():
        dense_mlp = re.match(r"blocks\.(\d+)\.mlp\.(linear[12])\.(weight|bias)$", key)
        director = re.match(r"blocks\.(\d+)\.dex\.director\.(linear[12])\.(weight|bias)$", key)
        if dense_mlp and not target.dense:
            layer, linear, kind = dense_mlp.groups()
            out[f"blocks.{layer}.dex.director.{linear}.{kind}"] = value
            if int(layer) < len(target.experts_per_layer):
                count = target.experts_per_layer[int(layer)]
                out[f"blocks.{layer}.dex.experts.{linear}_{kind}"] = value.unsqueeze(0).repeat(
                    count, *([1] * value.dim())
                )
        elif director and target.dense:
            layer, linear, kind = director.groups()
            out[f"blocks.{layer}.mlp.{linear}.{kind}"] = value
        elif target.dense and ".dex." in key:
            report.unexpected.append(key)
        else:
            out[key] = value
    if any(re.match(r"blocks\.\d+\.mlp\.", k) for k in encoder) and not target.dense:
        report.notes.append("dense MLP weights copied to every layer's director and to each of its experts.")
    if any(".dex.director." in k for k in encoder) and target.dense:
        report.notes.append("DEX directors exported as the dense MLPs; experts and routers left out.")
    return out


def _adapt_to_m4oe(encoder: StateDict, target: DEXViT, report: ConversionReport) -> StateDict:
    """Dense MLPs or DEX directors initialise every modality expert of an M4oE encoder (its gates start fresh)."""
    out: StateDict = {}
    left_out: list[str] = []
    has_m4oe = any(".m4oe." in k for k in encoder)
    for key, value in encoder.items():
        source = re.match(r"blocks\.(\d+)\.(?:mlp|dex\.director)\.(linear[12])\.(weight|bias)$", key)
        if source and not has_m4oe:
            layer, linear, kind = source.groups()
            count = target.blocks[int(layer)].m4oe.num_experts if int(layer) < len(target.blocks) else 1
            out[f"blocks.{layer}.m4oe.experts.{linear}_{kind}"] = value.unsqueeze(0).repeat(count, *([1] * value.dim()))
        elif ".dex." in key:
            left_out.append(key)
        else:
            out[key] = value
    if left_out:
        report.notes.append(f"DEX experts/routers not used by M4oE, left out ({len(left_out)} tensors).")
    if not has_m4oe:
        report.notes.append("dense MLP / DEX director weights copied into every modality expert; gates start fresh.")
    return out


def encoder_of(model: nn.Module) -> tuple[DEXViT, str]:
    """The DEX encoder of a DEX network and its state-dict prefix (``vit.``, ``encoder.`` or nothing)."""
    if isinstance(model, DEXViT):
        return model, ""
    if isinstance(model, DEXUNETR):
        return model.vit, "vit."
    if isinstance(model, (DEXClassifier, DEXMaskedAutoEncoder)):
        return model.encoder, "encoder."
    if isinstance(getattr(model, "encoder", None), DEXViT):  # e.g. UniMed
        return model.encoder, "encoder."
    raise TypeError(f"cannot load DEX encoder weights into {type(model).__name__}.")


def _fill(
    target_state: Mapping[str, torch.Tensor],
    source: StateDict,
    prefix: str,
    report: ConversionReport,
    model_name: str,
    adapt_input: bool = True,
) -> StateDict:
    """Match source tensors (named relative to ``prefix``) against the target's state, recording every outcome."""
    merged: StateDict = {}
    for name, value in source.items():
        key = prefix + name
        if key not in target_state:
            report.unexpected.append(name)
            continue
        expected = target_state[key]
        if key.endswith("position_embeddings") and expected.shape != value.shape:
            report.notes.append(
                f"{name}: checkpoint grid {tuple(value.shape)} differs from {model_name}'s {tuple(expected.shape)}; "
                "the target keeps its own position embedding."
            )
            continue
        if key.endswith("patch_embedding.patch_embeddings.weight") and expected.shape != value.shape and adapt_input:
            try:
                adapted, steps = adapt_patch_kernel(value, tuple(expected.shape))
            except ValueError as e:
                report.notes.append(f"{name}: not adapted: {e}")
            else:
                report.notes.append(f"{name}: {tuple(value.shape)} -> {tuple(expected.shape)}: " + "; ".join(steps))
                value = adapted
        if expected.shape != value.shape:
            report.mismatched.append(f"{name}: checkpoint {tuple(value.shape)} vs {model_name} {tuple(expected.shape)}")
            continue
        merged[key] = value.to(expected.dtype)
        report.loaded.append(name)
    return merged


def load_encoder_weights(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, Any],
    strict: bool = True,
    include_decoder: bool = True,
    adapt_input: bool = True,
    reference_layer_norm_eps: float | None = None,
) -> ConversionReport:
    """Load a dense or DEX checkpoint into a DEX network's encoder (and an MAE's decoder when present).

    Works for :class:`DEXViT`, :class:`DEXUNETR`, :class:`DEXClassifier` and :class:`DEXMaskedAutoEncoder` targets,
    from any layout :func:`canonical_state_dict` understands. A dense checkpoint initialises every director and
    expert with the dense MLP; a DEX checkpoint loads directors, experts and routers as they are, so the downstream
    model can be fine-tuned through either (its ``mode``). Parts of the target that no checkpoint could hold
    (UNETR decoder, classifier head; an MAE decoder when the checkpoint has none) are listed as ``newly_initialised``.
    With ``adapt_input`` a patch kernel of other channels, dimensionality (2D checkpoint, 3D network: inflated along
    the slicing axis) or size is fitted by :func:`~dex_monai.networks.kernel.adapt_patch_kernel`.
    A checkpoint in the reference layout (:func:`is_reference_layout`) was trained with LayerNorm eps 1e-6: with
    ``reference_layer_norm_eps`` every LayerNorm of ``model`` is set to it; by default the norms are left as built
    (so that training and a later inference network built from the same config agree) and the report notes when
    they differ from 1e-6 (build the network with ``layer_norm_eps=1e-6``, as the bundles' paper configs do).

    Raises:
        ValueError: when ``strict`` and an encoder tensor is missing, unexpected or of the wrong shape; the message
            names the keys and the checkpoint.
    """
    source_name = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "the given state dict"
    state = read_state_dict(checkpoint)
    encoder_sd, decoder_sd, other_sd, notes = canonical_state_dict(state)
    report = ConversionReport(notes=list(notes))
    encoder, prefix = encoder_of(model)
    adapted = _adapt_encoder(encoder_sd, encoder, report)
    if "blocks.0.attn.qkv.bias" not in adapted and "blocks.0.attn.qkv.bias" in encoder.state_dict():
        for i in range(encoder.num_layers):
            adapted.setdefault(f"blocks.{i}.attn.qkv.bias", torch.zeros_like(encoder.blocks[i].attn.qkv.bias))
        report.notes.append("checkpoint has no qkv bias: the target's qkv biases are set to zero.")
    target_state = model.state_dict()
    merged = _fill(target_state, adapted, prefix, report, type(model).__name__, adapt_input)

    if isinstance(model, DEXMaskedAutoEncoder) and include_decoder and decoder_sd:
        merged.update(_fill(target_state, decoder_sd, "", report, type(model).__name__))
    elif decoder_sd:
        report.notes.append(f"{len(decoder_sd)} MAE-decoder tensors not used by {type(model).__name__}.")
    if other_sd:
        report.notes.append(f"not encoder weights, left out: {sorted(other_sd)[:8]}")

    encoder_keys = {prefix + k for k in encoder.state_dict()}
    source_is_dense = not any(".dex." in k or ".m4oe." in k for k in encoder_sd)
    for key in target_state:
        if key in merged:
            continue
        name = key[len(prefix):]
        fresh_gate = ".m4oe.gate." in name and not any(".m4oe." in k for k in encoder_sd)
        if key not in encoder_keys or (source_is_dense and ".dex.router." in name) or fresh_gate:
            report.newly_initialised.append(key)
        elif name.endswith("position_embeddings") and any("position_embeddings" in n for n in report.notes):
            continue
        else:
            report.missing.append(name)
    if source_is_dense and not encoder.dense:
        report.notes.append("dense checkpoint: routers start from their fresh initialisation.")
    if strict and not report.ok:
        raise ValueError(f"checkpoint {source_name} does not fit {type(model).__name__}:\n{report.summary()}")
    model.load_state_dict(merged, strict=False)
    if is_reference_layout(state):
        if reference_layer_norm_eps is not None:
            if set_layer_norm_eps(model, reference_layer_norm_eps):
                report.notes.append(
                    f"reference-layout checkpoint: LayerNorm eps set to {reference_layer_norm_eps:g}; build networks "
                    "that reload this model's checkpoints with the same layer_norm_eps."
                )
        else:
            built = sorted({m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)})
            if built != [REFERENCE_LAYER_NORM_EPS]:
                report.notes.append(
                    f"reference-layout checkpoint: the reference models use LayerNorm eps {REFERENCE_LAYER_NORM_EPS:g}, "
                    f"this network {', '.join(f'{e:g}' for e in built)}; build it with layer_norm_eps="
                    f"{REFERENCE_LAYER_NORM_EPS:g} (bundles: --layer_norm_eps {REFERENCE_LAYER_NORM_EPS:g} or "
                    "configs/vit_base_paper.json) to reproduce them exactly."
                )
    return report


def dex_to_dense_state_dict(checkpoint: str | os.PathLike | Mapping[str, Any]) -> tuple[StateDict, ConversionReport]:
    """Encoder weights in MONAI ``ViT`` names, the DEX directors standing in for the MLPs."""
    encoder_sd, _, _, notes = canonical_state_dict(read_state_dict(checkpoint))
    report = ConversionReport(notes=list(notes))
    dense: StateDict = {}
    left_out: list[str] = []
    for key, value in encoder_sd.items():
        director = re.match(r"blocks\.(\d+)\.dex\.director\.(.+)$", key)
        if director:
            dense[f"blocks.{director.group(1)}.mlp.{director.group(2)}"] = value
        elif ".dex." in key:
            left_out.append(key)
        else:
            dense[key] = value
    if left_out:
        layers = len({k.split(".")[1] for k in left_out})
        report.notes.append(f"experts and routers of {layers} layers left out ({len(left_out)} tensors): a dense ViT has none.")
    return dense, report


def export_to_monai(
    checkpoint: str | os.PathLike | Mapping[str, Any] | nn.Module, target: nn.Module, strict: bool = True
) -> ConversionReport:
    """Load a DEX network or checkpoint into a plain MONAI ``ViT`` or ``UNETR`` through its directors.

    For ``UNETR`` the encoder goes under ``vit.`` and, when the source is a :class:`DEXUNETR` with patch 16, its
    decoder too (same names); MONAI's UNETR has no CLS token, so ``cls_token`` is reported as left out.
    """
    from monai.networks.nets import UNETR, ViT

    if isinstance(checkpoint, nn.Module):
        source_state = checkpoint.state_dict()
    else:
        source_state = read_state_dict(checkpoint)
    if isinstance(target, UNETR):
        prefix = "vit."
    elif isinstance(target, ViT):
        prefix = ""
    else:
        raise TypeError(f"export_to_monai targets MONAI ViT or UNETR, got {type(target).__name__}.")
    dense, report = dex_to_dense_state_dict(source_state)
    renamed = {prefix + name: value for name, value in dense.items()}
    if prefix == "vit." and _encoder_prefix(source_state) == "vit.":
        # a DEXUNETR source: its convolutional decoder has MONAI UNETR's names
        renamed.update({k: v for k, v in source_state.items() if not k.startswith("vit.")})
    target_state = target.state_dict()
    merged: StateDict = {}
    for key, value in renamed.items():
        if key not in target_state:
            report.unexpected.append(key)
            continue
        if target_state[key].shape != value.shape:
            report.mismatched.append(f"{key}: {tuple(value.shape)} vs {tuple(target_state[key].shape)}")
            continue
        merged[key] = value
        report.loaded.append(key)
    report.missing = [k for k in target_state if k not in merged and ".norm_cross_attn." not in k]
    if strict and report.mismatched:
        raise ValueError(f"DEX weights do not fit {type(target).__name__}:\n{report.summary()}")
    target.load_state_dict(merged, strict=False)
    return report
