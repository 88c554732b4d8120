# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""The MLflow tracking store of a comparison: where it is (a URI, an SQLite file or a folder holding ``mlruns.db``)
and the client connected to it; the names the comparison shares."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

#: Experiment receiving the comparison runs.
DEFAULT_COMPARISON_EXPERIMENT = "dex-comparisons"


#: Output folder of the command line, relative to the working directory.
DEFAULT_OUT_DIR = os.path.join("eval", "comparison")


#: Tag (value ``"true"``) set on comparison runs; such runs are skipped when searching.
COMPARISON_TAG = "dex.comparison"


#: Tag of a comparison run: comma-separated ids of the compared runs.
COMPARED_RUN_IDS_TAG = "dex.compared_run_ids"


COMPARED_RUN_NAMES_TAG = "dex.compared_run_names"


ROUTING_ARTIFACT_DIR = "routing"


_ROUTING_RE = re.compile(r"expert_usage_epoch_(\d+)\.(json|png)$")


_SCHEMES_WITHOUT_SLASHES = ("databricks", "databricks-uc", "uc")


_MAX_TAG_CHARS = 7900


_CELL_CHARS = 48


_MISSING = "-"


class ComparisonError(RuntimeError):
    """Raised for problems the user can fix: unknown experiment, no runs matched, unreachable store."""


def _sqlite_db_path(uri: str) -> Path | None:
    """Database file of an ``sqlite:///...`` URI (``None`` for in-memory databases)."""
    rest = uri.split(":", 1)[1]
    if not rest.startswith("///"):
        return None
    rest = unquote(rest[3:].split("?", 1)[0])
    return Path(rest) if rest else None


def _path_to_sqlite_uri(path: str | os.PathLike) -> str:
    """
    Same result as ``monai.utils.path_to_sqlite_uri`` (absolute POSIX path, percent-encoded), without
    importing MONAI (and PyTorch), which would slow the command line down by seconds.
    """
    return f"sqlite:///{quote(Path(path).absolute().as_posix(), safe='/:')}"


def resolve_tracking_uri(tracking_uri: str | os.PathLike | None = None, cwd: str | os.PathLike | None = None) -> str:
    """
    Turns the user's ``--tracking-uri`` into a URI MLflow accepts, checking local stores exist.

    Args:
        tracking_uri: a URI (``sqlite:///...``, ``http(s)://...``, ``databricks``...), or a plain path to
            an SQLite database file, or to a folder holding ``mlruns.db``.  ``None`` or ``""`` picks
            ``$MLFLOW_TRACKING_URI``, else ``<cwd>/eval/mlruns.db``, else ``<cwd>/mlruns.db``.
        cwd: base folder of the defaults (default: the working directory).

    Raises:
        ComparisonError: file store URIs (unsupported by MLflow 3), missing database files, no default
            store found.
    """
    base = Path(cwd) if cwd is not None else Path.cwd()
    if tracking_uri is None or str(tracking_uri) == "":
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if env:
            return resolve_tracking_uri(env, cwd=base)
        candidates = [base / "eval" / "mlruns.db", base / "mlruns.db"]
        for candidate in candidates:
            if candidate.is_file():
                return _path_to_sqlite_uri(candidate)
        raise ComparisonError(
            "no tracking store given and none found: looked for "
            + " and ".join(str(c) for c in candidates)
            + "; pass --tracking-uri (a URI or the path of an mlruns.db file)."
        )
    uri = str(tracking_uri)
    if "://" in uri or uri.split(":", 1)[0] in _SCHEMES_WITHOUT_SLASHES:
        scheme = uri.split(":", 1)[0].lower()
        if scheme == "file":
            raise ComparisonError(
                f"tracking store {uri}: MLflow 3 no longer supports the file store; use an SQLite "
                "database (sqlite:///<path>/mlruns.db) or a tracking server URI."
            )
        if scheme.startswith("sqlite"):
            db = _sqlite_db_path(uri)
            if db is not None and not db.is_file():
                raise ComparisonError(f"tracking store {uri} is unreachable: database file {db} does not exist.")
        return uri
    path = Path(uri).expanduser()
    if not path.is_absolute():
        path = base / path
    if path.is_dir():
        if (path / "mlruns.db").is_file():
            path = path / "mlruns.db"
        else:
            raise ComparisonError(
                f"tracking store {uri}: {path} is a folder without mlruns.db (the MLflow file store is no "
                "longer supported; point to an SQLite .db file or a server URI)."
            )
    if not path.is_file():
        raise ComparisonError(f"tracking store {uri} is unreachable: no such database file {path}.")
    return _path_to_sqlite_uri(path)


def connect(tracking_uri: str) -> Any:
    """
    An ``mlflow.MlflowClient`` for ``tracking_uri`` after a first request that proves the store answers.

    Raises:
        ComparisonError: the store cannot be reached or read (the message names the URI).
    """
    import mlflow

    try:
        client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        client.search_experiments(max_results=1)
    except Exception as e:  # connection refused, bad database, unknown scheme...
        raise ComparisonError(f"cannot reach the MLflow tracking store {tracking_uri}: {type(e).__name__}: {e}") from e
    return client
