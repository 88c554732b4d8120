# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Which modality an image is: its DICOM tag, else the datalist's declaration, else the modality rules of its path.
The dictionary transform is :class:`dex_monai.transforms.DetectModalityd`."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from monai.data import MetaTensor
from monai.transforms import Transform

from dex_monai.data.modality import (
    MODALITIES,
    UNKNOWN_MODALITY,
    ModalityRules,
    UnknownModalityError,
    canonical_modality,
    modality_from_dicom,
)
from dex_monai.data.readers import DICOM_MODALITY, dicom_modality_tag, image_format

__all__ = ["DetectModality", "as_rules"]


def as_rules(rules: ModalityRules | str | os.PathLike | Sequence[Any] | Mapping[str, str] | None) -> ModalityRules:
    """A :class:`ModalityRules` from rules, a YAML path, ``[(pattern, modality)]`` or ``{pattern: modality}``."""
    if rules is None:
        return ModalityRules()
    if isinstance(rules, ModalityRules):
        return rules
    if isinstance(rules, (str, os.PathLike)):
        return ModalityRules.load(rules)
    return ModalityRules.from_config(rules)  # type: ignore[arg-type]


def _filename(img: Any) -> str | None:
    if isinstance(img, (str, os.PathLike)):
        return os.fspath(img)
    if isinstance(img, MetaTensor):
        name = img.meta.get("filename_or_obj")
        return None if name is None else str(name)
    return None


class DetectModality(Transform):
    """Tell the DEX modality of an image.

    Order: (1) the DICOM ``Modality`` tag (from the loaded image's metadata, or read from the
    header when given a path), when it maps to one of the ten; (2) ``declared``, the datalist entry;
    (3) the first :class:`~dex_monai.data.ModalityRules` rule whose pattern matches the path.

    Args:
        rules: user rules (object, YAML path, list or mapping); ``None``: no rules.
        strict: raise :class:`~dex_monai.data.UnknownModalityError` (naming the file and what was
            tried) when the modality cannot be told; if ``False``, warn and return ``"unknown"``.

    Returns ``(modality, source)`` with ``source`` in ``{"dicom", "datalist", "rule", "unknown"}``.
    """

    def __init__(
        self,
        rules: ModalityRules | str | os.PathLike | Sequence[Any] | Mapping[str, str] | None = None,
        strict: bool = True,
    ) -> None:
        self.rules = as_rules(rules)
        self.strict = strict

    def __call__(
        self,
        img: Any,
        declared: str | None = None,
        series_uid: str | None = None,
        root: str | os.PathLike | None = None,
    ) -> tuple[str, str]:
        name = _filename(img)
        tag: str | None = None
        if isinstance(img, MetaTensor):
            tag = img.meta.get(DICOM_MODALITY) or None
        elif name is not None and image_format(name) in ("dicom", "dicom-series"):
            tag = dicom_modality_tag(name, series_uid=series_uid)
        found = modality_from_dicom(tag)
        if found is not None:
            return found, "dicom"
        if declared not in (None, "", UNKNOWN_MODALITY):
            canonical = canonical_modality(declared)
            if canonical is None:
                raise UnknownModalityError(
                    f"{name or 'image'}: datalist modality '{declared}' is not one of the DEX modalities {MODALITIES}."
                )
            return canonical, "datalist"
        if name is not None:
            rule = self.rules.match(name, root=root)
            if rule is not None:
                return rule.modality, "rule"
        tried = [f"DICOM Modality tag '{tag}' is not one of the mapped terms" if tag else "no DICOM Modality tag"]
        tried.append("no 'modality' in the datalist entry")
        tried.append(f"no modality rule matches ({len(self.rules)} rules)")
        msg = f"{name or 'image'}: cannot tell the modality: {'; '.join(tried)}. Add a datalist entry or a rule."
        if self.strict:
            raise UnknownModalityError(msg)
        warnings.warn(msg, stacklevel=2)
        return UNKNOWN_MODALITY, "unknown"
