# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""
Helpers of the DEX fine-tuning bundles (``bundles/dex_seg3d``, ``bundles/dex_seg2d``, ``bundles/dex_classification``).

- initialisation of a downstream network from a DEX pre-training checkpoint, a dense ViT/MAE checkpoint or nothing
  (:func:`initialise_network`), with the input layer adapted when only its channels / dimensionality differ;
- the datalists and output planning live in :mod:`dex_monai.data.datalist` (re-exported here for older configs);
- dictionary transforms used by the bundle configs (:class:`NormalizeModalityd`, :class:`EnsureChannelsd`,
  :class:`SqueezeSpatiald`, :class:`PrepareLabeld`, :class:`RestoreSpatialShaped`) and a writer of predictions to
  their planned paths (:class:`SavePredictiond`);
- engine plumbing that keeps ``MetaTensor`` metadata away from the network (:func:`prepare_tensor_batch` for
  trainers, :class:`TensorInferer` for evaluators);
- ignite handlers: prediction overlays as PNG for MLflow (:class:`PredictionOverlayHandler`), a per-class report for
  classification (:class:`ClassificationReportHandler`) and a CSV writer of class probabilities
  (:class:`ClassProbabilityWriter`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform
from monai.utils import IgniteInfo, convert_to_dst_type, min_version, optional_import

from dex_monai.data.datalist import (
    OUTPUT_PATH_KEY,
    classification_datalist,
    inference_datalist,
    plan_outputs,
    prediction_ext,
    segmentation_datalist,
    split_items,
)
from dex_monai.data.readers import PATIENT_AFFINE, image_stem
from dex_monai.engines.checkpoint import find_latest_checkpoint
from dex_monai.engines.handlers import add_tracking_artifact, add_tracking_metrics
from dex_monai.engines.utils import is_dist, is_rank0, unwrap_network

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = [
    "INIT_MODES",
    "ClassProbabilityWriter",
    "ClassificationReportHandler",
    "EnsureChannelsd",
    "NormalizeModalityd",
    "PredictionOverlayHandler",
    "PrepareLabeld",
    "RestoreSpatialShaped",
    "SavePredictiond",
    "SqueezeSpatiald",
    "TensorInferer",
    "classification_datalist",
    "draw_overlays",
    "inference_datalist",
    "initialise_network",
    "plan_outputs",
    "prediction_ext",
    "prepare_tensor_batch",
    "resolve_checkpoint",
    "restore_spatial_shape",
    "segmentation_datalist",
    "split_items",
    "stack_pred_label",
]

logger = logging.getLogger(__name__)

#: how a downstream network is initialised
INIT_MODES = ("scratch", "dex", "dense")


# ----------------------------------------------------------------------------------------------
# initialisation
# ----------------------------------------------------------------------------------------------
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
    from dex_monai.networks.convert import encoder_of, load_encoder_weights, read_state_dict

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

# ----------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------
_PLAIN_METHODS = ("range", "minmax", "none")

class NormalizeModalityd(MapTransform):
    """
    Per-modality intensity normalisation to ``[0, 1]`` with the pre-training rules
    (:class:`dex_monai.transforms.ModalityNormalize`: CT window [-200, 400] HU, MR / PET percentiles 1-99, 8/16-bit
    display images divided by their range), for a modality fixed by the bundle (``modality`` key) or read from the
    item (``modality_key``), optionally followed by ``(x - mean) / std`` per channel (the pre-training ImageNet
    statistics for 2D). For images of none of the DEX modalities (e.g. electron microscopy) ``modality`` may name a
    rule instead: ``"range"`` (divide by the stored 8/16-bit range), ``"minmax"`` or ``"none"``.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        modality: str | None = None,
        modality_key: str = "modality",
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        config: Any = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        from dex_monai.transforms import ModalityNormalize

        self.normalizer = ModalityNormalize(config)
        self.modality = modality
        self.modality_key = modality_key
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32)

    def _normalize(self, img: Any, modality: str) -> Any:
        if modality.lower() not in _PLAIN_METHODS:
            return self.normalizer(img, modality)
        if modality.lower() == "none":
            return img.float() if isinstance(img, torch.Tensor) else np.asarray(img, dtype=np.float32)
        from dex_monai.transforms import normalize_intensity

        arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        meta = img.meta if isinstance(img, MetaTensor) else {}
        out, _ = normalize_intensity(arr, modality.lower(), {}, intensity_range=meta.get("intensity_range"))
        result, *_ = convert_to_dst_type(out, img, dtype=torch.float32 if isinstance(img, torch.Tensor) else np.float32)
        return result

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        modality = d.get(self.modality_key) or self.modality
        if modality is None:
            raise ValueError(f"NormalizeModalityd: set `modality` or give each item a '{self.modality_key}'.")
        for key in self.key_iterator(d):
            img = self._normalize(d[key], str(modality))
            if self.mean is not None and self.std is not None:
                shape = (-1,) + (1,) * (img.dim() - 1)
                mean = self.mean.to(img.device).reshape(shape) if self.mean.numel() > 1 else self.mean
                std = self.std.to(img.device).reshape(shape) if self.std.numel() > 1 else self.std
                img = (img - mean) / std
            d[key] = img
        return d

class EnsureChannelsd(MapTransform):
    """
    Give a channel-first image exactly ``channels`` channels: an alpha channel (4 -> 3) is dropped, grey images are
    repeated to 3 channels, colour images are averaged to 1 channel. Other combinations raise a ``ValueError``.
    """

    def __init__(self, keys: KeysCollection = "image", channels: int = 3, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.channels = int(channels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            c = int(img.shape[0])
            if c == 4:
                img, c = img[:3], 3
            if c == 2:  # grey + alpha
                img, c = img[:1], 1
            if c != self.channels:
                if self.channels == 1:
                    img = img.mean(0, keepdim=True) if isinstance(img, torch.Tensor) else img.mean(0, keepdims=True)
                elif c == 1:
                    img = img.repeat(self.channels, *([1] * (img.dim() - 1))) if isinstance(img, torch.Tensor) else \
                        np.repeat(img, self.channels, axis=0)
                else:
                    raise ValueError(f"cannot turn a {c}-channel image into {self.channels} channels.")
            d[key] = img
        return d

class SqueezeSpatiald(MapTransform):
    """
    Drop singleton spatial axes beyond ``spatial_dims`` (a 2D slice read as ``[C, H, W, 1]`` from NIfTI or DICOM
    becomes ``[C, H, W]``). The affine is left as read so that :class:`RestoreSpatialShaped` can give predictions the
    input's geometry back; more non-singleton axes than ``spatial_dims`` raise a ``ValueError``.
    """

    def __init__(self, keys: KeysCollection, spatial_dims: int = 2, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = int(spatial_dims)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            spatial = list(img.shape[1:])
            while len(spatial) > self.spatial_dims and 1 in spatial:
                axis = len(spatial) - 1 - spatial[::-1].index(1)
                img = img.squeeze(axis + 1) if isinstance(img, torch.Tensor) else np.squeeze(img, axis + 1)
                spatial.pop(axis)
            if len(spatial) != self.spatial_dims:
                name = img.meta.get("filename_or_obj", key) if isinstance(img, MetaTensor) else key
                raise ValueError(f"{name}: spatial shape {tuple(img.shape[1:])} is not {self.spatial_dims}D.")
            d[key] = img
        return d

class PrepareLabeld(MapTransform):
    """
    Make a label map of class indices ``[1, *spatial]``: a colour mask keeps its first channel; with
    ``num_classes == 2`` every non-zero value is foreground (0/255 masks); otherwise values must already be class
    indices below ``num_classes`` (a ``ValueError`` names the file when not).
    """

    def __init__(self, keys: KeysCollection = "label", num_classes: int = 2, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_classes = int(num_classes)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            if label.shape[0] > 1:
                label = label[:1]
            if self.num_classes == 2:
                label = (label > 0).to(torch.float32) if isinstance(label, torch.Tensor) else (label > 0).astype(np.float32)
            else:
                top = float(label.max())
                if top >= self.num_classes or float(label.min()) < 0:
                    name = label.meta.get("filename_or_obj", key) if isinstance(label, MetaTensor) else key
                    raise ValueError(f"label {name} has values outside [0, {self.num_classes - 1}] (max {top:g}).")
                label = torch.round(label) if isinstance(label, torch.Tensor) else np.round(label)
            d[key] = label
        return d

def restore_spatial_shape(pred: Any, ref_meta: Mapping) -> Any:
    """
    ``pred [C, *spatial]`` reshaped to the spatial shape the input had on disk (``ref_meta["spatial_shape"]``) when
    only singleton axes differ, with the input's ``original_affine``: the inverse of :class:`SqueezeSpatiald`. A 2D
    prediction of a single DICOM slice whose reader recorded its place in the patient (``patient_affine``) becomes
    ``[C, X, Y, 1]`` with that affine. Anything else is returned unchanged.
    """
    spatial = [int(s) for s in pred.shape[1:]]
    patient = ref_meta.get(PATIENT_AFFINE)
    if patient is not None and len(spatial) == 2:
        pred = pred.reshape(pred.shape[0], *spatial, 1)
        if isinstance(pred, MetaTensor):
            pred.affine = torch.as_tensor(np.asarray(patient), dtype=torch.float64)
        return pred
    original = ref_meta.get("spatial_shape")
    if original is None:
        return pred
    original = [int(s) for s in np.asarray(original).ravel()]
    if spatial == original or [s for s in spatial if s != 1] != [s for s in original if s != 1]:
        return pred
    pred = pred.reshape(pred.shape[0], *original)
    if isinstance(pred, MetaTensor) and ref_meta.get("original_affine") is not None:
        pred.affine = torch.as_tensor(np.asarray(ref_meta["original_affine"]), dtype=torch.float64)
    return pred


class RestoreSpatialShaped(MapTransform):
    """Dictionary transform applying :func:`restore_spatial_shape` with the metadata of ``ref_key``."""

    def __init__(self, keys: KeysCollection = "pred", ref_key: str = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ref = d.get(self.ref_key)
        meta = ref.meta if isinstance(ref, MetaTensor) else {}
        for key in self.key_iterator(d):
            d[key] = restore_spatial_shape(d[key], meta)
        return d

class SavePredictiond(MapTransform):
    """
    Write label maps, each to the path planned for its input (``item["output_path"]``, see
    :func:`dex_monai.data.datalist.plan_outputs`: always under the output folder, never beside an input), in the
    format its ending names (:func:`~dex_monai.data.datalist.prediction_ext`: with ``"auto"`` a PNG / JPEG input gets
    a PNG prediction of the same size, anything else NIfTI). NIfTI is written with nibabel and the input's shape and
    affine (a slice stored as ``[H, W, 1]`` keeps its singleton axis and 4x4 affine, see
    :func:`restore_spatial_shape`); other endings through MONAI's writer for that ending.

    Items without a planned path (e.g. the evaluation of a training datalist) are written flat into ``output_dir`` as
    ``<input name>_<output_postfix><ext>``; a name written twice in one run, or one that is an input, is refused.
    With ``argmax`` a multi-channel prediction (one-hot or probabilities) is written as its label map. The item
    itself is left unchanged.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_dir: str | os.PathLike = "./predictions",
        output_postfix: str = "seg",
        output_ext: str = "auto",
        output_dtype: Any = np.uint8,
        ref_key: str = "image",
        argmax: bool = False,
        output_path_key: str = OUTPUT_PATH_KEY,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not output_postfix:
            raise ValueError("output_postfix must not be empty (predictions must never replace their inputs).")
        self.output_dir = Path(os.path.abspath(os.fspath(output_dir)))
        self.output_postfix = output_postfix
        self.output_ext = output_ext
        self.output_dtype = output_dtype
        self.ref_key = ref_key
        self.argmax = argmax
        self.output_path_key = output_path_key
        self._written: set[Path] = set()

    def _fallback_path(self, name: str) -> Path:
        path = self.output_dir / f"{image_stem(name)}_{self.output_postfix}{prediction_ext(name, self.output_ext)}"
        if path in self._written or (name and path == Path(os.path.abspath(name))):
            raise ValueError(f"{name}: its prediction {path} would overwrite another output or an input.")
        return path

    def _write_nifti(self, pred: torch.Tensor, affine: Any, meta: Mapping, path: Path) -> None:
        import nibabel as nib

        affine = np.eye(4) if affine is None else np.asarray(torch.as_tensor(affine, dtype=torch.float64))
        if affine.shape != (4, 4):  # a 2D affine (3x3): embed it
            full = np.eye(4)
            full[:2, :2], full[:2, 3] = affine[:2, :2], affine[:2, 2]
            affine = full
        if str(meta.get("space", "RAS")).upper() == "LPS":
            affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
        array = pred[0].detach().cpu().numpy().astype(self.output_dtype)
        nib.save(nib.Nifti1Image(array, affine), str(path))

    def _write_other(self, pred: torch.Tensor, affine: Any, path: Path) -> None:
        from monai.data.image_writer import resolve_writer

        writer = resolve_writer(path.name.split(".", 1)[-1])[0](output_dtype=self.output_dtype, scale=None)  # labels
        writer.set_data_array(pred, channel_dim=0, squeeze_end_dims=True)
        write_meta = {"spatial_shape": tuple(pred.shape[1:])}
        if affine is not None:
            write_meta["affine"] = affine
        writer.set_metadata(write_meta, resample=False)
        writer.write(str(path), verbose=False)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ref = d.get(self.ref_key)
        for key in self.key_iterator(d):
            pred = d[key]
            if self.argmax and pred.shape[0] > 1:
                pred = pred.argmax(0, keepdim=True) if isinstance(pred, torch.Tensor) else pred.argmax(0)[None]
            meta = dict(pred.meta) if isinstance(pred, MetaTensor) else {}
            if not meta.get("filename_or_obj") and isinstance(ref, MetaTensor):
                meta = dict(ref.meta)
            pred = restore_spatial_shape(torch.as_tensor(pred) if not isinstance(pred, torch.Tensor) else pred, meta)
            affine = pred.affine if isinstance(pred, MetaTensor) else meta.get("affine")
            pred = pred.as_tensor() if isinstance(pred, MetaTensor) else pred
            if pred.shape[0] != 1:
                raise ValueError(f"SavePredictiond writes label maps [1, *spatial], got {tuple(pred.shape)}; set argmax.")
            name = str(meta.get("filename_or_obj", ""))
            planned = d.get(self.output_path_key)
            path = Path(planned) if planned else self._fallback_path(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.name.lower().endswith((".nii", ".nii.gz")):
                self._write_nifti(pred, affine, meta, path)
            else:
                self._write_other(pred, affine, path)
            self._written.add(path)
        return d

def prepare_tensor_batch(batchdata: Any, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
    """
    MONAI's ``default_prepare_batch`` returning plain tensors: the network gets no ``MetaTensor`` (DEX routing
    regroups the batch by expert, which batched metadata cannot follow, and metadata costs time in the hot loop),
    while the batch itself keeps its metadata for the postprocessing (``Invertd``, writers, overlays). Use as the
    ``prepare_batch`` of MONAI trainers and evaluators.
    """
    from monai.engines.utils import default_prepare_batch

    prepared = default_prepare_batch(batchdata, device, non_blocking, **kwargs)

    def plain(x: Any) -> Any:
        return x.as_tensor() if isinstance(x, MetaTensor) else x

    return tuple(plain(x) for x in prepared) if isinstance(prepared, tuple) else plain(prepared)

class TensorInferer(Inferer):
    """
    Run a MONAI inferer on the plain tensor of a ``MetaTensor`` input and give the output the input's metadata back
    (what MONAI inferers return for ``MetaTensor`` inputs), so ``Invertd``, writers and overlays work as usual while
    the network never sees metadata (see :func:`prepare_tensor_batch`). Use it around the validation / inference
    inferer, e.g. ``{"_target_": "dex_monai.engines.finetune.TensorInferer", "inferer": {"_target_":
    "SlidingWindowInferer", ...}}``.
    """

    def __init__(self, inferer: Inferer | None = None) -> None:
        from monai.inferers import SimpleInferer

        self.inferer = inferer if inferer is not None else SimpleInferer()

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(inputs, MetaTensor):
            return self.inferer(inputs, network, *args, **kwargs)
        outputs = self.inferer(inputs.as_tensor(), network, *args, **kwargs)
        if isinstance(outputs, torch.Tensor) and not isinstance(outputs, MetaTensor):
            outputs = convert_to_dst_type(outputs, inputs, dtype=outputs.dtype, device=outputs.device)[0]
        return outputs

    def __getattr__(self, name: str) -> Any:  # roi_size, sw_batch_size ... of the wrapped inferer
        if name == "inferer":
            raise AttributeError(name)
        return getattr(self.inferer, name)

def stack_pred_label(output: Any, num_classes: int | None = None, pred_key: str = "pred", label_key: str = "label"):
    """
    ``(pred [B, C], label)`` from an engine output (a decollated list of dicts or a batch dict), for classification
    metrics: ``label`` is ``[B]`` class indices, or one-hot ``[B, num_classes]`` when ``num_classes`` is given
    (MONAI ``ROCAUC``).
    """
    if isinstance(output, Mapping):
        pred, label = output[pred_key], output[label_key]
    else:
        pred = torch.stack([torch.as_tensor(o[pred_key]) for o in output])
        label = torch.stack([torch.as_tensor(o[label_key]).reshape(-1)[:1] for o in output])
    pred = torch.as_tensor(pred).float().reshape(len(pred), -1)
    label = torch.as_tensor(label).reshape(-1).long()
    if num_classes:
        label = F.one_hot(label, int(num_classes)).to(pred.dtype)
    return pred, label

# ----------------------------------------------------------------------------------------------
# handlers
# ----------------------------------------------------------------------------------------------
def _items(output: Any) -> list[Mapping]:
    if isinstance(output, Mapping):
        batch = None
        for value in output.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                batch = value.shape[0]
                break
        if batch is None:
            return []
        return [{k: v[i] for k, v in output.items() if isinstance(v, torch.Tensor) and v.dim() > 0} for i in range(batch)]
    if isinstance(output, (list, tuple)):
        return [o for o in output if isinstance(o, Mapping)]
    return []

def _index_map(x: torch.Tensor | None) -> np.ndarray | None:
    """``[C, *spatial]`` one-hot / probabilities or ``[1, *spatial]`` indices -> ``[*spatial]`` class indices."""
    if x is None:
        return None
    x = torch.as_tensor(x).detach().float().cpu()
    return (x.argmax(0) if x.shape[0] > 1 else x[0]).numpy()

def _resize_nearest(index_map: np.ndarray, shape: Sequence[int]) -> np.ndarray | None:
    """``index_map`` on a grid of ``shape``: reshaped when only singleton axes differ, else nearest-resampled."""
    spatial = tuple(int(s) for s in shape)
    if tuple(index_map.shape) == spatial:
        return index_map
    if index_map.size == int(np.prod(spatial)):
        return index_map.reshape(spatial)
    if index_map.ndim != len(spatial):
        return None
    x = torch.as_tensor(np.asarray(index_map, dtype=np.float32))
    return F.interpolate(x[None, None], size=spatial, mode="nearest")[0, 0].numpy()

class PredictionOverlayHandler:
    """
    Draw the first validation images of every run with the ground truth and the prediction as a PNG
    (``<output_dir>/overlays/<prefix>_epoch_<N>.png``; the axial slice with the most foreground for volumes) and queue
    it as an MLflow artifact (:func:`~dex_monai.engines.add_tracking_artifact`, uploaded by
    :class:`~dex_monai.engines.DEXMLFlowHandler` at the end of the epoch; attach this handler before it).

    Args:
        output_dir: root of the overlays folder.
        max_images: images drawn per run.
        prefix: file name prefix.
        artifact_dir: MLflow artifact folder.
        epoch_fn: callable giving the epoch to name the file with (default: the engine's epoch).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        max_images: int = 2,
        prefix: str = "val",
        artifact_dir: str = "overlays",
        image_key: str = "image",
        label_key: str = "label",
        pred_key: str = "pred",
        epoch_fn: Any = None,
        enabled: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.max_images = int(max_images)
        self.prefix = prefix
        self.artifact_dir = artifact_dir
        self.keys = (image_key, label_key, pred_key)
        self.epoch_fn = epoch_fn
        self.enabled = enabled
        self.samples: list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None, str]] = []
        self.last_path: Path | None = None
        self.logger = logging.getLogger(self.__class__.__name__)

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_started(self, engine: Engine) -> None:
        self.samples = []

    def iteration_completed(self, engine: Engine) -> None:
        if len(self.samples) >= self.max_images or not is_rank0():
            return
        image_key, label_key, pred_key = self.keys
        for item in _items(engine.state.output):
            if len(self.samples) >= self.max_images:
                break
            image = item.get(image_key)
            if image is None or item.get(pred_key) is None:
                continue
            name = image.meta.get("filename_or_obj", "") if isinstance(image, MetaTensor) else ""
            image = torch.as_tensor(image).detach().float().cpu()
            maps = [_index_map(item.get(k)) for k in (label_key, pred_key)]
            # predictions inverted to the input's geometry no longer match the preprocessed image: resample for display
            maps = [None if m is None else _resize_nearest(m, image.shape[1:]) for m in maps]
            self.samples.append((image.numpy(), maps[0], maps[1], str(name)))

    def epoch_completed(self, engine: Engine) -> None:
        if not self.samples or not is_rank0():
            return
        epoch = int(self.epoch_fn() if callable(self.epoch_fn) else engine.state.epoch)
        path = self.output_dir / "overlays" / f"{self.prefix}_epoch_{epoch}.png"
        try:
            draw_overlays(self.samples, path, title=f"{self.prefix}, epoch {epoch}")
        except Exception as e:  # drawing must never stop training
            self.logger.warning(f"could not draw prediction overlays: {e}")
            return
        self.last_path = path
        add_tracking_artifact(engine, path, self.artifact_dir)

def _display_slice(image: np.ndarray, label: np.ndarray | None, pred: np.ndarray | None):
    """2D views ``(image [H, W] or [H, W, 3], label, pred)``; volumes cut at the slice with most foreground."""
    spatial = image.shape[1:]
    if len(spatial) == 3:
        ref = label if label is not None and label.any() else pred
        z = int(np.argmax((ref > 0).reshape(-1, spatial[-1]).sum(0))) if ref is not None and ref.any() else spatial[-1] // 2
        image, label = image[..., z], None if label is None else label[..., z]
        pred = None if pred is None else pred[..., z]
    channels = image if image.shape[0] == 3 else image.mean(0, keepdims=True)
    scaled = []
    for channel in channels:  # per channel: standardised grey-as-RGB images show grey, not tinted
        lo, hi = float(np.percentile(channel, 1)), float(np.percentile(channel, 99))
        scaled.append(np.clip((channel - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(channel))
    view = np.stack(scaled, -1) if len(scaled) == 3 else scaled[0]
    # array axes (x, y) of MONAI-loaded images are shown transposed so that rows are y
    tr = (lambda a: None if a is None else np.swapaxes(a, 0, 1))
    return tr(view), tr(label), tr(pred)

def draw_overlays(
    samples: Sequence[tuple[np.ndarray, np.ndarray | None, np.ndarray | None, str]],
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """One row per sample: image, ground truth over the image, prediction over the image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = len(samples)
    fig = Figure(figsize=(9.0, 3.0 * rows))
    FigureCanvasAgg(fig)
    for r, (image, label, pred, name) in enumerate(samples):
        origin = "lower" if image.ndim == 4 else "upper"  # RAS volumes: anterior up; pictures: first row on top
        view, label, pred = _display_slice(image, label, pred)
        top = max(1, int(max(np.max(label) if label is not None else 0, np.max(pred) if pred is not None else 0)))
        for c, (overlay, what) in enumerate(((None, "image"), (label, "ground truth"), (pred, "prediction"))):
            ax = fig.add_subplot(rows, 3, 3 * r + c + 1)
            ax.imshow(view, cmap=None if view.ndim == 3 else "gray", origin=origin)
            if overlay is not None:
                masked = np.ma.masked_where(overlay == 0, overlay)
                ax.imshow(masked, cmap="autumn", alpha=0.5, vmin=0, vmax=top, origin=origin)
            ax.set_title(what if c else (os.path.basename(name) or "image"), fontsize=8)
            ax.axis("off")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=80)
    return path

def _gather(values: list) -> list:
    if not is_dist():
        return values
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    return [v for part in gathered for v in (part or [])]

class ClassificationReportHandler:
    """
    Per-class report of a classification evaluator: precision, recall, F1, support, one-vs-rest AUC and the confusion
    matrix, written to ``<output_dir>/<prefix>_report_epoch_<N>.json`` (and ``.txt``), queued as MLflow artifacts and
    as epoch metrics ``<prefix>_f1/<class>``, ``<prefix>_auc/<class>`` etc. Predictions are gathered across ranks.

    Args:
        output_dir: folder of the reports.
        class_names: names of the classes, in index order.
        prefix: metric and file name prefix.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Sequence[str],
        prefix: str = "val",
        artifact_dir: str = "reports",
        pred_key: str = "pred",
        label_key: str = "label",
        epoch_fn: Any = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.class_names = [str(c) for c in class_names]
        self.prefix = prefix
        self.artifact_dir = artifact_dir
        self.pred_key, self.label_key = pred_key, label_key
        self.epoch_fn = epoch_fn
        self.probs: list[list[float]] = []
        self.labels: list[int] = []
        self.last_report: dict | None = None
        self.logger = logging.getLogger(self.__class__.__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_started(self, engine: Engine) -> None:
        self.probs, self.labels = [], []

    def iteration_completed(self, engine: Engine) -> None:
        pred, label = stack_pred_label(engine.state.output, None, self.pred_key, self.label_key)
        self.probs += pred.detach().cpu().tolist()
        self.labels += label.detach().cpu().tolist()

    def report(self, probs: np.ndarray, labels: np.ndarray) -> dict:
        from sklearn.metrics import classification_report, confusion_matrix, roc_auc_score

        n = len(self.class_names)
        pred = probs.argmax(1)
        table = classification_report(
            labels, pred, labels=list(range(n)), target_names=self.class_names, output_dict=True, zero_division=0
        )
        text = classification_report(
            labels, pred, labels=list(range(n)), target_names=self.class_names, zero_division=0
        )
        auc = {}
        for c, name in enumerate(self.class_names):
            positives = labels == c
            auc[name] = float(roc_auc_score(positives, probs[:, c])) if 0 < positives.sum() < len(labels) else None
        return {
            "classes": self.class_names,
            "num_images": int(len(labels)),
            "accuracy": float((pred == labels).mean()) if len(labels) else None,
            "per_class": {name: table[name] for name in self.class_names},
            "macro_avg": table.get("macro avg"),
            "weighted_avg": table.get("weighted avg"),
            "auc": auc,
            "confusion_matrix": confusion_matrix(labels, pred, labels=list(range(n))).tolist(),
            "text": text,
        }

    def epoch_completed(self, engine: Engine) -> None:
        probs, labels = _gather(self.probs), _gather(self.labels)
        if not is_rank0() or not labels:
            return
        report = self.report(np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64))
        epoch = int(self.epoch_fn() if callable(self.epoch_fn) else engine.state.epoch)
        report["epoch"] = epoch
        self.last_report = report
        metrics = {}
        for name, row in report["per_class"].items():
            for what in ("precision", "recall", "f1-score"):
                metrics[f"{self.prefix}_{what.split('-')[0]}/{name}"] = float(row[what])
            if report["auc"][name] is not None:
                metrics[f"{self.prefix}_auc/{name}"] = report["auc"][name]
        add_tracking_metrics(engine, metrics)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        json_path = self.output_dir / f"{self.prefix}_report_epoch_{epoch}.json"
        text_path = self.output_dir / f"{self.prefix}_report_epoch_{epoch}.txt"
        json_path.write_text(json.dumps(report, indent=2))
        matrix = "\n".join(" ".join(f"{v:5d}" for v in row) for row in report["confusion_matrix"])
        text_path.write_text(f"{report['text']}\nconfusion matrix (rows: truth, columns: prediction)\n{matrix}\n")
        for path in (json_path, text_path):
            add_tracking_artifact(engine, path, self.artifact_dir)
        self.logger.info(f"{self.prefix} per-class report, epoch {epoch}:\n{report['text']}")

class ClassProbabilityWriter:
    """
    Write one CSV row per image: ``image, predicted_index, predicted_class, prob_<class>...``, to
    ``<output_dir>/<filename>`` when the run completes. The file is never one of the inputs.

    Args:
        output_dir: folder of the CSV file (created).
        class_names: class names in index order.
        filename: CSV file name.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Sequence[str],
        filename: str = "predictions.csv",
        image_key: str = "image",
        pred_key: str = "pred",
    ) -> None:
        self.path = Path(output_dir) / filename
        self.class_names = [str(c) for c in class_names]
        self.image_key, self.pred_key = image_key, pred_key
        self.rows: list[list[Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.completed)

    def started(self, engine: Engine) -> None:
        self.rows = []

    def iteration_completed(self, engine: Engine) -> None:
        for item in _items(engine.state.output):
            image = item.get(self.image_key)
            name = image.meta.get("filename_or_obj", "") if isinstance(image, MetaTensor) else ""
            probs = torch.as_tensor(item[self.pred_key]).detach().float().cpu().reshape(-1).tolist()
            index = int(np.argmax(probs))
            label = self.class_names[index] if index < len(self.class_names) else str(index)
            self.rows.append([str(name), index, label, *[f"{p:.6f}" for p in probs]])

    def completed(self, engine: Engine) -> None:
        rows = _gather(self.rows)
        if not is_rank0():
            return
        inputs = {Path(r[0]).resolve() for r in rows if r[0]}
        if self.path.resolve() in inputs:
            raise ValueError(f"refusing to overwrite the input {self.path} with the predictions CSV.")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        width = max((len(r) - 3 for r in rows), default=len(self.class_names))
        names = [self.class_names[i] if i < len(self.class_names) else str(i) for i in range(width)]
        with open(self.path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "predicted_index", "predicted_class", *[f"prob_{n}" for n in names]])
            writer.writerows(rows)
        add_tracking_artifact(engine, self.path, "predictions")
        logging.getLogger(self.__class__.__name__).info(f"wrote {len(rows)} class probabilities to {self.path}.")

