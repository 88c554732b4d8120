"""Datalists, in one place: JSON datalists, folders and file lists, image/label pairing, splits.

Every entry point reads its items here: the pre-training bundle and the index's JSON (:func:`load_datalist`), the
fine-tuning bundles (:func:`segmentation_datalist`, :func:`classification_datalist`), inference
(:func:`inference_datalist`); where predictions go is :mod:`dex_monai.data.outputs`. What counts as an image or a DICOM
series folder is the readers' knowledge (:func:`dex_monai.data.readers.image_format`,
:func:`~dex_monai.data.readers.is_dicom_series_folder`).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dex_monai.data.outputs import OUTPUT_PATH_KEY, check_output_dir, plan_outputs, prediction_ext
from dex_monai.data.readers import IMAGE_SUFFIXES, image_format, image_stem, is_dicom_series_folder

__all__ = [
    "DEFAULT_EXCLUDE",
    "INPUT_SUFFIXES",
    "ITEM_KEYS",
    "OUTPUT_PATH_KEY",
    "load_datalist",
    "list_images",
    "LABEL_FOLDERS",
    "LabelLookup",
    "sibling_label_folders",
    "split_items",
    "segmentation_datalist",
    "classification_datalist",
    "inference_datalist",
    "prediction_ext",
    "check_output_dir",
    "plan_outputs",
]

logger = logging.getLogger(__name__)

#: file endings taken as one image each when folders are listed (npz stacks hold many: index them instead)
INPUT_SUFFIXES = tuple(s for s in IMAGE_SUFFIXES if s != ".npz")

#: names never taken as images: masks stored next to images (e.g. BUSI ``benign (1)_mask.png``)
DEFAULT_EXCLUDE = ("*_mask.*", "*_mask_*.*")

_PATH_KEYS = ("image", "label", "source")
#: the fields of a datalist item that the bundles read (the index's JSON has many more, some not collatable)
ITEM_KEYS = ("image", "label", "modality", "series_uid", "npz_key", "npz_index")
_NONE = (None, "", "None", "none")


# ----------------------------------------------------------------------------------------------
# JSON datalists
# ----------------------------------------------------------------------------------------------
def _is_path_value(key: str, value: str) -> bool:
    # a classification label is a class name, not a file: only strings that look like images are paths
    return key != "label" or image_stem(value) != os.path.basename(value) or os.path.isdir(value)


def load_datalist(
    path: str | os.PathLike,
    key: str = "training",
    base_dir: str | os.PathLike | None = None,
    missing_ok: bool = False,
) -> list[dict] | None:
    """Read the ``key`` list of a (decathlon-style) datalist JSON, e.g. the one ``python -m dex_monai.data.index``
    writes, with relative paths made absolute.

    Only the path fields (``image``, ``source``, and ``label`` when it names an image file) are resolved against
    ``base_dir`` (default: the JSON's folder); other fields such as ``modality`` or a class name are kept as
    written (MONAI's ``load_decathlon_datalist`` would turn any value naming an existing file into a path).
    Plain strings in the list are taken as ``{"image": ...}``.

    Returns None when ``missing_ok`` and the JSON has no ``key`` list.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist {path} does not exist.")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not a valid JSON datalist: {e}") from e
    if key not in content:
        if missing_ok:
            return None
        raise ValueError(f"{path}: no '{key}' list in the datalist (keys: {sorted(content)}).")
    base = path.resolve().parent if base_dir in _NONE else Path(os.path.abspath(os.fspath(base_dir)))
    items = []
    for entry in content[key]:
        item = dict(entry) if isinstance(entry, Mapping) else {"image": entry}
        for k in _PATH_KEYS:
            v = item.get(k)
            if isinstance(v, str) and v and not os.path.isabs(v) and _is_path_value(k, v):
                item[k] = os.path.normpath(os.path.join(base, v))
        items.append(item)
    return items


def _keep_item_keys(items: Sequence[Mapping]) -> list[dict]:
    return [{k: item[k] for k in ITEM_KEYS if item.get(k) is not None} for item in items]


def _cap(items: list, max_items: int | None) -> list:
    return items if max_items in (None, "", 0) else items[: int(max_items)]


# ----------------------------------------------------------------------------------------------
# folders
# ----------------------------------------------------------------------------------------------
def _excluded(name: str, exclude: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(name.lower(), pattern.lower()) for pattern in exclude)


def _is_input_file(path: Path, suffixes: Sequence[str]) -> bool:
    if not path.is_file() or path.name.startswith("."):
        return False
    if path.name.lower().endswith(tuple(suffixes)):
        return True
    return "." not in path.name and image_format(path) == "dicom"  # suffix-less DICOM (UID-like names)


def list_images(
    folder: str | os.PathLike,
    suffixes: Sequence[str] = INPUT_SUFFIXES,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    recursive: bool = False,
    dicom_series: bool = False,
    skip: Sequence[str | os.PathLike] = (),
) -> list[Path]:
    """Image files under ``folder``, sorted; with ``dicom_series`` a folder holding DICOM files is one image (a
    series) and its files are not listed one by one. ``skip`` folders (e.g. an output folder) are left out."""
    skipped = {Path(s).resolve() for s in skip}
    found: list[Path] = []
    for entry in sorted(Path(folder).iterdir()):
        if entry.name.startswith(".") or entry.resolve() in skipped:
            continue
        if entry.is_dir():
            if dicom_series and is_dicom_series_folder(entry):
                found.append(entry)
            elif recursive:
                found += list_images(entry, suffixes, exclude, recursive, dicom_series, skip)
        elif _is_input_file(entry, suffixes) and not _excluded(entry.name, exclude):
            found.append(entry)
    return found


# ----------------------------------------------------------------------------------------------
# image / label pairing
# ----------------------------------------------------------------------------------------------
#: label folders that sit beside an image folder, by the image folder's name (MSD ``imagesTr``/``labelsTr``...)
LABEL_FOLDERS = {
    "imagestr": ("labelsTr",),
    "imagests": ("labelsTs",),
    "images": ("labels", "masks"),
    "image": ("label", "labels", "mask", "masks"),
    "imgs": ("labels", "masks"),
}


def sibling_label_folders(image_folder: str | os.PathLike) -> list[str]:
    """The label folders that pair with ``image_folder`` by name (:data:`LABEL_FOLDERS`), whether they exist or not."""
    parent, leaf = os.path.split(os.path.normpath(os.fspath(image_folder)))
    return [os.path.join(parent, name) for name in LABEL_FOLDERS.get(leaf.lower(), ())]


class LabelLookup:
    """The labels of one label folder (``{file name: label}``), indexed once, and the rule that pairs an image with
    its label: the same file name, else the image's stem followed by ``label_suffix`` with any image ending (the
    first label in name order wins a shared stem)."""

    def __init__(self, labels: Mapping[str, Any]) -> None:
        self.by_name = dict(labels)
        self.by_stem: dict[str, Any] = {}
        for name in sorted(self.by_name):
            self.by_stem.setdefault(image_stem(name), self.by_name[name])

    def find(self, image_name: str, label_suffix: str = "") -> Any | None:
        """The label of ``image_name``, or None."""
        if image_name in self.by_name:
            return self.by_name[image_name]
        return self.by_stem.get(image_stem(image_name) + label_suffix)


# ----------------------------------------------------------------------------------------------
# splits
# ----------------------------------------------------------------------------------------------
def split_items(
    items: Sequence[Any], split: str = "training", val_fraction: float = 0.2, seed: int = 0, key: Any = None
) -> list[Any]:
    """
    Deterministic training / validation split: items are shuffled with ``seed`` (within each group of ``key(item)``
    when given, i.e. stratified) and ``round(val_fraction * n)`` of each group (at least one when the group has two
    or more items and ``val_fraction > 0``) go to validation. ``split`` is ``"training"``, ``"validation"`` or
    ``"all"``. Both lists keep the input order.
    """
    if split == "all":
        return list(items)
    if split not in ("training", "validation"):
        raise ValueError(f"split must be 'training', 'validation' or 'all', got {split!r}.")
    groups: dict[Any, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item) if key is not None else None, []).append(i)
    rng = random.Random(seed)
    val: set[int] = set()
    for name in sorted(groups, key=str):
        idx = list(groups[name])
        rng.shuffle(idx)
        n_val = int(round(val_fraction * len(idx)))
        if val_fraction > 0 and n_val == 0 and len(idx) > 1:
            n_val = 1
        val.update(idx[:n_val])
    return [items[i] for i in range(len(items)) if (i in val) == (split == "validation")]


