# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Per-modality intensity normalisation to ``[0, 1]`` (the DEX paper's table): the config, the array
rules and :class:`ModalityNormalize`; the dictionary transform is :class:`dex_monai.transforms.ModalityNormalized`.

=====================================  =========================================================
modality                               normalisation (``method`` in the YAML config)
=====================================  =========================================================
CT                                     clip HU to ``[-200, 400]``, scale to ``[0, 1]`` (``window``)
PET                                    clip to the 1st-99th percentile, z-score, min-max to
                                       ``[0, 1]`` (``percentile_zscore``); SUV volumes: clip to
                                       ``[0, 20]``, divide by 20 (``suv_window``)
MR                                     clip to the 1st-99th percentile, min-max (``percentile``)
X-ray, ultrasound, fundus, OCT,        divide 8-bit by 255, 16-bit by its stored range
pathology, endoscopy, photo            (``range``)
=====================================  =========================================================

CT, PET and MR stored as display images (PNG/JPEG/TIFF/BMP, 8-bit NPY/NPZ such as MedMNIST, 8-bit
single DICOM objects; the loader sets ``display_referred`` in the metadata) are already windowed grey
levels, not HU or scanner units: they are divided by their range too (``display_referred_method``).
Everything is configurable from ``configs/modality_normalization.yaml``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Transform
from monai.utils import convert_to_dst_type

from dex_monai.data.modality import MODALITIES, UnknownModalityError, canonical_modality
from dex_monai.data.readers import DICOM_UNITS, DISPLAY_REFERRED, INTENSITY_RANGE

__all__ = ["DEFAULT_NORMALIZATION", "NORMALIZATION_METHODS", "PLAIN_METHODS", "ModalityNormalize", "default_normalization_config", "load_normalization_config", "modality_settings", "normalization_config_hash", "normalize_intensity"]


NORMALIZATION_METHODS = ("window", "percentile", "percentile_zscore", "range", "minmax")


_RANGE_MODALITY = {"method": "range", "foreground_threshold": 0.0, "min_foreground_ratio": 0.0}


#: Built-in defaults; ``configs/modality_normalization.yaml`` holds the same values.
DEFAULT_NORMALIZATION: dict[str, Any] = {
    "display_referred_method": "range",
    "percentile_max_samples": 16_777_216,
    "modalities": {
        "CT": {"method": "window", "window": [-200.0, 400.0], "foreground_threshold": 0.0, "min_foreground_ratio": 0.05},
        "PET": {
            "method": "percentile_zscore",
            "percentiles": [1.0, 99.0],
            "suv_window": [0.0, 20.0],
            "foreground_threshold": 0.01,
            "min_foreground_ratio": 0.01,
        },
        "MR": {"method": "percentile", "percentiles": [1.0, 99.0], "foreground_threshold": 0.05, "min_foreground_ratio": 0.05},
        **{m: dict(_RANGE_MODALITY) for m in MODALITIES[3:]},
    },
}


_KNOWN_KEYS = {"method", "window", "percentiles", "suv_window", "foreground_threshold", "min_foreground_ratio"}


def default_normalization_config() -> dict[str, Any]:
    """A deep copy of :data:`DEFAULT_NORMALIZATION`."""
    return copy.deepcopy(DEFAULT_NORMALIZATION)


