# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""NPZ stacks in the MedMNIST layout (``<split>_images`` / ``<split>_labels``), read without unpickling."""

from __future__ import annotations

import functools
import os
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from monai.data.image_reader import ImageReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from dex_monai.data.checks import ImageDecodeError
from dex_monai.data.formats import (
    INTENSITY_RANGE,
    STORED_DTYPE,
    _stack_images,
    is_colour_last,
)

__all__ = ["npz_array_info", "medmnist_splits", "NpzStackReader"]

_MEDMNIST_SPLITS = ("train", "val", "test")


def npz_array_info(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (shape, dtype name)}`` of the arrays in an ``.npz``, read from the member headers (no pixels)."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    with zipfile.ZipFile(path) as zf:
        for member in sorted(zf.namelist()):
            if not member.endswith(".npy"):
                continue
            with zf.open(member) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            out[member[: -len(".npy")]] = (tuple(int(s) for s in shape), np.dtype(dtype).name)
    return out


def medmnist_splits(keys: Sequence[str]) -> list[tuple[str, str | None]]:
    """``[(images_key, labels_key or None), ...]`` for the MedMNIST layout (``train_images``, ``train_labels``...)."""
    keys = set(keys)
    out = []
    for split in _MEDMNIST_SPLITS:
        img_key = f"{split}_images"
        if img_key in keys:
            lab_key = f"{split}_labels"
            out.append((img_key, lab_key if lab_key in keys else None))
    return out


@functools.lru_cache(maxsize=8)
def _npz_array(path: str, mtime_ns: int, size: int, key: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as z:
        if key not in z.files:
            raise ImageDecodeError(f"{path}: no array '{key}' in the npz (it has {sorted(z.files)}).")
        return np.asarray(z[key])


def _stack_is_colour(stack_shape: Sequence[int]) -> bool:
    """A stack ``[N, H, W, 3|4]`` holds 2-D colour images (MedMNIST RGB), ``[N, D, H, W]`` 3-D volumes."""
    return len(stack_shape) == 4 and is_colour_last(stack_shape[1:])


class NpzStackReader(ImageReader):
    """Reader of one image of an ``.npz`` array (the MedMNIST ``<split>_images`` layout), ``allow_pickle=False``.

    Args:
        key: the array in the npz; ``None`` picks the only array (or ``arr_0``).
        index: the image in the stack (first axis); ``None`` reads the array as one image.

    The decoded arrays are kept in a small per-process LRU cache (keyed on path, mtime and size),
    so that reading the images of a stack one by one does not decompress it each time.
    2-D images come out ``[X, Y]`` (axes swapped from numpy's ``[H, W]``, as Pillow images),
    colour ``[X, Y, 3]``; 3-D volumes ``[D, H, W]`` as stored.
    """

    def __init__(self, key: str | None = None, index: int | None = None) -> None:
        super().__init__()
        self.key = key
        self.index = index

    def verify_suffix(self, filename: Sequence[os.PathLike | str] | os.PathLike | str) -> bool:
        return all(os.fspath(f).lower().endswith(".npz") for f in ensure_tuple(filename))

    def read(self, data: Sequence[os.PathLike | str] | os.PathLike | str, **kwargs: Any):
        out = []
        for name in ensure_tuple(data):
            name = os.fspath(name)
            st = os.stat(name)
            key = self.key
            if key is None:
                keys = list(npz_array_info(name))
                key = keys[0] if len(keys) == 1 else ("arr_0" if "arr_0" in keys else None)
                if key is None:
                    raise ImageDecodeError(f"{name}: the npz holds several arrays {keys}; give `npz_key`.")
            try:
                stack = _npz_array(os.path.abspath(name), st.st_mtime_ns, st.st_size, key)
            except ImageDecodeError:
                raise
            except Exception as e:
                raise ImageDecodeError(f"{name}: cannot read array '{key}': {type(e).__name__}: {e}") from e
            out.append((name, key, stack))
        return out if len(out) > 1 else out[0]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        items = img if isinstance(img, list) else [img]
        arrays, metas = [], []
        for name, key, stack in items:
            if self.index is None:
                arr, colour = stack, is_colour_last(stack.shape)
            else:
                if not -len(stack) <= self.index < len(stack):
                    raise ImageDecodeError(f"{name}: index {self.index} out of range for '{key}' ({len(stack)} images).")
                arr, colour = stack[self.index], _stack_is_colour(stack.shape)
            spatial_nd = arr.ndim - (1 if colour else 0)
            if spatial_nd == 2:
                arr = np.swapaxes(arr, 0, 1)
            affine = np.eye(spatial_nd + 1)
            meta: dict[str, Any] = {
                MetaKeys.ORIGINAL_AFFINE: affine,
                MetaKeys.AFFINE: affine.copy(),
                MetaKeys.SPATIAL_SHAPE: np.asarray(arr.shape[:spatial_nd]),
                MetaKeys.SPACE: SpaceKeys.RAS,
                MetaKeys.ORIGINAL_CHANNEL_DIM: -1 if colour else float("nan"),
                "spacing": np.ones(spatial_nd),
                "npz_key": key,
                "npz_index": -1 if self.index is None else int(self.index),
                STORED_DTYPE: np.dtype(arr.dtype).name,
            }
            if arr.dtype in (np.uint8, np.uint16):
                meta[INTENSITY_RANGE] = [0.0, float(np.iinfo(arr.dtype).max)]
            arrays.append(np.ascontiguousarray(arr))
            metas.append(meta)
        return _stack_images(arrays, metas)
