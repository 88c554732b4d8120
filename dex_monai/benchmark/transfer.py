"""Transfer benchmark: does a DEX encoder transfer better than a monolithic MAE on multi-modality data?

Protocol (the paper's, at a size a laptop can run and a GPU can scale):

1. pre-train on the same multi-modality 2D images, for the same steps and seed: ``dex`` (DEX MAE) and ``dense``
   (an MAE of the same width and depth with plain MLPs); ``none`` is no pre-training;
2. fine-tune each initialisation on every downstream task (2D and 3D, segmentation and classification, several
   modalities) with AdamW, warm-up and cosine decay, Dice + cross-entropy or cross-entropy; evaluate on held-out data;
3. measure emergent modularity: per layer which experts each modality uses, the normalised mutual information
   between modality and expert choice, and for every encoder a linear probe's modality accuracy on its features.

Training goes through the shipped engines, as the bundles do: pre-training through
:class:`~dex_monai.engines.DEXPretrainTrainer` with the bundle's schedule handlers (GEMA momentum, router noise) and
warm-up + cosine learning rate; fine-tuning through MONAI's ``SupervisedTrainer`` (with UMD's GM-Coord handler when
asked). This module only orchestrates. Every pre-training and fine-tuning run is logged to one MLflow experiment
(:class:`~dex_monai.handlers.DEXMLFlowHandler`); a summary run holds the table (markdown, CSV) and the figures. 2D
encoders initialise 3D tasks through :func:`~dex_monai.networks.kernel.adapt_patch_kernel` (inflated along the slicing
axis).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dex_monai.benchmark.config import BenchmarkConfig
from dex_monai.benchmark.tasks import (
    TASKS,
    Task,
    TaskData,
    collect_pretraining_pools,
    draw_images,
    task_images_2d,
)
from dex_monai.networks import (
    DEXUNETR,
    DEXClassifier,
    DEXMaskedAutoEncoder,
    UniMed,
    UniMedTaskView,
    load_encoder_weights,
)

__all__ = ["BenchmarkConfig", "INITS", "Task", "TASKS", "run_transfer_benchmark"]


#: initialisation name -> (pre-training kind or None, fine-tuning encoder settings)
INITS: dict[str, tuple[str | None, dict]] = {
    "dex": ("dex", {"mode": None}),  # fine-tuned through BenchmarkConfig.dex_finetune_mode
    "dex_director": ("dex", {"mode": "director"}),
    "dense": ("dense", {"dense": True}),
    "none": (None, {"dense": True}),
    "dex_umd": ("dex_umd", {"mode": None}),  # DEX MAE + UMD multi-level (EMA-teacher feature) reconstruction
    "m4oe": ("m4oe", {"mlp_type": "m4oe", "m4oe_stage": "gated"}),  # experts pre-trained on their own modality
    # UMD's TD-Calib (an interpretation): dex_umd pre-training continued on the task's own train images, no labels
    "td_calib": ("dex_umd", {"mode": None}),
    "m4oe_swin": (None, {"network": "m4oe_swin"}),  # M4oE's own host: Swin UNETR, expert then gated stage per task
    "unimed": ("dex", {"mode": None, "decoder": "unimed"}),  # the DEX encoder fine-tuned through UniMed's decoders
}


# ------------------------------------------------------------------------------------------------------ training
def _mlflow_handler(cfg: BenchmarkConfig, mlflow, name: str, tags: dict, params: dict, output_transform=None):
    """The bundles' MLflow handler for one run of the benchmark (kept open: the caller adds the results, then closes
    it), logging every 10th iteration; None without tracking."""
    if not mlflow:
        return None
    from dex_monai.engines import output_scalars
    from dex_monai.handlers import DEXMLFlowHandler

    return DEXMLFlowHandler(
        tracking_uri=mlflow.get_tracking_uri(), experiment_name=cfg.experiment, run_name=name,
        output_transform=output_transform or output_scalars, iteration_log=lambda engine, it: it % 10 == 1,
        epoch_log=False, tags=tags, close_on_complete=False,
        config=({k: str(v)[:240] for k, v in params.items()},) * 2,
    )


def _finish_mlflow(handler, metrics: dict[str, float]) -> None:
    if handler is None or handler.cur_run is None:
        return
    for key, value in metrics.items():
        if not math.isnan(float(value)):
            handler.client.log_metric(handler.run_id, key, float(value))
    handler.close()


def _loader(items: list[dict], transform, cfg: BenchmarkConfig, steps: int, batch: int):
    """``steps`` batches of ``batch`` items drawn with replacement (seeded), as the benchmark samples."""
    from monai.data import DataLoader, Dataset
    from torch.utils.data import RandomSampler

    sampler = RandomSampler(items, replacement=True, num_samples=steps * batch,
                            generator=torch.Generator().manual_seed(cfg.seed))
    return DataLoader(Dataset(items, transform=transform), batch_size=batch, sampler=sampler, num_workers=0)


def _schedule(optimizer, cfg: BenchmarkConfig, steps: int):
    from monai.handlers import LrScheduleHandler

    from dex_monai.engines.schedules import warmup_cosine_scheduler

    warmup = max(1, int(cfg.warmup_fraction * steps))
    return LrScheduleHandler(warmup_cosine_scheduler(optimizer, total_steps=steps, warmup_steps=warmup),
                             print_lr=False, epoch_level=False)


def _pretrain_options(kind: str, cfg: BenchmarkConfig, modality_names: Sequence[str]) -> dict:
    if kind == "dense":
        return {"dense": True}
    if kind == "dex_umd":
        return {"feature_reconstruction_weight": cfg.umd_feature_weight}
    if kind == "m4oe":
        return {"mlp_type": "m4oe", "modalities": tuple(modality_names), "m4oe_stage": "expert"}
    if kind == "dex":
        return {}
    raise ValueError(f"unknown pre-training kind {kind!r}")


def pretrain(
    kind: str, images: torch.Tensor, cfg: BenchmarkConfig, mlflow, tags: dict, out_dir: Path,
    modalities: Sequence[str] = (), start_from: Path | None = None, steps: int | None = None, name: str | None = None,
) -> tuple[DEXMaskedAutoEncoder, Path]:
    """Pre-train an MAE of ``kind`` (``dex``, ``dense``, ``dex_umd``, ``m4oe``) on ``images`` ``[N, 3, S, S]`` with
    the pre-training bundle's engine and handlers (loss ``mae + feature + lambda_co * alignment + lambda_bal *
    balance``, clipping, non-finite steps skipped, GEMA momentum 0.99 -> 0.999 and router noise 1 -> 0 by cosine).

    ``modalities`` names every image's modality (M4oE trains each expert on its own modality). Returns the model and
    its checkpoint path. ``start_from`` continues pre-training from a checkpoint for ``steps`` steps (TD-Calib), with
    GEMA momentum and router noise held at their end values; ``name`` names the run and checkpoint (default ``kind``).
    """
    from monai.transforms import RandFlipd

    from dex_monai.engines import DEXPretrainTrainer
    from dex_monai.handlers import GEMAMomentumScheduleHandler, ProgressBarHandler, RouterNoiseScheduleHandler

    torch.manual_seed(cfg.seed)
    modality_names = sorted(set(modalities))
    model = DEXMaskedAutoEncoder(
        3, cfg.img_size, cfg.patch_size, spatial_dims=2, hidden_size=cfg.hidden_size, mlp_dim=cfg.mlp_dim,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_experts=cfg.num_experts, top_k=cfg.top_k,
        decoder_hidden_size=cfg.decoder_hidden_size, decoder_mlp_dim=4 * cfg.decoder_hidden_size,
        decoder_num_layers=cfg.decoder_num_layers, decoder_num_heads=4,
        **_pretrain_options(kind, cfg, modality_names), **cfg.extra_pretrain_options,
    )
    name = name or kind
    steps = steps or cfg.pretrain_steps
    gema, noise = {}, {}
    if start_from is not None:
        from dex_monai.engines.initialise import load_pretraining_checkpoint

        load_pretraining_checkpoint(model, start_from)
        gema, noise = {"start": 0.999, "end": 0.999}, {"start": 0.0, "end": 0.0}  # pre-training's end values
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.pretrain_lr,
                                  weight_decay=0.05, betas=(0.9, 0.95))
    items = [{"image": images[i], "modality": modalities[i] if modalities else "unknown"} for i in range(len(images))]
    flip = RandFlipd("image", prob=0.5, spatial_axis=-1)
    flip.set_random_state(seed=cfg.seed)
    tracking = _mlflow_handler(cfg, mlflow, f"pretrain-{name}", {**tags, "stage": "pretrain", "init": name},
                               {**asdict(cfg), "stage": "pretrain", "init": name})
    handlers = [_schedule(optimizer, cfg, steps), GEMAMomentumScheduleHandler(model, **gema),
                RouterNoiseScheduleHandler(model, **noise), ProgressBarHandler(("loss", "mae"), desc=f"pre-train {name}")]
    if getattr(cfg, "lambda_bal_decay", False):  # the paper: lambda_bal from its start value to 0 by cosine
        from dex_monai.handlers import LossWeightScheduleHandler

        handlers.append(LossWeightScheduleHandler(end=0.0))
    handlers += [tracking] if tracking else []
    device = getattr(cfg, "device", "cpu")
    model.to(device)
    trainer = DEXPretrainTrainer(
        device=device, max_epochs=1, train_data_loader=_loader(items, flip, cfg, steps, cfg.pretrain_batch),
        network=model, optimizer=optimizer, lambda_co=cfg.lambda_co, lambda_bal=cfg.lambda_bal, max_grad_norm=1.0,
        train_handlers=handlers, decollate=False,
    )
    trainer.run()
    if kind == "m4oe":
        model.encoder.set_modality_ids(None)
    path = out_dir / f"pretrain_{name}.pt"
    torch.save({"model": {k: v.cpu() for k, v in model.state_dict().items()}}, path)
    _finish_mlflow(tracking, {"skipped_steps": float(trainer.state.skipped_steps)})
    return model, path


def _build_downstream(
    task: Task, data: TaskData, cfg: BenchmarkConfig, init: str, modality_names: Sequence[str] = ()
) -> torch.nn.Module:
    in_channels = data.train_x.shape[1]
    size = cfg.img_size if task.spatial_dims == 2 else cfg.volume_size
    settings = dict(INITS[init][1])
    if settings.get("network") == "m4oe_swin":
        from dex_monai.benchmark.m4oe_swin import build_m4oe_swin

        return build_m4oe_swin(task, data, in_channels, size)
    decoder = settings.pop("decoder", None)
    if "mode" in settings:
        settings["mode"] = settings["mode"] or cfg.dex_finetune_mode
    if settings.get("mlp_type") == "m4oe":
        settings["modalities"] = tuple(modality_names)
    kwargs = dict(
        hidden_size=cfg.hidden_size, mlp_dim=cfg.mlp_dim, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
        num_experts=cfg.num_experts, top_k=cfg.top_k, **settings,
    )
    if decoder == "unimed":  # one task at a time: the other level gets the smallest vocabulary
        segmentation = data.kind == "segmentation"
        return UniMed(in_channels, 1 if segmentation else data.num_classes, data.num_classes if segmentation else 2,
                      size, cfg.patch_size, spatial_dims=task.spatial_dims, pixel_embedding_size=8, **kwargs)
    if data.kind == "segmentation":
        return DEXUNETR(in_channels, data.num_classes, size, cfg.patch_size, spatial_dims=task.spatial_dims,
                        feature_size=8, **kwargs)
    return DEXClassifier(in_channels, data.num_classes, size, cfg.patch_size, spatial_dims=task.spatial_dims,
                         head_dropout=0.1, **kwargs)


def _evaluate(model: torch.nn.Module, data: TaskData, batch: int) -> dict[str, float]:
    from monai.metrics import DiceMetric, ROCAUCMetric

    model.eval()
    outputs = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, data.eval_x.shape[0], batch):
            outputs.append(model(data.eval_x[i : i + batch].to(device)).float().cpu())
    logits = torch.cat(outputs)
    if data.kind == "classification":
        probs = logits.softmax(1)
        accuracy = float((probs.argmax(1) == data.eval_y).float().mean())
        # one-vs-rest AUC per class that has both positives and negatives in the evaluation set, averaged
        onehot = F.one_hot(data.eval_y, data.num_classes).float()
        per_class = []
        for c in range(data.num_classes):
            if 0 < onehot[:, c].sum() < len(onehot):
                metric = ROCAUCMetric()
                metric(probs[:, c : c + 1], onehot[:, c : c + 1])
                per_class.append(float(metric.aggregate()))
        auc = float(np.mean(per_class)) if per_class else float("nan")
        return {"score": auc, "auc": auc, "accuracy": accuracy}
    pred = F.one_hot(logits.argmax(1), data.num_classes).movedim(-1, 1).float()
    target = F.one_hot(data.eval_y[:, 0], data.num_classes).movedim(-1, 1).float()
    dice = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    dice(pred, target)
    per_class = dice.aggregate()
    mean_dice = float(torch.nanmean(per_class))
    return {"score": mean_dice, "dice": mean_dice}


def finetune(
    task: Task, data: TaskData, cfg: BenchmarkConfig, init: str, checkpoint: Path | None, mlflow, tags: dict,
    modality_names: Sequence[str] = (), run_name: str | None = None,
) -> dict[str, float]:
    """Fine-tune one initialisation on one task with MONAI's ``SupervisedTrainer`` (AdamW, warm-up + cosine, gradient
    clipping, random flips) and return its held-out metrics (``score`` = AUC or Dice).

    With ``cfg.gm_coord`` and a task that mixes modalities, the loss is UMD's GM-Coord (:class:`GMCoordLoss`, fed by
    the bundles' :class:`GMCoordHandler`) and the final per-modality coefficients are returned as ``gm_coef_<modality>``.
    """
    from monai.engines import SupervisedTrainer
    from monai.engines.utils import IterationEvents
    from monai.losses import DiceCELoss
    from monai.transforms import RandFlipd

    from dex_monai.handlers import GMCoordHandler, ProgressBarHandler
    from dex_monai.engines.unimed import PrepareUniMedBatch
    from dex_monai.losses import GMCoordLoss, UniMedLoss

    torch.manual_seed(cfg.seed)
    model = _build_downstream(task, data, cfg, init, modality_names)
    notes = ""
    if checkpoint is not None:
        report = load_encoder_weights(model, checkpoint, strict=True)
        notes = "; ".join(report.notes)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.finetune_lr, weight_decay=0.05)
    segmentation = data.kind == "segmentation"
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True) if segmentation else torch.nn.CrossEntropyLoss()
    unimed = {}  # UniMed: its joint loss on the task's annotations in the composed token format
    if isinstance(model, UniMed):
        classes = (model.vocabulary.num_image_classes, model.vocabulary.num_pixel_classes)
        loss_fn = UniMedLoss(*classes)
        unimed = {"prepare_batch": PrepareUniMedBatch(*classes, label_kind=data.kind, consistency_views=False)}
    coordinated = cfg.gm_coord and data.train_modalities is not None and not unimed
    if coordinated:
        loss_fn = GMCoordLoss(loss_fn, alpha=cfg.gm_coord_alpha)
    items = [{"image": data.train_x[i], "label": data.train_y[i]} for i in range(len(data.train_x))]
    if data.train_modalities is not None:
        for item, modality in zip(items, data.train_modalities):
            item["modality"] = modality
    flip = RandFlipd(["image", "label"] if segmentation else "image", prob=0.5, spatial_axis=-1)
    flip.set_random_state(seed=cfg.seed)
    tracking = _mlflow_handler(
        cfg, mlflow, run_name or f"{task.name}-{init}", {**tags, "stage": "finetune", "init": init, "task": task.name},
        {"task": task.name, "init": init, "modality": task.modality, "kind": data.kind, "spatial_dims": task.spatial_dims,
         "finetune_steps": cfg.finetune_steps, "finetune_lr": cfg.finetune_lr, "train_size": len(data.train_x),
         "eval_size": len(data.eval_x), "init_notes": notes[:240]},
        output_transform=lambda out: {"train_loss": float(out["loss"].detach())},
    )
    handlers = [_schedule(optimizer, cfg, cfg.finetune_steps), ProgressBarHandler(("loss",), desc=f"{task.name} <- {init}")]
    if coordinated:
        handlers.append(GMCoordHandler(loss_fn))
    handlers += [tracking] if tracking else []
    device = getattr(cfg, "device", "cpu")
    model.to(device)
    batch = cfg.seg3d_batch if segmentation and task.spatial_dims == 3 else cfg.finetune_batch
    trainer = SupervisedTrainer(
        device=device, max_epochs=1, train_data_loader=_loader(items, flip, cfg, cfg.finetune_steps, batch),
        network=model, optimizer=optimizer, loss_function=loss_fn, train_handlers=handlers, decollate=False, **unimed,
    )
    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED,
                              lambda engine: torch.nn.utils.clip_grad_norm_(params, 1.0))
    if INITS[init][1].get("network") == "m4oe_swin":
        from dex_monai.benchmark.m4oe_swin import attach_two_stage_schedule

        attach_two_stage_schedule(trainer, model, expert_steps=cfg.finetune_steps // 2)
    start = time.perf_counter()
    trainer.run()
    metrics = _evaluate(UniMedTaskView(model, data.kind) if unimed else model, data, batch)
    if coordinated:
        metrics.update({f"gm_coef_{m}": k for m, k in loss_fn.coefficients.items()})
    metrics["train_seconds"] = time.perf_counter() - start
    _finish_mlflow(tracking, metrics)
    return metrics


# ---------------------------------------------------------------------------------------------------- modularity
def encoder_routing_and_features(
    model: DEXMaskedAutoEncoder | None, images: torch.Tensor, cfg: BenchmarkConfig, dense: bool
) -> tuple[list[np.ndarray], np.ndarray]:
    """Per layer the top-k experts of every image ``[N, K]`` (empty for dense) and CLS features ``[N, D]``."""
    from dex_monai.networks import DEXViT

    if model is None:
        torch.manual_seed(cfg.seed)
        encoder = DEXViT(3, cfg.img_size, cfg.patch_size, spatial_dims=2, hidden_size=cfg.hidden_size,
                         mlp_dim=cfg.mlp_dim, num_layers=cfg.num_layers, num_heads=cfg.num_heads, dense=True)
    else:
        encoder = model.encoder
    encoder.eval()
    routes: list[list[torch.Tensor]] = [[] for _ in encoder.dex_layers()]
    feats = []
    with torch.no_grad():
        for i in range(0, images.shape[0], 64):
            tokens, _ = encoder(images[i : i + 64])
            feats.append(tokens[:, 0])
            for layer, record in zip(encoder.dex_layers(), routes):
                record.append(layer.routing["indices"])
    return [torch.cat(r).numpy() for r in routes], torch.cat(feats).numpy()


# --------------------------------------------------------------------------------------------------------- driver
def _markdown_table(rows: dict[str, dict[str, float]], inits: Sequence[str], tasks: Sequence[str]) -> str:
    lines = ["| task | metric | " + " | ".join(inits) + " |", "|---|---|" + "---|" * len(inits)]
    for task in tasks:
        metric = "AUC" if TASKS[task].kind == "classification" else "Dice"
        cells = [f"{rows[task][i]:.4f}" if not math.isnan(rows[task][i]) else "n/a" for i in inits]
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    means = [np.nanmean([rows[t][i] for t in tasks]) for i in inits]
    lines.append("| **mean** | | " + " | ".join(f"**{m:.4f}**" for m in means) + " |")
    return "\n".join(lines)


def run_transfer_benchmark(cfg: BenchmarkConfig) -> dict:
    """Run the whole protocol; returns ``{"table": {task: {init: score}}, "modularity": ..., "files": ...}``."""
    from dex_monai.analysis import (
        expert_usage,
        linear_probe_modality_accuracy,
        modality_expert_nmi,
        plot_modality_expert_heatmaps,
    )

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {sorted(TASKS)}")
    root = Path(cfg.data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist (give --data-root)")
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    benchmark_id = uuid.uuid4().hex[:12]
    tags = {"benchmark_id": benchmark_id, "benchmark": "transfer"}

    mlflow = None
    if cfg.tracking_uri != "none":
        import mlflow as _mlflow
        from monai.utils import path_to_sqlite_uri

        uri = cfg.tracking_uri or path_to_sqlite_uri(str((out_dir / "mlruns.db").resolve()))
        _mlflow.set_tracking_uri(uri)
        if _mlflow.get_experiment_by_name(cfg.experiment) is None:
            _mlflow.create_experiment(cfg.experiment, artifact_location=(out_dir / "mlartifacts").resolve().as_uri())
        _mlflow.set_experiment(cfg.experiment)
        mlflow = _mlflow

    rng = np.random.default_rng(cfg.seed)
    started = time.perf_counter()
    pools = collect_pretraining_pools(root, cfg)
    images, modalities = draw_images(pools, rng, cfg.pretrain_images_per_modality)
    unknown_inits = [i for i in cfg.inits if i not in INITS]
    if unknown_inits:
        raise ValueError(f"unknown initialisation(s) {unknown_inits}; known: {sorted(INITS)}")
    modality_names = sorted(set(modalities))
    pretrained: dict[str, tuple[DEXMaskedAutoEncoder, Path]] = {}
    for kind in dict.fromkeys(INITS[i][0] for i in cfg.inits if INITS[i][0] is not None):
        pretrained[kind] = pretrain(kind, images, cfg, mlflow, tags, out_dir, modalities)

    table: dict[str, dict[str, float]] = {}
    details: dict[str, dict[str, dict[str, float]]] = {}
    for name in cfg.tasks:
        task = TASKS[name]
        data = task.loader(root, cfg, np.random.default_rng(cfg.seed))
        table[name], details[name] = {}, {}
        for init in cfg.inits:
            source = INITS[init][0]
            checkpoint = pretrained[source][1] if source is not None else None
            if init == "td_calib":
                images_2d = task_images_2d(data, cfg)
                checkpoint = pretrain("dex_umd", images_2d, cfg, mlflow, tags, out_dir, [data.modality] * len(images_2d),
                                      start_from=checkpoint, steps=cfg.td_calib_steps, name=f"td_calib_{name}")[1]
            metrics = finetune(task, data, cfg, init, checkpoint, mlflow, tags, modality_names)
            table[name][init] = metrics["score"]
            details[name][init] = metrics

    # modularity: a second draw of images per modality
    probe_images, probe_modalities = draw_images(pools, np.random.default_rng(cfg.seed + 1), cfg.probe_images_per_modality)
    modularity: dict[str, dict] = {}
    files: dict[str, str] = {}
    for init in [*pretrained, "none"]:
        model = pretrained[init][0] if init in pretrained else None
        if init == "m4oe":
            model.encoder.set_m4oe_stage("gated")  # the expert stage would route by the (known) modality
        routes, feats = encoder_routing_and_features(model, probe_images, cfg, dense=init not in ("dex", "dex_umd"))
        if init not in ("dex", "dex_umd"):
            routes = []
        probe = linear_probe_modality_accuracy(feats, probe_modalities, seed=cfg.seed)
        entry = {"probe_modality_accuracy": float(probe.accuracy), "probe_chance": float(probe.chance)}
        if routes:
            nmi = modality_expert_nmi(routes, probe_modalities)
            usage = expert_usage(routes, probe_modalities)
            entry["nmi_per_layer"] = [float(v) for v in nmi]
            heatmap = out_dir / f"modularity_{init}_expert_usage.png"
            plot_modality_expert_heatmaps(usage, heatmap, title=f"{init}: expert use per modality (layers x experts)")
            files["heatmap" if init == "dex" else f"heatmap_{init}"] = str(heatmap)
            entry["usage"] = {m: np.nan_to_num(u).tolist() for m, u in usage.items()}
        modularity[init] = entry

    inits = list(cfg.inits)
    md = [f"# Transfer benchmark {benchmark_id}", "", _markdown_table(table, inits, list(cfg.tasks)), "",
          "## Emergent modularity", "", "| encoder | modality linear-probe accuracy | chance | NMI(modality; expert) per layer |",
          "|---|---|---|---|"]
    for init, entry in modularity.items():
        nmi = ", ".join(f"{v:.3f}" for v in entry.get("nmi_per_layer", [])) or "n/a (no experts)"
        md.append(f"| {init} | {entry['probe_modality_accuracy']:.3f} | {entry['probe_chance']:.3f} | {nmi} |")
    md += ["", f"Pre-training images: {len(modalities)} ({', '.join(f'{m}: {modalities.count(m)}' for m in sorted(set(modalities)))}).",
           f"Wall time: {time.perf_counter() - started:.0f} s."]
    (out_dir / "transfer_table.md").write_text("\n".join(md) + "\n")
    csv_lines = ["task,metric," + ",".join(inits)]
    for task in cfg.tasks:
        metric = "auc" if TASKS[task].kind == "classification" else "dice"
        csv_lines.append(f"{task},{metric}," + ",".join(f"{table[task][i]:.6f}" for i in inits))
    csv_lines.append("mean,," + ",".join(f"{np.nanmean([table[t][i] for t in cfg.tasks]):.6f}" for i in inits))
    (out_dir / "transfer_table.csv").write_text("\n".join(csv_lines) + "\n")
    result = {"benchmark_id": benchmark_id, "table": table, "details": details, "modularity": modularity,
              "config": asdict(cfg), "files": {**files, "markdown": str(out_dir / "transfer_table.md"),
                                                "csv": str(out_dir / "transfer_table.csv")}}
    (out_dir / "transfer_result.json").write_text(json.dumps(result, indent=2, default=float))
    if mlflow:
        with mlflow.start_run(run_name="transfer-summary", tags={**tags, "stage": "summary"}):
            mlflow.log_params({"tasks": ",".join(cfg.tasks), "inits": ",".join(inits)})
            for init in inits:
                mlflow.log_metric(f"mean_score_{init}", float(np.nanmean([table[t][init] for t in cfg.tasks])))
            for init, entry in modularity.items():
                mlflow.log_metric(f"probe_modality_accuracy_{init}", entry["probe_modality_accuracy"])
                for layer, value in enumerate(entry.get("nmi_per_layer", [])):
                    mlflow.log_metric(f"nmi_{init}", value, step=layer)
            for path in result["files"].values():
                mlflow.log_artifact(path)
            mlflow.log_artifact(str(out_dir / "transfer_result.json"))
        result["tracking_uri"] = mlflow.get_tracking_uri()
    return result