def _json_lists(
    datalist: str | os.PathLike, dataset_dir: Any, train_key: str, val_key: str
) -> tuple[list[dict], list[dict] | None]:
    """The training and (None when absent) validation lists of a JSON datalist, with the fields the bundles read."""
    train = load_datalist(datalist, train_key, dataset_dir, missing_ok=True) or []
    val = load_datalist(datalist, val_key, dataset_dir, missing_ok=True)
    return _keep_item_keys(train), None if val is None else _keep_item_keys(val)


def _choose_split(
    train: list[dict], val: list[dict] | None, split: str, val_fraction: float, seed: int, key: Any = None
) -> list[dict]:
    """``split`` of a JSON datalist: its own validation list when it has one, else a split of its training list."""
    if val is None:
        return split_items(train, split, val_fraction, seed, key=key)
    return {"training": train, "validation": val, "all": train + val}[split]


# ----------------------------------------------------------------------------------------------
# task datalists
# ----------------------------------------------------------------------------------------------
def segmentation_datalist(
    dataset_dir: str | os.PathLike | None = None,
    datalist: str | os.PathLike | None = None,
    split: str = "training",
    image_dir: str = "imagesTr",
    label_dir: str = "labelsTr",
    label_suffix: str = "",
    extensions: Sequence[str] = INPUT_SUFFIXES,
    dicom_series: bool = False,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_items: int | None = None,
    train_key: str = "training",
    val_key: str = "validation",
) -> list[dict]:
    """
    ``[{"image": path, "label": path}, ...]`` of one split of a segmentation data set.

    Either a decathlon-style ``datalist`` JSON (``{"training": [...], "validation": [...]}``, relative paths against
    ``dataset_dir`` or the JSON's folder; without a validation list the training list is split; the index's JSON
    works too, its items without ``label`` are left out), or the folders ``<dataset_dir>/<image_dir>`` and
    ``<dataset_dir>/<label_dir>`` (the MSD layout ``imagesTr``/``labelsTr``, or e.g. ``image``/``label``) whose files
    are paired by name: the label has the image's file name, or its stem followed by ``label_suffix`` and any image
    extension. Images without a label are left out with a warning.

    Args:
        split: ``"training"``, ``"validation"`` or ``"all"``.
        dicom_series: take sub-folders of DICOM files in ``image_dir`` as one (3D) image each.
        val_fraction, seed: the split (:func:`split_items`).
        max_items: keep the first ``max_items`` of the split (quick runs).
    """
    if datalist not in _NONE:
        train, val = _json_lists(datalist, dataset_dir, train_key, val_key)
        unlabelled = [i["image"] for i in train + (val or []) if not i.get("label")]
        if unlabelled:
            logger.warning(f"{len(unlabelled)} items of {datalist} have no label and are left out: {unlabelled[:5]}")
        train = [i for i in train if i.get("label")]
        val = None if val is None else [i for i in val if i.get("label")]
        return _cap(_choose_split(train, val, split, val_fraction, seed), max_items)
    if dataset_dir in (None, ""):
        raise ValueError("either `datalist` or `dataset_dir` must be given.")
    root = Path(dataset_dir)
    images_root, labels_root = root / image_dir, root / label_dir
    for folder in (images_root, labels_root):
        if not folder.is_dir():
            raise FileNotFoundError(f"segmentation data folder {folder} does not exist.")
    labels = LabelLookup(
        {path.name: path for path in list_images(labels_root, extensions, exclude=(), dicom_series=dicom_series)}
    )
    items, unpaired = [], []
    for image in list_images(images_root, extensions, exclude=(), dicom_series=dicom_series):
        label = labels.find(image.name, label_suffix)
        if label is None:
            unpaired.append(image.name)
            continue
        items.append({"image": str(image), "label": str(label)})
    if unpaired:
        logger.warning(f"{len(unpaired)} images in {images_root} have no label and are left out: {unpaired[:5]}")
    if not items:
        raise ValueError(f"no image/label pairs found in {images_root} and {labels_root}.")
    return _cap(split_items(items, split, val_fraction, seed), max_items)


