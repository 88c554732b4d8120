#!/usr/bin/env python
"""Dataset-index throughput: files/s with 1 and N worker processes, alternated in one run, and peak memory.

Builds an archive of ``--files`` files in a temporary folder by copying real images of the shared data
(``$DEX_SHARED_DATA``: BUSI PNGs, hippocampus NIfTI images and labels, ISBI EM PNGs, the PGBM-001 DICOM series)
as many times as needed (copies, not links: the index drops a file met twice under another path). The source
folder is only read. Then ``--repeats`` times: index the archive with 1 worker, then with ``--workers``
(order swapped every other repeat); prints each time, the medians and their ratio, and checks that every
datalist is the same JSON. ``--memory`` also runs the command line on half and on all of the archive in a
child process and prints its peak resident memory (``ru_maxrss``).

Usage::

    python scripts/benchmark_index.py [--files 6000] [--workers 2] [--repeats 3] [--header-only] [--memory]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FOLDERS = ("us/busi", "mr/hippocampus", "em/isbi2012", "mr/pgbm001_dicom")


def make_archive(data: Path, out: Path, n_files: int) -> int:
    """Copy whole folders of ``data`` (one DICOM series is never cut) into ``out/copyK/...`` until ``n_files``."""
    folders: list[tuple[Path, list[Path]]] = []
    for sub in FOLDERS:
        for folder, _, files in sorted(os.walk(data / sub)):
            names = sorted(f for f in files if not f.startswith("."))
            if names:
                folders.append((Path(folder), [Path(folder) / f for f in names]))
    copied, k = 0, 0
    while copied < n_files:
        for folder, files in folders:
            if copied >= n_files:
                break
            dest = out / f"copy{k}" / folder.relative_to(data)
            dest.mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copyfile(f, dest / f.name)  # contents only: the source's times and links are left alone
            copied += len(files)
        k += 1
    return copied


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds (user + system) of this process and of its ended child processes (the index workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def _time_index(archive: Path, rules, workers: int, check_pixels: bool) -> tuple[float, float, float, str]:
    """(wall seconds, CPU seconds of this process, CPU seconds of the workers, datalist JSON)."""
    from dex_monai.data import build_datalist

    own, children = _cpu_seconds()
    t0 = time.perf_counter()
    datalist = build_datalist([archive], rules=rules, check_pixels=check_pixels, progress=False, workers=workers)
    seconds = time.perf_counter() - t0
    own2, children2 = _cpu_seconds()
    return seconds, own2 - own, children2 - children, json.dumps(datalist, indent=2)


def _peak_rss_mb(archive: Path, out: Path, rules: Path, workers: int, header_only: bool) -> float:
    cmd = [sys.executable, "-m", "dex_monai.data.index", str(archive), "--out", str(out), "--rules", str(rules),
           "--quiet", "--workers", str(workers)] + (["--header-only"] if header_only else [])  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("DEX_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    p.add_argument("--files", type=int, default=6000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--header-only", action="store_true", help="read headers only (no pixel checks)")
    p.add_argument("--memory", action="store_true", help="also print the command line's peak memory")
    args = p.parse_args(argv)

    from dex_monai.data import ModalityRules

    rules_path = REPO / "configs" / "modality_rules_shared_data.yaml"
    rules = ModalityRules.load(rules_path)
    work = Path(tempfile.mkdtemp(prefix="dex-index-bench-"))
    try:
        n = make_archive(Path(args.data), work / "archive", args.files)
        times: dict[int, list[float]] = {1: [], args.workers: []}
        reference = None
        for r in range(args.repeats):
            for w in (1, args.workers) if r % 2 == 0 else (args.workers, 1):
                seconds, cpu_main, cpu_workers, text = _time_index(work / "archive", rules, w, not args.header_only)
                reference = reference or text
                if text != reference:
                    print(f"FAIL: the datalist with {w} worker(s) differs", file=sys.stderr)
                    return 1
                times[w].append(seconds)
                print(f"repeat {r}: {w} worker(s) {seconds:.2f} s, {n / seconds:.0f} files/s; CPU s: main "
                      f"{cpu_main:.2f}, workers {cpu_workers:.2f}", flush=True)  # fmt: skip
        med = {w: statistics.median(t) for w, t in times.items()}
        entries = json.loads(reference)["numTraining"]
        print(f"archive: {n} files ({entries} entries), pixel checks {'off' if args.header_only else 'on'}")
        for w, m in med.items():
            print(f"median {w} worker(s): {m:.2f} s, {n / m:.0f} files/s")
        print(f"speed-up {args.workers} workers / 1: {med[1] / med[args.workers]:.2f}x (datalists identical)")
        if args.memory:
            half = work / "half"
            n_half = make_archive(Path(args.data), half, n // 2)
            for count, folder in ((n_half, half), (n, work / "archive")):
                mb = _peak_rss_mb(folder, work / "memory.json", rules_path, args.workers, args.header_only)
                print(f"peak memory of the command on {count} files: {mb:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
