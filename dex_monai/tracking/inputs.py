# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""The datalists of a training run as MLflow dataset inputs (``mlflow.data``): where the data is (the source), a
digest of the datalist and the number of items per modality, so that the Runs page shows which data a model saw."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["DATASET_CONTEXTS", "datalist_items", "datalist_digest", "items_per_modality", "datalist_dataset",
           "log_datalist_inputs"]

#: MLflow's dataset contexts for the splits of a training run.
DATASET_CONTEXTS = ("training", "validation")


def datalist_items(data: Any) -> list[Mapping[str, Any]]:
    """The datalist items of a MONAI dataset (its ``data``) or of a datalist given as a sequence of dicts."""
    items = getattr(data, "data", data)
    return [dict(item) for item in (items or [])]


def datalist_digest(items: Sequence[Mapping[str, Any]]) -> str:
    """
    Fingerprint of a datalist: the first 16 hex digits of the SHA-256 of its canonical JSON (keys sorted, items in
    order, paths and other values as text). Equal datalists give equal digests; any changed, added, removed or
    reordered item changes it.
    """
    text = json.dumps([dict(item) for item in items], sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def items_per_modality(
    items: Sequence[Mapping[str, Any]], modality_key: str = "modality", default_modality: str | None = None
) -> dict[str, int]:
    """``{modality: number of items}``, from each item's ``modality_key`` (else ``default_modality``, else
    ``"unknown"``), sorted by name. A bundle's ``modality`` may name an intensity rule rather than a modality
    (``range``, ``minmax``, ``none``: :data:`dex_monai.data.normalization.PLAIN_METHODS`); it then counts as unknown."""
    from dex_monai.data.normalization import PLAIN_METHODS

    if default_modality in PLAIN_METHODS:
        default_modality = None
    counts = Counter(str(item.get(modality_key) or default_modality or "unknown") for item in items)
    return dict(sorted(counts.items()))


def _dataset_class() -> type:
    from mlflow.data.meta_dataset import MetaDataset

    class DatalistDataset(MetaDataset):
        """An MLflow ``MetaDataset`` (metadata only: the images stay where they are) with a profile."""

        def __init__(self, profile: Mapping[str, Any], **kwargs: Any) -> None:
            self._profile = dict(profile)
            super().__init__(**kwargs)

        @property
        def profile(self) -> dict[str, Any]:
            return self._profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self._profile)}

    return DatalistDataset


def datalist_dataset(
    items: Sequence[Mapping[str, Any]],
    source: str | os.PathLike,
    name: str,
    modality_key: str = "modality",
    default_modality: str | None = None,
) -> Any:
    """
    An ``mlflow.data`` dataset describing a datalist, for ``mlflow.log_input`` / ``MlflowClient.log_inputs``.

    Args:
        items: the datalist (``[{"image": ..., "label": ..., "modality": ...}, ...]``).
        source: where the data is (a local folder or datalist file, or a URI), resolved by MLflow's source registry.
        name: dataset name shown in MLflow.
        modality_key, default_modality: see :func:`items_per_modality`.

    Returns:
        a ``MetaDataset`` with ``digest`` = :func:`datalist_digest`, ``profile`` = ``{"num_items": N,
        "items_per_modality": {modality: count}}`` and a string schema of the item keys.
    """
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.types import ColSpec, DataType, Schema

    keys = sorted({str(k) for item in items for k in item})
    profile = {"num_items": len(items), "items_per_modality": items_per_modality(items, modality_key, default_modality)}
    schema = Schema([ColSpec(DataType.string, name=k) for k in keys]) if keys else None
    with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns that it is ambiguous
        warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
        resolved = resolve_dataset_source(os.fspath(source))
    return _dataset_class()(
        profile=profile,
        source=resolved,
        name=name,
        digest=datalist_digest(items),
        schema=schema,
    )


def log_datalist_inputs(
    client: Any,
    run_id: str,
    datalists: Mapping[str, Any],
    source: str | os.PathLike,
    name: str,
    modality_key: str = "modality",
    default_modality: str | None = None,
) -> list[Any]:
    """
    Log each datalist as a dataset input of the run with its context tag (``mlflow.data.context``: ``"training"``,
    ``"validation"``...), named ``<name>_<context>``. A dataset the run already has (same name and digest, e.g. a
    resumed run) is not logged twice.

    Args:
        client: an ``mlflow.MlflowClient``.
        run_id: the run.
        datalists: ``{context: datalist or MONAI dataset}`` (None values are skipped).
        source, name, modality_key, default_modality: see :func:`datalist_dataset`.

    Returns:
        the logged ``mlflow.data`` datasets.
    """
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    run = client.get_run(run_id)
    present = {(d.dataset.name, d.dataset.digest) for d in (run.inputs.dataset_inputs if run.inputs else [])}
    logged, inputs = [], []
    for context, data in datalists.items():
        if data is None:
            continue
        dataset = datalist_dataset(datalist_items(data), source, f"{name}_{context}", modality_key, default_modality)
        if (dataset.name, dataset.digest) in present:
            continue
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, str(context))]))
        logged.append(dataset)
    if inputs:
        client.log_inputs(run_id, datasets=inputs)
    return logged
