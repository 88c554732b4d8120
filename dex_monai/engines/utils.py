# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""
Small helpers shared by the DEX training engines, handlers and bundles: distributed queries, network
unwrapping, the pre-training datalist (real or generated) and a snapshot of the running bundle config.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
import torch.distributed as dist

__all__ = [
    "as_bool",
    "barrier",
    "bundle_config_snapshot",
    "find_bundle_parser",
    "get_rank",
    "get_world_size",
    "is_dist",
    "is_rank0",
    "load_pretrain_datalist",
    "pretrain_dataset",
    "unwrap_network",
]

logger = logging.getLogger(__name__)


def as_bool(value: Any) -> bool:
    """Truth of a config flag given as a bool, a number or a command-line string (``"false"``, ``"0"``, ``"no"`` ...)."""
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no", "off", "none", "null")
    return bool(value)


def is_dist() -> bool:
    """Whether ``torch.distributed`` is available and initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank (``ignite.distributed``; 0 when not distributed)."""
    return idist.get_rank()


def get_world_size() -> int:
    """The number of processes (``ignite.distributed``; 1 when not distributed)."""
    return idist.get_world_size()


def is_rank0() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """``ignite.distributed.barrier()`` when distributed, else nothing."""
    if get_world_size() > 1:
        idist.barrier()


