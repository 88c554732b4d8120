# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""The multi-seed transfer protocol: does a DEX encoder transfer better than a dense MAE of the same width and depth?

A *cell* is one (task, init, regime, evaluation, seed): ``regime`` ``all`` (every training label) or ``few``
(``few_per_class`` labelled images per class for classification, ``few_images`` images for segmentation, drawn per
seed); ``evaluation`` ``finetune`` (the whole network, :func:`~dex_monai.benchmark.transfer.finetune`) or ``probe``
(frozen encoder, light head, :func:`~dex_monai.benchmark.probe.probe`). For every seed each pre-training kind is run
once (:func:`~dex_monai.benchmark.transfer.pretrain`, images re-drawn with that seed) and diagnosed
(:mod:`~dex_monai.benchmark.diagnostics`). Evaluation splits are fixed by the base seed, identical for all seeds.

Resumable: each finished cell is written atomically to ``<out_dir>/cells/<key>.json`` and skipped when the run is
restarted with the same ``out_dir``; each pre-training's checkpoint ``pretrain_<kind>_seed<s>.pt`` is reused once its
diagnostics record exists. Every cell is one MLflow run tagged ``benchmark=transfer-protocol``, ``benchmark_id`` (kept
across restarts), ``task``, ``init``, ``regime``, ``evaluation``, ``seed``. The report
(:mod:`~dex_monai.benchmark.report`) is rendered from the stored cells at the end. This module only orchestrates.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from dex_monai.benchmark.presets import ProtocolConfig
from dex_monai.benchmark.tasks import TASKS, TaskData, collect_pretraining_pools, draw_images, task_images_2d

__all__ = ["CellStore", "cell_key", "few_label_indices", "run_protocol", "scaled_config"]

#: configuration fields that may change between a run and its restart without invalidating the stored cells
_RESTART_FREE = {"out_dir", "tracking_uri", "threads", "device", "seeds", "tasks", "inits", "regimes", "evaluations"}


def cell_key(task: str, init: str, regime: str, evaluation: str, seed: int) -> str:
    return f"{task}__{init}__{regime}__{evaluation}__s{seed}"


class CellStore:
    """One JSON file per finished cell under ``folder``, written atomically (temporary file, then ``os.replace``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> dict:
        return json.loads(self.path(key).read_text())

    def save(self, key: str, record: dict) -> None:
        tmp = self.folder / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(record, indent=1, default=float))
        os.replace(tmp, self.path(key))

    def records(self, prefix: str = "") -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.folder.glob(f"{prefix}*.json"))]


def few_label_indices(labels: torch.Tensor, kind: str, count: int, seed: int) -> np.ndarray:
    """Indices of the few-label training subset: ``count`` images of every class (classification; all of a class that
    has fewer) or ``count`` images (segmentation), drawn with ``seed``; sorted."""
    rng = np.random.default_rng(seed)
    if kind == "segmentation":
        return np.sort(rng.permutation(len(labels))[:count])
    y = labels.numpy().reshape(-1)
    picks = [rng.permutation(np.flatnonzero(y == c))[:count] for c in np.unique(y)]
    return np.sort(np.concatenate(picks))


def _subset(data: TaskData, idx: np.ndarray) -> TaskData:
    index = torch.as_tensor(idx, dtype=torch.long)
    modalities = [data.train_modalities[i] for i in idx] if data.train_modalities is not None else None
    return replace(data, train_x=data.train_x[index], train_y=data.train_y[index], train_modalities=modalities)


def scaled_config(cfg: ProtocolConfig, seed: int) -> ProtocolConfig:
    """``cfg`` for one seed; with ``base_lr_batch > 0`` the learning rates are base rates scaled by batch / base."""
    cfg = replace(cfg, seed=seed)
    if cfg.base_lr_batch > 0:
        cfg = replace(cfg, base_lr_batch=0, pretrain_lr=cfg.pretrain_lr * cfg.pretrain_batch / cfg.base_lr_batch,
                      finetune_lr=cfg.finetune_lr * cfg.finetune_batch / cfg.base_lr_batch,
                      probe_lr=cfg.probe_lr * cfg.finetune_batch / cfg.base_lr_batch)
    return cfg


def _open_mlflow(cfg: ProtocolConfig, out_dir: Path):
    if cfg.tracking_uri == "none":
        return None
    import mlflow
    from monai.utils import path_to_sqlite_uri

    mlflow.set_tracking_uri(cfg.tracking_uri or path_to_sqlite_uri(str((out_dir / "mlruns.db").resolve())))
    if mlflow.get_experiment_by_name(cfg.experiment) is None:
        mlflow.create_experiment(cfg.experiment, artifact_location=(out_dir / "mlartifacts").resolve().as_uri())
    mlflow.set_experiment(cfg.experiment)
    return mlflow


def _benchmark_id(cfg: ProtocolConfig, out_dir: Path) -> str:
    """The run's id, kept in ``out_dir/protocol.json``; a restart with different sizes in the same folder is refused."""
    state = out_dir / "protocol.json"
    settings = {k: v for k, v in asdict(cfg).items() if k not in _RESTART_FREE}
    settings = json.loads(json.dumps(settings, default=list))
    if state.is_file():
        saved = json.loads(state.read_text())
        changed = sorted(k for k in settings if saved["config"].get(k) != settings[k])
        if changed:
            raise ValueError(f"{out_dir} holds a protocol run with other settings ({', '.join(changed)}); "
                             "restart it with the same settings or give a new --out-dir")
        return saved["benchmark_id"]
    benchmark_id = uuid.uuid4().hex[:12]
    state.write_text(json.dumps({"benchmark_id": benchmark_id, "config": settings}, indent=1))
    return benchmark_id


