# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Which runs a comparison takes: experiments, tags and run ids."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from dex_monai.tracking.store import COMPARISON_TAG, ComparisonError


def parse_tags(tags: Mapping[str, str] | Sequence[str] | None) -> dict[str, str]:
    """``{"k": "v"}`` from a mapping or from ``["k=v", ...]`` strings (the value may contain ``=``)."""
    if tags is None:
        return {}
    if isinstance(tags, Mapping):
        return {str(k): str(v) for k, v in tags.items()}
    out = {}
    for item in tags:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ComparisonError(f"tag filter {item!r} is not of the form key=value.")
        out[key.strip()] = value
    return out


def _tag_filter(tags: Mapping[str, str]) -> str:
    """MLflow filter string for the tags it can express (the others are checked afterwards)."""
    clauses = []
    for key, value in tags.items():
        if "`" in key:
            continue
        if "'" not in value:
            clauses.append(f"tags.`{key}` = '{value}'")
        elif '"' not in value:
            clauses.append(f'tags.`{key}` = "{value}"')
    return " and ".join(clauses)


def _all_experiment_ids(client: Any) -> list[str]:
    ids: list[str] = []
    token = None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        ids += [e.experiment_id for e in page]
        token = getattr(page, "token", None)
        if not token:
            return ids


def _describe_selection(experiments: Sequence[str], tags: Mapping[str, str], run_ids: Sequence[str]) -> str:
    parts = []
    if experiments:
        parts.append("experiments " + ", ".join(repr(e) for e in experiments))
    if tags:
        parts.append("tags " + ", ".join(f"{k}={v}" for k, v in tags.items()))
    if run_ids:
        parts.append("run ids " + ", ".join(run_ids))
    return "; ".join(parts) or "nothing"


def select_runs(
    client: Any,
    experiments: Sequence[str] = (),
    tags: Mapping[str, str] | Sequence[str] | None = None,
    run_ids: Sequence[str] = (),
    max_runs: int = 100,
    include_comparisons: bool = False,
) -> list[Any]:
    """
    The MLflow runs to compare.

    Runs given by id come first, in the given order; then the runs found by searching the named
    experiments (all experiments when only tags are given) for runs carrying all the tags, oldest
    first.  Deleted runs and, unless ``include_comparisons``, earlier comparison runs (tag
    :data:`COMPARISON_TAG`) are left out of the search.  Duplicates are dropped.

    Args:
        client: an ``mlflow.MlflowClient``.
        experiments: experiment names.
        tags: required tags, ``{"key": "value"}`` or ``["key=value"]`` (all must match).
        run_ids: run ids.
        max_runs: cap on the number of searched runs (a warning is printed when more matched).
        include_comparisons: keep comparison runs in search results.

    Raises:
        ComparisonError: unknown experiment or run id, or nothing matched.
    """
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    uri = getattr(client, "tracking_uri", "the tracking store")
    tag_map = parse_tags(tags)
    experiments = list(experiments)
    run_ids = [r for r in run_ids if r]
    if not experiments and not tag_map and not run_ids:
        raise ComparisonError("nothing to compare: give experiment names, --tag key=value filters or run ids.")
    runs: list[Any] = []
    for run_id in run_ids:
        try:
            runs.append(client.get_run(run_id))
        except MlflowException as e:
            raise ComparisonError(f"run {run_id} not found in the tracking store {uri}.") from e
    if experiments or tag_map:
        if experiments:
            exp_ids = []
            for name in experiments:
                exp = client.get_experiment_by_name(name)
                if exp is None or exp.lifecycle_stage != "active":
                    known = sorted(e.name for e in client.search_experiments(max_results=200))
                    raise ComparisonError(
                        f"unknown experiment {name!r} in the tracking store {uri}; known experiments: "
                        + (", ".join(repr(k) for k in known) or "none")
                    )
                exp_ids.append(exp.experiment_id)
        else:
            exp_ids = _all_experiment_ids(client)
        found: list[Any] = []
        token = None
        while exp_ids:
            page = client.search_runs(
                exp_ids,
                filter_string=_tag_filter(tag_map),
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=min(1000, max_runs + 1),
                order_by=["attributes.start_time ASC"],
                page_token=token,
            )
            for run in page:
                run_tags = run.data.tags
                if any(run_tags.get(k) != v for k, v in tag_map.items()):
                    continue
                if not include_comparisons and run_tags.get(COMPARISON_TAG) == "true":
                    continue
                found.append(run)
            token = getattr(page, "token", None)
            if not token or len(found) > max_runs:
                break
        if len(found) > max_runs:
            print(
                f"warning: more than {max_runs} runs matched; comparing the first {max_runs} (see --max-runs).",
                file=sys.stderr,
            )
            found = found[:max_runs]
        runs += found
    unique: dict[str, Any] = {}
    for run in runs:
        unique.setdefault(run.info.run_id, run)
    if not unique:
        raise ComparisonError(
            f"no runs matched {_describe_selection(experiments, tag_map, run_ids)} in the tracking store {uri}."
        )
    return list(unique.values())
