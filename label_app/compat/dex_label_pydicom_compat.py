"""Lets pydicom-seg 0.4.1 import under pydicom 3 (installed into .venv-label only).

MONAI Label 0.8.5 imports ``pydicom_seg`` when its server starts, and pydicom-seg 0.4.1 imports
``pydicom._storage_sopclass_uids``, a private module that pydicom 3 removed (its UIDs now live in
``pydicom.uid``).  The project needs pydicom 3, so instead of downgrading pydicom this module, loaded
at interpreter start by ``dex_label_pydicom_compat.pth``, answers that one import with a module
holding the UIDs of ``pydicom.uid``.  It only takes part when no real module of that name exists
(it sits at the end of ``sys.meta_path``) and does not import pydicom before someone asks for it.

scripts/setup_label_env.sh copies this file and the .pth into the label environment's site-packages.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_MODULE = "pydicom._storage_sopclass_uids"


class _StorageUidAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != _MODULE:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module):
        from pydicom import uid

        for name, value in vars(uid).items():
            if isinstance(value, uid.UID):
                setattr(module, name, value)


if not any(isinstance(f, _StorageUidAlias) for f in sys.meta_path):
    sys.meta_path.append(_StorageUidAlias())