def _pretrained(kind: str, seed: int, cfg: ProtocolConfig, pools, store: CellStore, mlflow, tags: dict,
                out_dir: Path) -> Path:
    """The checkpoint of pre-training ``kind`` with ``seed`` (reused when it and its diagnostics exist)."""
    from dex_monai.benchmark.diagnostics import encoder_diagnostics
    from dex_monai.benchmark.transfer import pretrain

    name = f"{kind}_seed{seed}"
    path, key = out_dir / f"pretrain_{name}.pt", f"diagnostics__{kind}__s{seed}"
    if path.is_file() and store.has(key):
        return path
    images, modalities = draw_images(pools, np.random.default_rng(seed), cfg.pretrain_images_per_modality)
    start, cpu = time.perf_counter(), time.process_time()
    model, path = pretrain(kind, images, cfg, mlflow, {**tags, "seed": str(seed)}, out_dir, modalities, name=name)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    encoder = model.encoder
    if encoder.m4oe_layers():
        encoder.set_m4oe_stage("gated")  # the expert stage would route by the (known) modality
    probe_images, probe_modalities = draw_images(pools, np.random.default_rng(seed + 10_000),
                                                 cfg.diagnostic_images_per_modality)
    diagnostics = encoder_diagnostics(encoder, probe_images, probe_modalities, cfg.num_experts, seed, cfg.device)
    store.save(key, {"kind": kind, "seed": seed, "pretrain_seconds": seconds, "pretrain_cpu_seconds": cpu_seconds, "images": len(images), **diagnostics})
    return path