def unwrap_network(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile`` wrappers."""
    while True:
        if isinstance(network, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            network = network.module
        elif hasattr(network, "_orig_mod"):  # torch.compile
            network = network._orig_mod
        else:
            return network


# ----------------------------------------------------------------------------------------------
# datalist
# ----------------------------------------------------------------------------------------------
def _generate_synthetic(dataset_dir: Path, n_per_modality: int, size: int, seed: int) -> Path:
    """Generate the default multi-modality set with :func:`dex_monai.data.synthetic.make_synthetic_dataset`."""
    from dex_monai.data.synthetic import make_synthetic_dataset

    return Path(make_synthetic_dataset(str(dataset_dir), n_per_modality=n_per_modality, size=size, seed=seed))


def load_pretrain_datalist(
    datalist: str | os.PathLike | None = None,
    dataset_dir: str | os.PathLike | None = None,
    data_list_key: str = "training",
    synthetic_n_per_modality: int = 8,
    synthetic_size: int = 64,
    synthetic_seed: int = 0,
    max_items: int | None = None,
    modality: str | None = None,
    image_only: bool = False,
) -> list[dict]:
    """
    Items of a decathlon-style pre-training datalist; when none is given, ``<dataset_dir>/datalist.json`` is used,
    and if ``dataset_dir`` is new or empty a small multi-modality set is generated there first, so that a bundle
    runs anywhere (a non-empty ``dataset_dir`` without ``datalist.json`` is an error, never written into).

    Under ``torch.distributed`` only rank 0 generates; the other ranks wait at a barrier.

    Args:
        datalist: path of a datalist JSON (``{"training": [{"image": ..., "modality": ...}, ...]}``, e.g. written by
            ``python -m dex_monai.data.index``); relative paths are resolved against ``dataset_dir`` (or the JSON's
            folder when ``dataset_dir`` is None).
        dataset_dir: image root, and where the generated set goes when ``datalist`` is None.
        data_list_key: list of the JSON to read.
        synthetic_n_per_modality: generated images per modality.
        synthetic_size: side of the generated images.
        synthetic_seed: seed of the generator.
        max_items: keep only the first ``max_items`` items (quick tests).
        modality: DEX modality of the items that declare none (e.g. a downstream task's datalist, for TD-Calib).
        image_only: keep only ``image`` and ``modality`` of every item, so that a downstream datalist's labels never
            enter pre-training (TD-Calib reads the task's images without labels).

    Items are read with :func:`dex_monai.data.load_datalist` (only path entries are resolved).
    """
    if datalist in (None, "", "None", "none"):
        if dataset_dir is None:
            raise ValueError("either `datalist` or `dataset_dir` must be given.")
        root = Path(dataset_dir)
        marker = root / "datalist.json"
        if is_rank0() and not marker.is_file():
            if root.is_dir() and any(root.iterdir()):
                raise ValueError(
                    f"{root} holds files but no datalist.json: give the datalist of these images (`datalist`), "
                    "or an empty / new `dataset_dir` for the generated set."
                )
            root.mkdir(parents=True, exist_ok=True)
            path = _generate_synthetic(root, synthetic_n_per_modality, synthetic_size, synthetic_seed)
            if path.resolve() != marker.resolve():
                marker.write_text(path.read_text())
            logger.info(f"generated the default multi-modality pre-training set in {root}.")
        barrier()
        datalist = marker
    datalist = Path(datalist)
    if not datalist.is_file():
        raise FileNotFoundError(f"datalist {datalist} does not exist.")
    base_dir = Path(dataset_dir) if dataset_dir not in (None, "") else datalist.parent
    from dex_monai.data import load_datalist

    items = load_datalist(datalist, key=data_list_key, base_dir=base_dir)
    if not items:
        raise ValueError(f"datalist {datalist} has no items under '{data_list_key}'.")
    if max_items is not None:
        items = items[: int(max_items)]
    if image_only:
        items = [{k: v for k, v in item.items() if k in ("image", "modality")} for item in items]
    if modality not in (None, "", "None", "none"):
        items = [{**item, "modality": item.get("modality") or modality} for item in items]
    return items


def pretrain_dataset(
    data: Sequence[Mapping[str, Any]],
    transform: Any = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    report_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> Any:
    """
    :class:`dex_monai.data.SliceDataset` of the datalist items (volumes cut into 2-D slices, kept in a persistent
    slice cache). Under ``torch.distributed`` with a ``cache_dir``, rank 0 fills the cache first and the other ranks
    then read it, so no slice is decoded twice.

    Args:
        data: datalist items, e.g. from :func:`load_pretrain_datalist`.
        transform: per-slice random transform, e.g. ``dex_monai.transforms.pretrain_2d_augment_transforms``.
        cache_dir: slice cache folder; None keeps slices in memory (every rank decodes its own).
        progress: progress bar while preparing.
        report_dir: with ``on_error="skip"``, the skipped units are listed in ``<report_dir>/failed.csv``
            (path, stage, reason) and logged.
        kwargs: other ``SliceDataset`` arguments (``slice_axis``, ``norm_config``, ``rules``, ``on_error``: ``"stop"``
            at the first unusable file, naming it, or ``"skip"`` it and report).
    """
    from dex_monai.data import SliceDataset
    from dex_monai.data.failures import FAILED_CSV, write_failures

    def build() -> Any:
        dataset = SliceDataset(data, transform=transform, cache_dir=cache_dir, progress=progress and is_rank0(), **kwargs)
        if dataset.failed and is_rank0():
            logger = logging.getLogger(__name__)
            logger.warning(f"{len(dataset.failed)} of {len(data)} datalist items skipped (on_error='skip'):")
            for path, reason in dataset.failed:
                logger.warning(f"  {path}: {reason}")
            if report_dir not in (None, ""):
                rows = [{"path": p, "stage": "prepare", "reason": r} for p, r in dataset.failed]
                logger.warning(f"  listed in {write_failures(rows, Path(report_dir) / FAILED_CSV)}")
        return dataset

    if not is_dist() or cache_dir is None:
        return build()
    dataset = build() if is_rank0() else None
    barrier()
    return dataset if dataset is not None else build()


# ----------------------------------------------------------------------------------------------
# bundle config snapshot
# ----------------------------------------------------------------------------------------------
def find_bundle_parser() -> Any | None:
    """
    The ``monai.bundle.ConfigParser`` that is resolving the running bundle config, found on the call stack,
    or None outside a bundle run. Handlers built from a bundle config use it to record the config they run.
    """
    from monai.bundle import ConfigParser

    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, ConfigParser):
                return candidate
            frame = frame.f_back
    finally:
        del frame
    return None


def _jsonable(value: Any, depth: int = 0) -> Any:
    """``value`` if it survives a JSON round trip as itself (numbers, strings, nested lists/dicts), else a marker."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if depth < 4 and isinstance(value, (list, tuple)) and len(value) <= 64:
        items = [_jsonable(v, depth + 1) for v in value]
        return items if all(v is not _SKIP for v in items) else _SKIP
    if depth < 4 and isinstance(value, Mapping) and len(value) <= 64:
        items = {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
        return items if all(v is not _SKIP for v in items.values()) else _SKIP
    return _SKIP


_SKIP = object()


def bundle_config_snapshot(parser: Any | None = None) -> tuple[dict, dict] | None:
    """
    The config of the running bundle: ``(raw, resolved)``.

    ``raw`` is the merged config content with the command-line overrides applied (``_meta_`` included), as
    MONAI's ``--tracking`` option records it; ``resolved`` maps every top-level id whose value has already been
    computed and is plain data (numbers, strings, paths, small lists) to that value, e.g. ``"lr": 0.00015``, and
    the plain arguments of top-level components, e.g. ``"network_def#hidden_size": 192``.

    Args:
        parser: the bundle's ``ConfigParser``; None looks for it on the call stack.

    Returns:
        None when no bundle parser is found.
    """
    parser = parser if parser is not None else find_bundle_parser()
    if parser is None:
        return None
    raw = json.loads(json.dumps(parser.get(), default=str))
    resolved: dict[str, Any] = {}
    content = getattr(parser.ref_resolver, "resolved_content", {})
    for key in raw:
        if key == parser.meta_key or key not in content:
            continue
        value = _jsonable(content[key])
        if value is not _SKIP:
            resolved[key] = value
    # plain arguments of top-level components (e.g. "network_def#hidden_size")
    for key, value in raw.items():
        if not isinstance(value, Mapping) or "_target_" not in value or key in resolved:
            continue
        for arg, arg_value in value.items():
            sub_id = f"{key}#{arg}"
            if str(arg).startswith("_"):
                continue
            if sub_id in content:
                arg_value = content[sub_id]
            elif isinstance(arg_value, str) and arg_value[:1] in ("@", "$", "%"):
                continue
            if arg_value is None or isinstance(arg_value, (bool, int, float, str)):
                resolved[sub_id] = _jsonable(arg_value)
    return raw, resolved


def flatten_params(params: Mapping[str, Any], max_len: int = 500) -> dict[str, str]:
    """Scalar and short list entries of a flat dict as strings, for MLflow parameters."""
    out = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            continue
        text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
        if len(text) <= max_len:
            out[str(key)] = text
        else:
            warnings.warn(f"parameter {key} is longer than {max_len} characters and is not logged as a parameter.")
    return out
