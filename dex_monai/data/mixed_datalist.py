# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""One datalist of mixed annotation levels: segmentation items, classification items and unlabelled images (UniMed's
one-stage joint training). Reads JSON datalists through :mod:`dex_monai.data.datalist`."""

from __future__ import annotations

import os
from collections.abc import Sequence

from dex_monai.data.datalist import _cap, _choose_split, _is_path_value, _json_lists

__all__ = ["NO_CLASS", "annotation_level", "mixed_datalist"]

#: ``class_label`` of an item without an image label
NO_CLASS = -1


def annotation_level(item: dict) -> str:
    """``"mask"``, ``"class"`` or ``"none"`` of an item of :func:`mixed_datalist`."""
    return "mask" if item.get("mask") else "class" if item["class_label"] != NO_CLASS else "none"


def mixed_datalist(
    datalist: str | os.PathLike,
    class_names: Sequence[str],
    split: str = "training",
    dataset_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_items: int | None = None,
    train_key: str = "training",
    val_key: str = "validation",
) -> list[dict]:
    """
    ``[{"image", "class_label", "mask"?, "modality"?}, ...]`` of one split of a JSON datalist whose items carry a
    ``label`` of either kind or none: an image file (a mask: the item gets ``mask``), a class name of ``class_names``
    or a class index (``class_label``), or no ``label`` (an unlabelled image). ``class_label`` is :data:`NO_CLASS`
    where there is no image label. Paths are resolved as in :func:`~dex_monai.data.datalist.load_datalist`; without
    a validation list the training list is split, stratified by annotation level and class.

    Raises:
        ValueError: a class name not in ``class_names``, a class index out of range, or no items.
    """
    if datalist in (None, ""):
        raise ValueError("mixed_datalist needs a JSON `datalist` (items with a mask, a class or no label).")
    names = [str(n) for n in class_names]
    train, val = _json_lists(datalist, dataset_dir, train_key, val_key)
    mixed = []
    for entry in train + (val or []):
        label = entry.pop("label", None)
        item = {**entry, "class_label": NO_CLASS}
        if isinstance(label, str) and label and _is_path_value("label", label):
            item["mask"] = label
        elif label not in (None, ""):
            index = names.index(label) if isinstance(label, str) and label in names else label
            if isinstance(index, str) and not index.lstrip("-").isdigit():
                raise ValueError(f"label {label!r} of {entry['image']} is not one of class_names={names}.")
            index = int(index)
            if not 0 <= index < len(names):
                raise ValueError(f"class index {index} of {entry['image']} is outside [0, {len(names) - 1}].")
            item["class_label"] = index
        mixed.append(item)
    if not mixed:
        raise ValueError(f"{datalist}: no items.")
    train_items, val_items = mixed[: len(train)], None if val is None else mixed[len(train) :]
    key = lambda x: (annotation_level(x), x["class_label"])  # noqa: E731
    return _cap(_choose_split(train_items, val_items, split, val_fraction, seed, key=key), max_items)
