# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""
Resumable checkpoints: atomic, rotating ``checkpoint_<iteration>.pt`` files written with ignite's ``Checkpoint``,
a final ``model.pt``, and a resume handler that reloads the newest readable checkpoint (MONAI's
``CheckpointLoader``, ``torch.load(..., weights_only=True)``) before any other start-up handler runs.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.handlers import CheckpointLoader
from monai.utils import IgniteInfo, min_version, optional_import

from dex_monai.engines.utils import as_bool, is_rank0, unwrap_network

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
Checkpoint, _ = optional_import("ignite.handlers", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Checkpoint")
BaseSaveHandler, _ = optional_import(
    "ignite.handlers.checkpoint", IgniteInfo.OPT_IMPORT_VERSION, min_version, "BaseSaveHandler", as_type="base"
)
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = [
    "CHECKPOINT_PREFIX",
    "AtomicDiskSaver",
    "CheckpointResumeHandler",
    "ResumableCheckpointSaver",
    "find_latest_checkpoint",
    "list_checkpoints",
    "save_network_weights",
]

CHECKPOINT_PREFIX = "checkpoint"
_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}_(\d+)\.pt$")


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of every ``checkpoint_<iteration>.pt`` in ``ckpt_dir``, oldest first."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _PATTERN.match(path.name)
        if match and path.is_file() and path.stat().st_size > 0:
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_latest_checkpoint(ckpt_dir: str | os.PathLike) -> str | None:
    """Path of the checkpoint with the highest iteration in ``ckpt_dir``, or None."""
    found = list_checkpoints(ckpt_dir)
    return str(found[-1][1]) if found else None


