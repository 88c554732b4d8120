"""Inputs that fail, recorded instead of sinking the run: a dataset that catches per-item failures, a collate function
that sets them aside, and the ``failed.csv`` report (path, stage, reason).

:class:`FailureTolerantDataset` is MONAI's ``Dataset`` whose ``__getitem__`` returns ``{FAILURE_KEY: {...}}`` for an
item whose loading or preprocessing raised; :func:`collate_skipping_failures` collates the other items as MONAI's
``list_data_collate`` does and passes the failures along under ``FAILURE_KEY``, so that an evaluator
(:class:`dex_monai.engines.TolerantEvaluator`) can record them and go on with the rest of the batch.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.data import Dataset, list_data_collate

from dex_monai.data.checks import ImageDecodeError, RejectedFile

__all__ = [
    "FAILURE_KEY",
    "FAILED_CSV",
    "describe_failure",
    "FailureTolerantDataset",
    "collate_skipping_failures",
    "write_failures",
    "failed_paths",
]

#: batch / item key under which failures travel
FAILURE_KEY = "__failures__"
#: name of the failure report written into the output folder
FAILED_CSV = "failed.csv"


def _root_cause(exc: BaseException) -> BaseException:
    """The :class:`RejectedFile` / decode error inside MONAI's "applying transform" wrappers, else the innermost."""
    seen = exc
    while True:
        if isinstance(seen, ImageDecodeError):
            return seen
        nxt = seen.__cause__ or seen.__context__
        if nxt is None or nxt is seen:
            return seen
        seen = nxt


def describe_failure(exc: BaseException, path: Any, stage: str | None = None) -> dict[str, str]:
    """``{"path", "stage", "reason"}`` of a failure: stage ``read`` for files that cannot be used (the reason is the
    checks' ``"<category>: <detail>"``), else ``stage`` (default ``preprocess``) with the innermost error."""
    cause = _root_cause(exc)
    path = "" if path is None else os.fspath(path) if isinstance(path, (str, os.PathLike)) else str(path)
    if isinstance(cause, RejectedFile):
        return {"path": path or str(cause.path or ""), "stage": "read", "reason": f"{cause.category}: {cause.detail}"}
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    if path and text.startswith(f"{path}: "):
        text = text[len(path) + 2 :]
    kind = "read" if isinstance(cause, ImageDecodeError) else (stage or "preprocess")
    return {"path": path, "stage": kind, "reason": f"{type(cause).__name__}: {text}"[:1000]}


class FailureTolerantDataset(Dataset):
    """MONAI ``Dataset`` that returns ``{FAILURE_KEY: describe_failure(...)}`` for an item whose transform raised.

    Args:
        data: the items.
        transform: loading and preprocessing (e.g. through :class:`dex_monai.transforms.LoadMultiModalImaged`).
        image_key: the item field naming the input, for the report.
    """

    def __init__(self, data: Sequence, transform: Callable | None = None, image_key: str = "image") -> None:
        super().__init__(data=data, transform=transform)
        self.image_key = image_key

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as e:
            item = self.data[index]
            path = item.get(self.image_key) if isinstance(item, Mapping) else item
            return {FAILURE_KEY: describe_failure(e, path)}


def collate_skipping_failures(batch: Sequence[Any]) -> dict:
    """``list_data_collate`` of the items that loaded, with the others' failure records under ``FAILURE_KEY``
    (an empty list when none failed); a batch in which everything failed is ``{FAILURE_KEY: [...]}`` alone."""
    failures = [item[FAILURE_KEY] for item in batch if isinstance(item, Mapping) and FAILURE_KEY in item]
    good = [item for item in batch if not (isinstance(item, Mapping) and FAILURE_KEY in item)]
    out = list_data_collate(good) if good else {}
    if not isinstance(out, dict):
        raise TypeError("collate_skipping_failures expects dictionary items.")
    out[FAILURE_KEY] = failures
    return out


def failed_paths(failures: Sequence[Mapping[str, str]]) -> set[str]:
    """The distinct inputs among failure records (a batch that failed at inference gives one record per input)."""
    return {record["path"] for record in failures}


def write_failures(failures: Sequence[Mapping[str, str]], path: str | os.PathLike) -> Path:
    """Write ``failures`` (``path, stage, reason``) as CSV, sorted by path; returns the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "stage", "reason"])
        for row in sorted(failures, key=lambda r: (r.get("path", ""), r.get("stage", ""))):
            writer.writerow([row.get("path", ""), row.get("stage", ""), row.get("reason", "")])
    return path
