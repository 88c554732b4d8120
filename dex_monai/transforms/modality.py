"""Telling the modality of an image: DICOM tag, else datalist entry, else user rule; never guessed."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from monai.config import KeysCollection
from monai.transforms import MapTransform

from dex_monai.data.detect import DetectModality, as_rules
from dex_monai.data.modality import (
    ModalityRules,
    modality_index,
)

__all__ = ["DetectModality", "DetectModalityd", "as_rules"]


class DetectModalityd(MapTransform):
    """Dictionary version of :class:`DetectModality`.

    Reads the image (a path or a loaded MetaTensor) at the first of ``keys`` and the datalist's
    ``d[modality_key]``; writes the canonical name to ``d[modality_key]`` (str), its position in
    :data:`~dex_monai.data.MODALITIES` to ``d[index_key]`` (int; ``-1`` for unknown) and, if
    ``source_key`` is set, where it came from.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        modality_key: str = "modality",
        index_key: str = "modality_index",
        source_key: str | None = "modality_source",
        rules: ModalityRules | str | os.PathLike | Sequence[Any] | Mapping[str, str] | None = None,
        strict: bool = True,
        series_uid_key: str = "series_uid",
        root_key: str = "source",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.detector = DetectModality(rules=rules, strict=strict)
        self.modality_key = modality_key
        self.index_key = index_key
        self.source_key = source_key
        self.series_uid_key = series_uid_key
        self.root_key = root_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            root = d.get(self.root_key)
            modality, source = self.detector(
                d[key],
                declared=d.get(self.modality_key),
                series_uid=d.get(self.series_uid_key),
                root=root if isinstance(root, (str, os.PathLike)) and os.path.isdir(root) else None,
            )
            d[self.modality_key] = modality
            d[self.index_key] = modality_index(modality)
            if self.source_key:
                d[self.source_key] = source
            break  # one image gives the modality of the item
        return d