def _atomic_torch_save(payload: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class AtomicDiskSaver(BaseSaveHandler):
    """
    ignite save handler writing ``torch.save`` output to a temporary file renamed into place. Unlike ignite's
    ``DiskSaver`` it makes no ``ignite.distributed`` call (which creates process groups, a collective that would
    hang when only rank 0 saves): construct it on the saving rank only.
    """

    def __init__(self, dirname: str | os.PathLike) -> None:
        self.dirname = Path(dirname)

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        _atomic_torch_save(checkpoint, self.dirname / filename)

    def remove(self, filename: str) -> None:
        (self.dirname / filename).unlink(missing_ok=True)


def save_network_weights(network: torch.nn.Module, path: str | os.PathLike, key: str | None = "model") -> Path:
    """Atomically save ``{key: state_dict}`` (or the bare state dict when ``key`` is None) of the unwrapped network."""
    path = Path(path)
    state = unwrap_network(network).state_dict()
    _atomic_torch_save(state if key is None else {key: state}, path)
    return path


class CheckpointResumeHandler:
    """
    Resume training: at ``Events.STARTED`` load the newest ``checkpoint_<iteration>.pt`` of ``ckpt_dir`` into
    ``load_dict`` (network, optimiser, lr scheduler, trainer state, routing statistics ...). A checkpoint that
    cannot be read (e.g. cut short by ``kill -9`` outside the atomic write) is skipped for the next older one.
    The trainer's ``max_epochs`` of the current config is kept, so a run can also be extended.

    Attach it first, so that the handlers reacting to ``STARTED`` see the restored iteration.

    Args:
        ckpt_dir: folder of the checkpoints.
        load_dict: ``{name: object with load_state_dict}``, same names as when saving.
        enabled: False makes the handler a no-op (e.g. ``"@resume"`` in a bundle config).
        checkpoint: an explicit checkpoint file to load instead of the newest one.
        map_location: ``torch.load`` map location (e.g. the device of the rank).
        strict: strict ``load_state_dict`` of the modules.
        engine_key: name under which the engine it is attached to is also restored (its iteration, epoch and
            ``state_dict_user_keys``); None leaves the engine out. This avoids a circular reference in configs.
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        load_dict: Mapping[str, Any],
        enabled: bool = True,
        checkpoint: str | os.PathLike | None = None,
        map_location: Any = "cpu",
        strict: bool = True,
        engine_key: str | None = "trainer",
    ) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.load_dict = dict(load_dict)
        self.enabled = as_bool(enabled)
        self.checkpoint = None if checkpoint in (None, "") else Path(checkpoint)
        self.map_location = map_location
        self.strict = strict
        self.engine_key = engine_key
        self.loaded_path: Path | None = None
        self.logger = logging.getLogger(self.__class__.__name__)

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.enabled:
            return
        if self.checkpoint is not None:
            candidates = [self.checkpoint]
        else:
            candidates = [path for _, path in reversed(list_checkpoints(self.ckpt_dir))]
        if not candidates:
            self.logger.warning(f"resume requested but no checkpoint in {self.ckpt_dir}: starting from scratch.")
            return
        load_dict = dict(self.load_dict)
        if self.engine_key is not None:
            load_dict.setdefault(self.engine_key, engine)
        for path in candidates:
            try:
                loader = CheckpointLoader(
                    load_path=str(path), load_dict=load_dict, map_location=self.map_location, strict=self.strict
                )
                loader(engine)
            except (RuntimeError, EOFError, OSError, ValueError) as e:
                if self.checkpoint is not None:
                    raise
                self.logger.warning(f"cannot read checkpoint {path} ({e}); trying an older one.")
                continue
            self.loaded_path = Path(path)
            engine.state.resumed_from = str(path)
            self.logger.info(
                f"resumed from {path} at epoch {engine.state.epoch}, iteration {engine.state.iteration}."
            )
            return
        self.logger.warning(f"no readable checkpoint in {self.ckpt_dir}: starting from scratch.")


class ResumableCheckpointSaver:
    """
    Save everything needed to resume as ``<save_dir>/checkpoint_<iteration>.pt`` every ``save_interval``
    iterations and at the end of every epoch, keeping the ``n_saved`` newest; at completion also write the
    network weights to ``<save_dir>/<final_filename>`` as ``{"model": state_dict}``.

    Files are written atomically (temporary file, then rename), so a process killed at any moment leaves the
    previous checkpoints intact. Under ``torch.distributed`` attach it on rank 0 only (it makes no collective
    call); the other ranks hold the same state. On a fresh start (iteration 0) stale
    ``checkpoint_*.pt`` files of an earlier run in ``save_dir`` are deleted; on a resumed start they are
    adopted, so rotation continues.

    Args:
        save_dir: folder of the checkpoints.
        save_dict: ``{name: object with state_dict}``; must include the trainer to resume at the same iteration.
        save_interval: iterations between checkpoints; 0 saves at epoch ends only.
        epoch_level: also save at the end of every epoch.
        n_saved: checkpoints kept (at least 2 is advised: the older survives a kill during rotation).
        final_filename: file of the final weights; None disables it.
        network: network whose weights go to ``final_filename`` (default: ``save_dict["model"]``).
        engine_key: name under which the engine it is attached to is saved too; None leaves it out.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        save_interval: int = 0,
        epoch_level: bool = True,
        n_saved: int | None = 2,
        final_filename: str | None = "model.pt",
        network: torch.nn.Module | None = None,
        engine_key: str | None = "trainer",
    ) -> None:
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.save_interval = int(save_interval or 0)
        self.epoch_level = epoch_level
        self.n_saved = n_saved
        self.final_filename = final_filename
        self.network = network if network is not None else self.save_dict.get("model")
        self.logger = logging.getLogger(self.__class__.__name__)
        self.engine_key = engine_key
        self._last_saved_iteration = -1
        self._checkpoint: Any = None

    @property
    def last_checkpoint(self) -> str | None:
        return find_latest_checkpoint(self.save_dir)

    def attach(self, engine: Engine) -> None:
        to_save = dict(self.save_dict)
        if self.engine_key is not None:
            to_save.setdefault(self.engine_key, engine)
        self._checkpoint = Checkpoint(
            to_save=to_save,
            save_handler=AtomicDiskSaver(self.save_dir),
            filename_pattern=f"{CHECKPOINT_PREFIX}_{{global_step}}.{{ext}}",
            n_saved=self.n_saved,
            global_step_transform=lambda engine, _: engine.state.iteration,
        )
        engine.add_event_handler(Events.STARTED, self.started)
        if self.save_interval > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.save_interval), self.save)
        if self.epoch_level:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine: Engine) -> None:
        if is_rank0() and self.save_dir.is_dir():  # temporary files of writes cut short by a kill
            for tmp in self.save_dir.glob(f".{CHECKPOINT_PREFIX}_*.pt.*"):
                tmp.unlink(missing_ok=True)
        existing = list_checkpoints(self.save_dir)
        iteration = int(engine.state.iteration)
        keep = []
        for step, path in existing:
            if iteration == 0 or step > iteration:
                if is_rank0():
                    self.logger.warning(f"removing checkpoint {path.name} of an earlier run.")
                    path.unlink(missing_ok=True)
            else:
                keep.append((step, path.name))
        self._checkpoint.load_state_dict({"_saved": keep})
        self._last_saved_iteration = iteration if keep and keep[-1][0] == iteration else -1

    def save(self, engine: Engine) -> None:
        if engine.state.iteration == self._last_saved_iteration:
            return
        self._checkpoint(engine)
        self._last_saved_iteration = engine.state.iteration

    def completed(self, engine: Engine) -> None:
        self.save(engine)
        if self.final_filename and self.network is not None and is_rank0():
            path = save_network_weights(self.network, self.save_dir / self.final_filename)
            self.logger.info(f"saved the final weights to {path}.")