def classification_datalist(
    dataset_dir: str | os.PathLike | None = None,
    datalist: str | os.PathLike | None = None,
    split: str = "training",
    class_names: Sequence[str] | None = None,
    extensions: Sequence[str] = INPUT_SUFFIXES,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_items: int | None = None,
    max_per_class: int | None = None,
    train_key: str = "training",
    val_key: str = "validation",
) -> list[dict]:
    """
    ``[{"image": path, "label": class_index}, ...]`` of one split of a classification data set.

    Either a ``datalist`` JSON whose items have ``image`` and ``label`` (an index or a class name), or class folders
    ``<dataset_dir>/<class>/<images>`` (BUSI layout), searched recursively; files matching ``exclude`` (segmentation
    masks such as ``*_mask.png``) are skipped. Class indices follow ``class_names`` (default: sorted folder names).
    The split is stratified by class.

    Args:
        max_per_class: keep at most this many images of each class before splitting (quick runs).
    """
    if datalist not in _NONE:
        train, val = _json_lists(datalist, dataset_dir, train_key, val_key)
        names = list(class_names) if class_names else None
        for item in train + (val or []):
            if isinstance(item.get("label"), str):
                if not names or item["label"] not in names:
                    raise ValueError(f"label {item['label']!r} of {item['image']} is not one of class_names={names}.")
                item["label"] = names.index(item["label"])
            item["label"] = int(item["label"])
        return _cap(_choose_split(train, val, split, val_fraction, seed, key=lambda x: x["label"]), max_items)
    if dataset_dir in (None, ""):
        raise ValueError("either `datalist` or `dataset_dir` must be given.")
    root = Path(dataset_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"classification data folder {root} does not exist.")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = list(class_names) if class_names else folders
    missing = [n for n in names if n not in folders]
    if missing:
        raise FileNotFoundError(f"class folders {missing} not found in {root} (found {folders}).")
    items = []
    for index, name in enumerate(names):
        files = list_images(root / name, extensions, exclude, recursive=True)
        if not files:
            raise ValueError(f"class folder {root / name} holds no images.")
        if max_per_class not in (None, "", 0):
            files = files[: int(max_per_class)]
        items += [{"image": str(f), "label": index} for f in files]
    return _cap(split_items(items, split, val_fraction, seed, key=lambda x: x["label"]), max_items)