def _check_pair(value: Any, what: str, where: str) -> list[float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: '{what}' must be two numbers [low, high], got {value!r}.") from e
    if not hi > lo:
        raise ValueError(f"{where}: '{what}' needs low < high, got {value!r}.")
    return [lo, hi]


def load_normalization_config(source: str | os.PathLike | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The normalisation config: defaults overridden by a YAML file or a mapping (per-modality merge).

    Example YAML::

        modalities:
          CT: {window: [-1000, 1000]}       # other CT keys keep their defaults
    """
    cfg = default_normalization_config()
    if source is None:
        return cfg
    where = "normalisation config"
    if isinstance(source, (str, os.PathLike)):
        import yaml

        where = os.fspath(source)
        with open(source, encoding="utf-8") as f:
            try:
                user = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"{where}: invalid YAML: {e}") from e
    else:
        user = copy.deepcopy(dict(source))
    if not isinstance(user, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(user).__name__}.")
    for key, value in user.items():
        if key == "modalities":
            if not isinstance(value, Mapping):
                raise ValueError(f"{where}: 'modalities' must be a mapping of modality -> settings.")
            for name, settings in value.items():
                canonical = canonical_modality(name)
                if canonical is None:
                    raise ValueError(f"{where}: '{name}' is not one of the DEX modalities {MODALITIES}.")
                unknown = set(settings or {}) - _KNOWN_KEYS
                if unknown:
                    raise ValueError(f"{where}: {name}: unknown keys {sorted(unknown)} (known: {sorted(_KNOWN_KEYS)}).")
                cfg["modalities"][canonical].update(settings or {})
        elif key in cfg:
            cfg[key] = value
        else:
            raise ValueError(f"{where}: unknown key '{key}' (known: {sorted(cfg)}).")
    for name, settings in cfg["modalities"].items():
        here = f"{where}: {name}"
        if settings.get("method") not in NORMALIZATION_METHODS:
            raise ValueError(f"{here}: method must be one of {NORMALIZATION_METHODS}, got {settings.get('method')!r}.")
        for pair in ("window", "percentiles", "suv_window"):
            if pair in settings:
                settings[pair] = _check_pair(settings[pair], pair, here)
        if settings["method"] == "window" and "window" not in settings:
            raise ValueError(f"{here}: method 'window' needs 'window: [low, high]'.")
        if settings["method"].startswith("percentile") and "percentiles" not in settings:
            raise ValueError(f"{here}: method '{settings['method']}' needs 'percentiles: [low, high]'.")
    if cfg["display_referred_method"] not in NORMALIZATION_METHODS:
        raise ValueError(f"{where}: display_referred_method must be one of {NORMALIZATION_METHODS}.")
    return cfg


def normalization_config_hash(cfg: Mapping[str, Any]) -> str:
    """A stable short hash of a normalisation config (part of the slice-cache key)."""
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def modality_settings(cfg: Mapping[str, Any], modality: str) -> dict[str, Any]:
    """The settings of one modality (canonical name or alias)."""
    canonical = canonical_modality(modality)
    if canonical is None:
        raise UnknownModalityError(f"cannot normalise: '{modality}' is not one of the DEX modalities {MODALITIES}.")
    return dict(cfg["modalities"][canonical])


def _percentiles(x: np.ndarray, q: list[float], max_samples: int) -> tuple[float, float]:
    flat = x.reshape(-1)
    if flat.size > max_samples:  # regular sub-sampling keeps it deterministic on very large volumes
        flat = flat[:: int(np.ceil(flat.size / max_samples))]
    lo, hi = np.percentile(flat, q)
    return float(lo), float(hi)


def _scale(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float32)
    return ((np.clip(x, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def _stored_range(x: np.ndarray, intensity_range: Any) -> tuple[float, float] | None:
    if intensity_range is not None:
        lo, hi = (float(v) for v in np.asarray(intensity_range, dtype=np.float64).ravel()[:2])
        return lo, hi
    if x.dtype.kind in "iu" and x.dtype.itemsize <= 2:
        info = np.iinfo(x.dtype)
        return (0.0, float(info.max)) if x.dtype.kind == "u" else (float(info.min), float(info.max))
    return None


def normalize_intensity(
    x: np.ndarray,
    method: str,
    settings: Mapping[str, Any],
    intensity_range: Any = None,
    suv: bool = False,
    percentile_max_samples: int = 16_777_216,
) -> tuple[np.ndarray, str]:
    """Normalise an array (any shape; all channels together) to ``float32`` in ``[0, 1]``.

    Returns the array and a short description of what was done (kept in the metadata).
    """
    if suv and "suv_window" in settings:
        lo, hi = settings["suv_window"]
        return _scale(x, lo, hi), f"suv_window[{lo:g},{hi:g}]"
    if method == "window":
        lo, hi = settings["window"]
        return _scale(x, lo, hi), f"window[{lo:g},{hi:g}]"
    if method in ("percentile", "percentile_zscore"):
        q = list(settings["percentiles"])
        xf = np.asarray(x, dtype=np.float32)
        lo, hi = _percentiles(xf, q, percentile_max_samples)
        clipped = np.clip(xf, lo, hi)
        if method == "percentile":
            return _scale(clipped, lo, hi), f"percentile[{q[0]:g},{q[1]:g}]"
        std = float(clipped.std())
        z = (clipped - float(clipped.mean())) / (std if std > 0 else 1.0)
        return _scale(z, float(z.min()), float(z.max())), f"percentile_zscore[{q[0]:g},{q[1]:g}]"
    if method == "range":
        rng = _stored_range(x, intensity_range)
        if rng is not None:
            return _scale(np.asarray(x, dtype=np.float32), *rng), f"range[{rng[0]:g},{rng[1]:g}]"
        xf = np.asarray(x, dtype=np.float32)
        if xf.size and xf.min() >= 0.0 and xf.max() <= 1.0:
            return xf, "range[0,1]"
        return _scale(xf, float(xf.min()), float(xf.max())), "minmax (no stored range)"
    if method == "minmax":
        xf = np.asarray(x, dtype=np.float32)
        return _scale(xf, float(xf.min()), float(xf.max())), "minmax"
    raise ValueError(f"unknown normalisation method '{method}' (known: {NORMALIZATION_METHODS}).")


#: rules that may stand in for a modality name: divide by the stored 8/16-bit range, min-max, nothing
PLAIN_METHODS = ("range", "minmax", "none")


class ModalityNormalize(Transform):
    """Normalise an image of a given modality to ``float32`` in ``[0, 1]`` (see the module table).

    For images of none of the DEX modalities (e.g. electron microscopy) ``modality`` may name a rule of
    :data:`PLAIN_METHODS` instead: ``"range"`` (divide by the stored 8/16-bit range), ``"minmax"`` or ``"none"``.

    Args:
        config: normalisation config: a YAML path, a mapping, or ``None`` for the defaults.

    Call with ``img`` (array / tensor / MetaTensor ``[C, *spatial]``), the ``modality`` name and
    optionally ``suv`` (PET volume in SUV) and ``intensity_range`` (stored range; by default read from
    the MetaTensor's ``intensity_range`` metadata, else from an 8/16-bit integer dtype).
    ``display_referred`` (by default from the metadata, else ``True`` for ``uint8`` data) makes CT/PET/MR
    use ``display_referred_method`` instead of their physical rule.
    """

    def __init__(self, config: str | os.PathLike | Mapping[str, Any] | None = None) -> None:
        self.config = config if isinstance(config, dict) and "modalities" in config else load_normalization_config(config)

    def __call__(
        self,
        img: Any,
        modality: str,
        suv: bool | None = None,
        intensity_range: Any = None,
        display_referred: bool | None = None,
    ) -> Any:
        meta = img.meta if isinstance(img, MetaTensor) else {}
        arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        if intensity_range is None:
            intensity_range = meta.get(INTENSITY_RANGE)
        if str(modality).lower() in PLAIN_METHODS:  # images of none of the DEX modalities (e.g. microscopy)
            method = str(modality).lower()
            out = arr.astype(np.float32) if method == "none" else normalize_intensity(
                arr, method, {}, intensity_range=intensity_range)[0]
            result, *_ = convert_to_dst_type(out, img, dtype=torch.float32 if isinstance(img, torch.Tensor) else np.float32)
            return result
        settings = modality_settings(self.config, modality)
        if display_referred is None:
            display_referred = bool(meta.get(DISPLAY_REFERRED, arr.dtype == np.uint8))
        if suv is None:
            suv = str(meta.get(DICOM_UNITS, "")).upper() in ("GML", "SUV")
        method = settings["method"]
        if display_referred and method in ("window", "percentile", "percentile_zscore"):
            method = self.config["display_referred_method"]
        out, how = normalize_intensity(
            arr,
            method,
            settings,
            intensity_range=intensity_range,
            suv=bool(suv) and canonical_modality(modality) == "PET",
            percentile_max_samples=int(self.config.get("percentile_max_samples", 16_777_216)),
        )
        result, *_ = convert_to_dst_type(out, img, dtype=torch.float32 if isinstance(img, torch.Tensor) else np.float32)
        if isinstance(result, MetaTensor):
            result.meta["normalization"] = how
        return result
