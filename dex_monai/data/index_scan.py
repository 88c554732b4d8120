"""Parallel scanning for the dataset index: the walk is cut into tasks that worker processes check.

The walk (in the main process, no file is opened) lists every folder's files once, leaving out hidden entries
and files already met under another path (same real path). Each folder then gives tasks:

- its files with a known non-DICOM image suffix (``.png``, ``.nii.gz``, ``.npz``...), in chunks of ``chunk_size``:
  each such file is an entry on its own;
- one task with all its other files (DICOM by suffix or magic, suffix-less, unsupported), so that every DICOM
  series of the folder is grouped by ``SeriesInstanceUID`` in one process and is never split across workers.

The tasks run in the same order with one worker (in process) or ``N`` worker processes (``Pool.imap`` returns
results in task order), and the index sorts what they return; the datalist is therefore the same for any
number of workers. Workers return only the small JSON-ready dicts of the entries, no headers nor pixels.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

from dex_monai.data.formats import IMAGE_SUFFIXES, is_dicom_file

__all__ = ["ScanTask", "plan_scan", "scan_tasks", "run_scan"]

#: ``(source, folder, file names)``: the files of ``folder`` (found under the scanned ``source``) one task checks.
ScanTask = tuple[str, str, list[str]]
#: what a task returns: ``(entries, rejected, labels)``.
TaskResult = tuple[list[dict], list[dict], list[dict]]

_SINGLE_FILE_SUFFIXES = tuple(s for s in IMAGE_SUFFIXES if not is_dicom_file("x" + s))


def plan_scan(sources: Sequence[str], seen: set[str]) -> tuple[list[ScanTask], list[str]]:
    """Walk ``sources`` (sorted, hidden entries skipped) into per-folder file lists; ``seen`` (real paths, updated)
    drops a file met twice. Returns the plan and the sources that do not exist."""
    plan: list[ScanTask] = []
    missing: list[str] = []
    for src in sources:
        if not os.path.exists(src):
            missing.append(src)
            continue
        if os.path.isfile(src):
            walk: Iterable[tuple[str, list[str], list[str]]] = [(os.path.dirname(src), [], [os.path.basename(src)])]
            root = os.path.dirname(src)
        else:
            walk, root = os.walk(src), src
        for folder, dirs, files in walk:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            kept = []
            real_folder = os.path.realpath(folder)
            for name in sorted(f for f in files if not f.startswith(".")):
                path = os.path.join(folder, name)  # its real path: the folder's, unless the file itself is a link
                real = os.path.realpath(path) if os.path.islink(path) else os.path.join(real_folder, name)
                if real not in seen:
                    seen.add(real)
                    kept.append(name)
            plan.append((root, folder, kept))
    return plan, missing


def scan_tasks(plan: Iterable[ScanTask], chunk_size: int = 16) -> Iterator[ScanTask]:
    """Cut each folder of ``plan`` into tasks: chunks of single-file images, then one task with the rest
    (DICOM files, whose series must be grouped together, and anything else)."""
    for source, folder, files in plan:
        single = [f for f in files if f.lower().endswith(_SINGLE_FILE_SUFFIXES)]
        rest = [f for f in files if not f.lower().endswith(_SINGLE_FILE_SUFFIXES)]
        for start in range(0, len(single), chunk_size):
            yield source, folder, single[start : start + chunk_size]
        if rest:
            yield source, folder, rest


_worker_scan: Callable[[ScanTask], TaskResult] | None = None


def _init_worker(scan: Callable[[ScanTask], TaskResult]) -> None:
    global _worker_scan
    _worker_scan = scan
    try:  # one thread per worker process: the workers are the parallelism
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


def _run_in_worker(task: ScanTask) -> tuple[int, TaskResult]:
    assert _worker_scan is not None
    return len(task[2]), _worker_scan(task)


def run_scan(
    scan: Callable[[ScanTask], TaskResult], tasks: Iterable[ScanTask], workers: int = 1
) -> Iterator[tuple[int, TaskResult]]:
    """``(number of files, scan(task))`` for every task, in task order; ``workers > 1`` runs ``scan`` in that many
    processes (``fork`` where the platform has it, else ``spawn``: then ``scan`` must be picklable)."""
    if workers <= 1:
        for task in tasks:
            yield len(task[2]), scan(task)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    gc.freeze()  # forked workers then neither scan nor copy the parent's objects in their garbage collections
    try:
        with ctx.Pool(workers, initializer=_init_worker, initargs=(scan,)) as pool:
            yield from pool.imap(_run_in_worker, tasks, chunksize=1)
    finally:
        gc.unfreeze()
