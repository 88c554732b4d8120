"""Dataset index (MedVerse-style): scan folders of images into a MONAI (decathlon-style) datalist.

Command line::

    python -m dex_monai.data.index SRC [SRC ...] --out datalist.json \\
        [--rules RULES.yaml ...] [--rule "PATTERN=MODALITY" ...] [--relative] [--header-only] [--quiet] \\
        [--workers N]

For every usable image the ``training`` list gets its path, modality (with where it came from),
format, dimensionality, size, spacing, slice count and source folder. Headers are read, not pixels,
for the metadata; the pixels are then decoded once to reject what cannot be used (skip that with
``--header-only``). Files that cannot be used go to ``rejected`` with ``"<category>: <detail>"``
(categories: empty, corrupt, truncated, unreadable compression, constant, non-finite,
unsupported, unknown modality, no pixel data). Label / mask files go to ``label_files`` (and are
attached as ``label`` to their image when the layout pairs them). A modality summary is printed
at the end. The run exits non-zero only when nothing usable was found. Source files are only read.
The JSON is deterministic: re-running on the same folders gives the same file, whatever ``--workers`` (processes
that check the files, :mod:`dex_monai.data.index_scan`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from dex_monai.data.checks import (
    REJECT_CATEGORIES,
    RejectedFile,
    check_slice_positions,
    is_mosaic,
    slice_positions,
)
from dex_monai.data.checks import (
    check_pixels as check_pixel_values,
)
from dex_monai.data.datalist import LabelLookup, sibling_label_folders
from dex_monai.data.describe import (
    DESCRIBERS,
    describe_dicom_dtype,
    dicom_channels,
    dicom_pixels,
    is_volume_series,
    read_dicom,
    round_values,
)
from dex_monai.data.index_scan import ScanTask, plan_scan, run_scan, scan_tasks
from dex_monai.data.modality import (
    LABEL_DICOM_MODALITIES,
    MODALITIES,
    MODALITY_INDEX,
    ModalityRules,
    modality_from_dicom,
)
from dex_monai.data.readers import (
    dicom_pixel_spacing,
    image_format,
    mosaic_shape_and_spacing,
)

__all__ = ["REJECT_CATEGORIES", "RejectedFile", "build_datalist", "write_datalist", "format_summary", "main"]



class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


class _Indexer:
    """Walks the sources and fills ``entries``, ``rejected`` and ``labels``."""

    def __init__(self, rules: ModalityRules, check_pixels: bool, progress: bool) -> None:
        self.rules = rules
        self.check_pixels = check_pixels
        self.progress = progress
        self.entries: list[dict] = []
        self.rejected: list[dict] = []
        self.labels: list[dict] = []
        self._seen: set[str] = set()

    # -- bookkeeping -------------------------------------------------------------------------
    def _reject(self, path: str, source: str, err: RejectedFile, **extra: Any) -> None:
        self.rejected.append({"path": path, "reason": str(err), "category": err.category, "source": source, **extra})

    def _modality(self, path: str, source: str, tag: str | None) -> tuple[str, str]:
        found = modality_from_dicom(tag)
        if found is not None:
            return found, "dicom"
        rule = self.rules.match(path, root=source)
        if rule is not None:
            return rule.modality, "rule"
        what = f"DICOM Modality '{tag}' is not one of the ten" if tag else "no DICOM Modality tag"
        raise RejectedFile(
            "unknown modality", f"{what} and no modality rule matches; add one (--rule 'PATTERN=MODALITY' or --rules FILE)"
        )

    def _entry(self, path: str, source: str, fmt: str, modality: str, how: str, desc: dict) -> dict:
        entry: dict[str, Any] = {
            "image": path,
            "modality": modality,
            "modality_index": MODALITY_INDEX[modality],
            "modality_source": how,
            "format": fmt,
        }
        entry.update(desc)
        entry["source"] = source
        return entry

    # -- walking -----------------------------------------------------------------------------
    def walk(self, sources: Sequence[str], workers: int = 1) -> None:
        """Scan ``sources`` with ``workers`` processes (:mod:`dex_monai.data.index_scan`; same result for any number)."""
        from tqdm.auto import tqdm

        plan, missing = plan_scan(sources, self._seen)
        for src in missing:
            self._reject(src, src, RejectedFile("unsupported", "the source does not exist"))
        scanner = _Indexer(self.rules, self.check_pixels, progress=False)
        total = sum(len(files) for _, _, files in plan)
        with tqdm(total=total, desc="indexing", unit="file", disable=not self.progress, file=sys.stderr) as bar:
            for n_files, (entries, rejected, labels) in run_scan(scanner.scan_task, scan_tasks(plan), workers):
                self.entries.extend(entries)
                self.rejected.extend(rejected)
                self.labels.extend(labels)
                bar.update(n_files)

    def scan_task(self, task: ScanTask) -> tuple[list[dict], list[dict], list[dict]]:
        """Check the files of one task; returns (and forgets) its ``(entries, rejected, labels)``."""
        source, folder, files = task
        self._folder(source, folder, files, _NoBar())
        out = (self.entries, self.rejected, self.labels)
        self.entries, self.rejected, self.labels = [], [], []
        return out

    def _folder(self, source: str, folder: str, files: list[str], bar: Any) -> None:
        dicoms: list[str] = []
        for name in files:
            path = os.path.join(folder, name)
            fmt = image_format(path)
            if fmt == "dicom":
                dicoms.append(path)
                continue
            self._file(source, path, fmt)
            bar.update(1)
        if dicoms:
            self._dicom_folder(source, folder, dicoms, bar)

    def _file(self, source: str, path: str, fmt: str | None) -> None:
        try:
            if fmt is None:
                ext = os.path.splitext(path)[1] or os.path.basename(path)
                raise RejectedFile("unsupported", f"'{ext}' is not a supported image format")
            if os.path.getsize(path) == 0:
                raise RejectedFile("empty", "0 bytes")
            if self.rules.is_label(path, root=source):
                self.labels.append({"label": path, "format": fmt, "source": source})
                return
            descs = DESCRIBERS[fmt](path, self.check_pixels)  # the file's own problems come first
            rule = self.rules.match(path, root=source)
            if rule is None:
                self._modality(path, source, None)  # raises "unknown modality"
        except RejectedFile as e:
            self._reject(path, source, e)
            return
        for desc in descs:
            self.entries.append(self._entry(path, source, fmt, rule.modality, "rule", desc))

    def _dicom_folder(self, source: str, folder: str, files: list[str], bar: Any) -> None:
        groups: dict[str, list[tuple[str, Any]]] = defaultdict(list)
        for path in files:
            try:
                ds = read_dicom(path, pixels=False)
            except RejectedFile as e:
                self._reject(path, source, e)
                bar.update(1)
                continue
            modality_tag = str(ds.get("Modality", "") or "").strip().upper()
            if modality_tag in LABEL_DICOM_MODALITIES or self.rules.is_label(path, root=source):
                self.labels.append({"label": path, "format": "dicom", "source": source, "dicom_modality": modality_tag})
                bar.update(1)
                continue
            groups[str(ds.get("SeriesInstanceUID", "") or "")].append((path, ds))
        for uid in sorted(groups):
            members = sorted(groups[uid], key=lambda x: x[0])
            if is_volume_series(members):
                self._dicom_series(source, folder, uid, members)
                bar.update(len(members))
            else:
                for path, ds in members:
                    self._dicom_single(source, path, ds)
                    bar.update(1)

    def _dicom_common(self, ds: Any) -> dict:
        out = {
            "dicom_modality": str(ds.get("Modality", "") or ""),
            "transfer_syntax": str(getattr(ds.file_meta, "TransferSyntaxUID", "")),
            "photometric_interpretation": str(ds.get("PhotometricInterpretation", "") or ""),
        }
        units = str(ds.get("Units", "") or "")
        if units:
            out["units"] = units
        slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        if slope is not None or intercept is not None:  # stored values are rescaled on reading (HU for CT)
            out["rescale"] = [float(slope if slope is not None else 1.0), float(intercept or 0.0)]
        return out

    def _dicom_series(self, source: str, folder: str, uid: str, members: list[tuple[str, Any]]) -> None:
        first = members[0][1]
        tag = str(first.get("Modality", "") or "")
        try:
            modality, how = self._modality(members[0][0], source, tag)
            slice_spacing = check_slice_positions(slice_positions([ds for _, ds in members]))
            if self.check_pixels:
                lows, highs = [], []
                for path, _ in members:
                    try:
                        arr = dicom_pixels(path)
                        check_pixel_values(arr, constant_ok=True)  # constancy is judged over the whole series
                    except RejectedFile as e:
                        raise RejectedFile(e.category, f"{os.path.basename(path)}: {e.detail}") from e
                    lows.append(float(arr.min()))
                    highs.append(float(arr.max()))
                if min(lows) == max(highs):
                    raise RejectedFile("constant", f"all pixels of the series are {min(lows):g}")
        except RejectedFile as e:
            self._reject(folder, source, e, series_uid=uid, num_files=len(members))
            return
        px = dicom_pixel_spacing(first, default=(1.0, 1.0))
        desc = {
            "dim": 3,
            "size": [int(first.Columns), int(first.Rows), len(members)],
            "spacing": round_values([*px, slice_spacing]),
            "num_slices": len(members),
            "channels": dicom_channels(first),
            "dtype": describe_dicom_dtype(first),
            "series_uid": uid,
            "num_files": len(members),
            **self._dicom_common(first),
        }
        self.entries.append(self._entry(folder, source, "dicom-series", modality, how, desc))

    def _dicom_single(self, source: str, path: str, ds: Any) -> None:
        tag = str(ds.get("Modality", "") or "")
        try:
            modality, how = self._modality(path, source, tag)
            if self.check_pixels:
                check_pixel_values(dicom_pixels(path))
        except RejectedFile as e:
            self._reject(path, source, e)
            return
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        dim = 3 if frames > 1 else 2
        size = [int(ds.Columns), int(ds.Rows)] + ([frames] if dim == 3 else [])
        spacing = dicom_pixel_spacing(ds, default=None)
        if spacing is not None and dim == 3:
            spacing = spacing + [float(ds.get("SpacingBetweenSlices", 0) or ds.get("SliceThickness", 1) or 1)]
        extra: dict[str, Any] = {}
        if is_mosaic(ds):  # one 3-D volume tiled into the frame (Siemens fMRI / DWI)
            try:
                size, spacing = mosaic_shape_and_spacing(ds)
            except Exception as e:
                self._reject(path, source, RejectedFile("corrupt", f"unreadable Siemens mosaic header: {e}"))
                return
            dim, frames, extra = 3, size[2], {"mosaic": True}
        desc = {
            "dim": dim,
            "size": size,
            "spacing": round_values(spacing),
            "num_slices": frames,
            "channels": dicom_channels(ds),
            "dtype": describe_dicom_dtype(ds),
            "series_uid": str(ds.get("SeriesInstanceUID", "") or ""),
            **extra,
            **self._dicom_common(ds),
        }
        self.entries.append(self._entry(path, source, "dicom", modality, how, desc))

    # -- labels ------------------------------------------------------------------------------
    def pair_labels(self) -> None:
        """Attach ``label`` to images whose label sits in a sibling label folder (``imagesTr``/``labelsTr``...) under
        the same name (:class:`dex_monai.data.datalist.LabelLookup`, as the fine-tuning datalists pair them)."""
        by_folder: dict[str, dict[str, str]] = defaultdict(dict)
        for lab in self.labels:
            path = os.path.normpath(lab["label"])
            by_folder[os.path.dirname(path)][os.path.basename(path)] = path
        if not by_folder:
            return
        lookups = {folder: LabelLookup(labels) for folder, labels in by_folder.items()}
        for entry in self.entries:
            if entry["format"] in ("dicom-series", "npz"):
                continue
            folder, name = os.path.split(entry["image"])
            for label_folder in sibling_label_folders(folder):
                lookup = lookups.get(os.path.normpath(label_folder))
                label = None if lookup is None else lookup.find(name)
                if label is not None:
                    entry["label"] = label
                    break


def _summary(entries: list[dict], rejected: list[dict], labels: list[dict]) -> dict:
    per: dict[str, dict] = {}
    for m in MODALITIES:
        sel = [e for e in entries if e["modality"] == m]
        if not sel:
            continue
        per[m] = {
            "entries": len(sel),
            "images_2d": sum(e.get("num_images", 1) for e in sel if e["dim"] == 2),
            "volumes_3d": sum(e.get("num_images", 1) for e in sel if e["dim"] == 3),
            "slices": sum(int(e["num_slices"]) for e in sel),
            "formats": sorted({e["format"] for e in sel}),
        }
    return {
        "modalities": per,
        "entries": len(entries),
        "rejected": len(rejected),
        "rejected_by_category": dict(sorted(Counter(r["category"] for r in rejected).items())),
        "label_files": len(labels),
    }


def build_datalist(
    sources: Sequence[str | os.PathLike],
    rules: ModalityRules | str | os.PathLike | None = None,
    check_pixels: bool = True,
    progress: bool = True,
    relative_to: str | os.PathLike | None = None,
    name: str = "dex_monai datalist",
    exclude: Sequence[str | os.PathLike] = (),
    workers: int = 1,
) -> dict:
    """Scan ``sources`` (folders or files) into a decathlon-style datalist dict.

    Args:
        sources: folders (scanned recursively, hidden entries skipped) or single files.
        rules: modality rules (folder patterns) and label patterns, or a rules YAML path; DICOM tags come first.
        check_pixels: decode the pixels once to reject truncated / constant / NaN images.
        progress: show a tqdm progress bar on stderr.
        relative_to: write paths relative to this folder (e.g. the JSON's folder); absolute otherwise.
        name: the datalist ``name``.
        exclude: files to leave out (the command line leaves out its own output JSON, so that
            re-running into a scanned folder gives the same JSON).
        workers: processes that check the files (the datalist is the same for any number; a folder's DICOM
            files stay in one process so its series are grouped whole).

    Returns ``{"name", "description", "modalities", "sources", "numTraining", "training",
    "label_files", "rejected", "summary"}``; ``training`` entries are sorted, the dict is deterministic.
    """
    if rules is None:
        rules = ModalityRules()
    elif isinstance(rules, (str, os.PathLike)):
        rules = ModalityRules.load(rules)
    srcs = [os.path.abspath(os.fspath(s)) for s in sources]
    indexer = _Indexer(rules, check_pixels=check_pixels, progress=progress)
    indexer._seen.update(os.path.realpath(os.fspath(p)) for p in exclude)
    indexer.walk(srcs, workers=workers)
    indexer.pair_labels()
    order = {s: i for i, s in enumerate(srcs)}

    def sort_key(item: dict, key: str) -> tuple:
        return (order.get(item["source"], len(order)), item[key], item.get("series_uid", ""), item.get("npz_key", ""))

    entries = sorted(indexer.entries, key=lambda e: sort_key(e, "image"))
    rejected = sorted(indexer.rejected, key=lambda e: sort_key(e, "path"))
    labels = sorted(indexer.labels, key=lambda e: sort_key(e, "label"))
    if relative_to is not None:
        base = os.path.abspath(os.fspath(relative_to))

        def rel(p: str) -> str:
            return os.path.relpath(p, base)

        for e in entries:
            e["image"] = rel(e["image"])
            if "label" in e:
                e["label"] = rel(e["label"])
            e["source"] = rel(e["source"])
        for r in rejected:
            r["path"], r["source"] = rel(r["path"]), rel(r["source"])
        for lab in labels:
            lab["label"], lab["source"] = rel(lab["label"]), rel(lab["source"])
        srcs = [rel(s) for s in srcs]
    return {
        "name": name,
        "description": "multi-modality pre-training datalist written by dex_monai.data.index",
        "modalities": list(MODALITIES),
        "sources": srcs,
        "numTraining": len(entries),
        "training": entries,
        "label_files": labels,
        "rejected": rejected,
        "summary": _summary(entries, rejected, labels),
    }


def write_datalist(datalist: dict, out: str | os.PathLike) -> str:
    """Write ``datalist`` as JSON (atomically: a temporary file then a rename); returns the path."""
    out = os.path.abspath(os.fspath(out))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out), prefix=".datalist-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(datalist, f, indent=2)
            f.write("\n")
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return out


def format_summary(datalist: dict) -> str:
    """The per-modality summary table printed at the end of an index run."""
    s = datalist["summary"]
    head = f"{'modality':<12}{'entries':>9}{'2D images':>11}{'3D volumes':>12}{'slices':>10}  formats"
    lines = [head, "-" * (len(head) + 16)]
    tot = Counter()
    for m, row in s["modalities"].items():
        lines.append(
            f"{m:<12}{row['entries']:>9}{row['images_2d']:>11}{row['volumes_3d']:>12}{row['slices']:>10}  "
            + ",".join(row["formats"])
        )
        tot.update({k: row[k] for k in ("entries", "images_2d", "volumes_3d", "slices")})
    lines.append("-" * (len(head) + 16))
    lines.append(f"{'total':<12}{tot['entries']:>9}{tot['images_2d']:>11}{tot['volumes_3d']:>12}{tot['slices']:>10}")
    cats = ", ".join(f"{k} {v}" for k, v in s["rejected_by_category"].items())
    lines.append(f"rejected: {s['rejected']}" + (f" ({cats})" if cats else ""))
    lines.append(f"label files: {s['label_files']}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dex_monai.data.index",
        description="Scan folders of medical images into a MONAI datalist (decathlon-style JSON) for DEX pre-training.",
    )
    p.add_argument("sources", nargs="+", metavar="SRC", help="folders (scanned recursively) or files")
    p.add_argument("--out", required=True, help="output JSON path")
    p.add_argument("--rules", action="append", default=[], metavar="YAML", help="modality rules file (repeatable)")
    p.add_argument(
        "--rule", action="append", default=[], metavar="PATTERN=MODALITY", help="one modality rule (repeatable)"
    )
    p.add_argument("--relative", action="store_true", help="write paths relative to the output JSON's folder")
    p.add_argument("--header-only", action="store_true", help="read headers only (skip the pixel checks)")
    p.add_argument("--name", default="dex_monai datalist", help="datalist name")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    p.add_argument("--workers", type=int, default=1, help="processes that check files (same datalist for any number)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 when nothing usable was found)."""
    args = _parser().parse_args(argv)
    try:
        rules = ModalityRules.load(*args.rules) + ModalityRules.from_strings(args.rule)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    datalist = build_datalist(
        args.sources,
        rules=rules,
        check_pixels=not args.header_only,
        progress=not args.quiet,
        relative_to=os.path.dirname(os.path.abspath(args.out)) if args.relative else None,
        name=args.name,
        exclude=[args.out],
        workers=args.workers,
    )
    out = write_datalist(datalist, args.out)
    if not args.quiet:
        print(format_summary(datalist))
        print(f"datalist written to {out}")
    if datalist["numTraining"] == 0:
        print("error: no usable image found", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