def inference_datalist(
    input_dir: str | os.PathLike | None = None,
    datalist: str | os.PathLike | None = None,
    files: Sequence[str] | None = None,
    extensions: Sequence[str] = INPUT_SUFFIXES,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    recursive: bool = True,
    dicom_series: bool = False,
    output_dir: str | os.PathLike | None = None,
    data_list_key: str = "testing",
) -> list[dict]:
    """
    ``[{"image": path}, ...]`` to predict: explicit ``files`` (files, or DICOM series folders); a JSON datalist (its
    ``data_list_key`` list, or ``training`` when absent, e.g. the index's JSON); or every image under ``input_dir``
    (recursively, DICOM series folders as one volume when ``dicom_series``), leaving out ``output_dir`` when it lies
    inside ``input_dir``. Items keep the fields a JSON datalist gives (``series_uid``, ``npz_index``...).
    """
    if files:
        items = [{"image": os.path.abspath(os.fspath(f))} for f in files]
    elif datalist not in _NONE:
        items = load_datalist(datalist, data_list_key, input_dir if input_dir not in _NONE else None, missing_ok=True)
        if items is None:
            items = load_datalist(datalist, "training", input_dir if input_dir not in _NONE else None)
        items = [{k: v for k, v in item.items() if k != "label"} for item in _keep_item_keys(items or [])]
    elif input_dir not in (None, ""):
        root = Path(input_dir)
        if root.is_file() or (dicom_series and is_dicom_series_folder(root)):
            paths = [root]
        elif root.is_dir():
            paths = list_images(root, extensions, exclude, recursive, dicom_series, skip=[output_dir] if output_dir else [])
        else:
            raise FileNotFoundError(f"inference input {root} does not exist.")
        items = [{"image": str(p.resolve())} for p in paths]
    else:
        raise ValueError("give `input_dir`, `datalist` or `files` to run inference on.")
    if not items:
        raise ValueError(f"no images to run inference on in {input_dir or datalist}.")
    return items