def run_protocol(cfg: ProtocolConfig) -> dict:
    """Run (or resume) every cell of the protocol, then write the report; returns
    ``{"benchmark_id", "cells": [records], "report": {files and statistics}, "out_dir"}``."""
    from dex_monai.benchmark.probe import probe
    from dex_monai.benchmark.report import write_report
    from dex_monai.benchmark.transfer import INITS, finetune, pretrain

    unknown = [t for t in cfg.tasks if t not in TASKS] + [i for i in cfg.inits if i not in INITS]
    unknown += [r for r in cfg.regimes if r not in ("all", "few")] + [e for e in cfg.evaluations if e not in ("finetune", "probe")]
    if unknown:
        raise ValueError(f"unknown task/init/regime/evaluation {unknown}; tasks {sorted(TASKS)}, inits {sorted(INITS)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    root, out_dir = Path(cfg.data_root), Path(cfg.out_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist (give --data-root)")
    out_dir.mkdir(parents=True, exist_ok=True)
    benchmark_id = _benchmark_id(cfg, out_dir)
    tags = {"benchmark": "transfer-protocol", "benchmark_id": benchmark_id}
    store = CellStore(out_dir / "cells")
    mlflow = _open_mlflow(cfg, out_dir)
    pools = collect_pretraining_pools(root, cfg)
    modality_names = sorted(pools)
    datasets: dict[str, TaskData] = {}
    started = time.perf_counter()
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        cfg_s = scaled_config(cfg, seed)
        checkpoints: dict[str, Path] = {}
        for task_name in cfg.tasks:
            task = TASKS[task_name]
            for regime in cfg.regimes:
                for init in cfg.inits:
                    for evaluation in cfg.evaluations:
                        key = cell_key(task_name, init, regime, evaluation, seed)
                        if store.has(key):
                            continue
                        if task_name not in datasets:
                            datasets[task_name] = task.loader(root, cfg, np.random.default_rng(cfg.seed))
                        data = datasets[task_name]
                        if regime == "few":
                            count = cfg.few_images if data.kind == "segmentation" else cfg.few_per_class
                            data = _subset(data, few_label_indices(data.train_y, data.kind, count, seed))
                        kind = INITS[init][0]
                        checkpoint = None
                        if kind is not None:
                            if kind not in checkpoints:
                                checkpoints[kind] = _pretrained(kind, seed, cfg_s, pools, store, mlflow, tags, out_dir)
                            checkpoint = checkpoints[kind]
                        if init == "td_calib":  # UMD's TD-Calib: pre-training continued on the task's train images
                            calib = out_dir / f"pretrain_td_calib_{task_name}_{regime}_seed{seed}.pt"
                            if not calib.is_file():
                                images_2d = task_images_2d(data, cfg_s)
                                pretrain(kind, images_2d, cfg_s, mlflow, tags, out_dir, [data.modality] * len(images_2d),
                                         start_from=checkpoint, steps=cfg.td_calib_steps, name=calib.stem[len("pretrain_"):])
                            checkpoint = calib
                        cell_tags = {**tags, "regime": regime, "evaluation": evaluation, "seed": str(seed), "cell": key}
                        run = finetune if evaluation == "finetune" else probe
                        start, cpu = time.perf_counter(), time.process_time()
                        metrics = run(task, data, cfg_s, init, checkpoint, mlflow, cell_tags, modality_names, run_name=key)
                        store.save(key, {
                            "key": key, "task": task_name, "init": init, "regime": regime, "evaluation": evaluation,
                            "seed": seed, "modality": task.modality, "kind": data.kind, "spatial_dims": task.spatial_dims,
                            "metric": "auc" if data.kind == "classification" else "dice", "score": metrics["score"],
                            "train_size": len(data.train_x), "eval_size": len(data.eval_x),
                            "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                            "metrics": metrics,
                        })
    records = _cells(store, cfg)
    report = write_report(out_dir, first="dex", second="dense", inits=list(cfg.inits))
    result = {"benchmark_id": benchmark_id, "cells": records, "report": report, "out_dir": str(out_dir),
              "seconds_this_call": time.perf_counter() - started}
    if mlflow:
        with mlflow.start_run(run_name="protocol-summary", tags={**tags, "stage": "summary"}):
            mlflow.log_params({"tasks": ",".join(cfg.tasks), "inits": ",".join(cfg.inits), "seeds": cfg.seeds})
            for path in report["files"].values():
                mlflow.log_artifact(path)
        result["tracking_uri"] = mlflow.get_tracking_uri()
    return result


def _cells(store: CellStore, cfg: ProtocolConfig) -> list[dict]:
    """The stored records of the cells of ``cfg`` (a folder may hold more, from a larger earlier selection)."""
    keys = {cell_key(t, i, r, e, s) for t in cfg.tasks for i in cfg.inits for r in cfg.regimes for e in cfg.evaluations
            for s in range(cfg.seed, cfg.seed + cfg.seeds)}
    return [r for r in store.records() if r.get("key") in keys]
