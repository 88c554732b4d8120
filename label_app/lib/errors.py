# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Turning failures of a request into short, clear HTTP error messages."""

from __future__ import annotations

import gzip
import zlib
from typing import Iterator

_READ_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)
_READ_HINTS = ("LoadImage", "cannot find a suitable reader", "ImageFileError", "Could not create IO object")


def chain(e: BaseException) -> Iterator[BaseException]:
    """``e`` and the exceptions it was raised from, outermost first."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def describe(e: BaseException, limit: int = 600) -> str:
    """The innermost cause as ``Type: message`` (that is what names the real problem), shortened."""
    inner = list(chain(e))[-1]
    text = f"{type(inner).__name__}: {inner}".strip()
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_image_read_error(e: BaseException) -> bool:
    """Did the request fail while the image was being read (corrupt or unsupported file)?"""
    for x in chain(e):
        if isinstance(x, _READ_ERRORS) or type(x).__name__ == "ImageFileError":
            return True
        if any(h in str(x) for h in _READ_HINTS):
            return True
    return False
