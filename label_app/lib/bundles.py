# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""
Working copies of the project's segmentation bundles for the MONAI Label app.

The app never trains into ``<repo>/bundles/<name>`` itself: each served bundle gets a working copy
``<work_dir>/<name>`` whose ``configs/`` (and ``docs/``) are refreshed from the repository every time
the app starts, and whose ``models/`` belongs to MONAI Label (training writes ``models/model.pt`` there,
inference reads it).  A fresh working copy starts from the repository bundle's ``models/model.pt`` when
that checkpoint fits the configured network, otherwise from freshly initialised weights (the bundle's
``initialise_network``, i.e. from scratch unless the overrides ask for ``init: dex``), and says so in
``/info`` until a training run replaces it.

Bundle-config overrides (``--conf overrides ...``) are a JSON object, or a JSON / YAML file holding one,
that maps a model name (or ``"*"`` for every model) to bundle keys, e.g.
``{"dex_seg3d": {"roi_size": [32, 32, 32], "hidden_size": 48, "num_layers": 2}}``.  They apply to
inference, to training and to the network of the initial weights.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

logger = logging.getLogger(__name__)

#: bundles served when ``--conf models`` is not given (those present in the bundles folder)
DEFAULT_MODELS = ("dex_seg3d", "dex_seg2d")
#: written next to ``models/model.pt`` when the app created that file; holds the file's mtime then
INITIAL_MARKER = ".initial_weights.json"
#: keys of the bundle configs the app always sets (the working copy and the real repository)
KEY_BUNDLE_ROOT = "bundle_root"
KEY_REPO_ROOT = "repo_root"


def parse_overrides(value: Optional[str]) -> Dict[str, Dict[str, Any]]:
    """``--conf overrides`` value (inline JSON or a .json / .yaml file) -> ``{model: {key: value}}``."""
    if value is None or not str(value).strip():
        return {}
    text = str(value).strip()
    if not text.startswith("{"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ValueError(f"--conf overrides: {text!r} is neither a JSON object nor an existing file")
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError("--conf overrides must map model names (or '*') to objects of bundle keys")
    return data


def overrides_for(all_overrides: Mapping[str, Mapping[str, Any]], model: str) -> Dict[str, Any]:
    """The overrides of one model: those under ``"*"`` updated by those under its name."""
    out: Dict[str, Any] = dict(all_overrides.get("*", {}))
    out.update(all_overrides.get(model, {}))
    return out


def select_models(bundles_dir: Path, models: Optional[str]) -> Dict[str, Path]:
    """Bundle folders to serve: ``models`` is a comma-separated list, or empty / ``all`` for the defaults."""
    wanted = [m.strip() for m in (models or "").split(",") if m.strip()]
    if not wanted or wanted == ["all"]:
        found = {m: bundles_dir / m for m in DEFAULT_MODELS if (bundles_dir / m / "configs").is_dir()}
        if not found:
            logger.warning(f"no DEX segmentation bundle ({', '.join(DEFAULT_MODELS)}) found in {bundles_dir}")
        return found
    out = {}
    for m in wanted:
        path = bundles_dir / m
        if not (path / "configs").is_dir():
            raise ValueError(f"--conf models: no bundle {m!r} in {bundles_dir} (no {path / 'configs'})")
        out[m] = path
    return out


def sync_working_copy(src: Path, dst: Path) -> Path:
    """Refresh ``dst/configs`` (and ``dst/docs``) from the repository bundle ``src``; keep ``dst/models``."""
    dst.mkdir(parents=True, exist_ok=True)
    if dst.resolve() == src.resolve():  # work_dir == bundles_dir: serve the bundle in place
        (dst / "models").mkdir(exist_ok=True)
        return dst
    for sub in ("configs", "docs"):
        if not (src / sub).is_dir():
            continue
        tmp = dst / f".{sub}.new"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src / sub, tmp)
        old = dst / sub
        if old.exists():
            shutil.rmtree(old)
        os.replace(tmp, old)
    (dst / "models").mkdir(exist_ok=True)
    return dst


def load_config(bundle: Path, config_names, overrides: Mapping[str, Any], repo_root: Path):
    """A ``ConfigParser`` of the first of ``config_names`` found in ``bundle/configs``, with the app's overrides."""
    from monai.bundle import ConfigParser

    for name in config_names:
        path = bundle / "configs" / name
        if path.is_file():
            break
    else:
        return None
    parser = ConfigParser()
    parser.read_config(str(path))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    apply_overrides(parser, overrides, bundle, repo_root)
    return parser


def apply_overrides(parser, overrides: Mapping[str, Any], bundle: Path, repo_root: Path) -> None:
    parser[KEY_BUNDLE_ROOT] = str(bundle)
    parser[KEY_REPO_ROOT] = str(repo_root)
    for key, value in overrides.items():
        parser[key] = value


def _state_dict(obj: Any) -> Optional[Dict[str, Any]]:
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if isinstance(obj, dict) and all(hasattr(v, "shape") for v in obj.values()):
        return obj
    return None


def _fits(network, checkpoint: Path) -> bool:
    import torch

    try:
        state = _state_dict(torch.load(str(checkpoint), map_location="cpu", weights_only=True))
    except Exception as e:  # unreadable, or not a plain state dict
        logger.warning(f"cannot read {checkpoint}: {e}")
        return False
    want = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    return state is not None and {k: tuple(v.shape) for k, v in state.items()} == want


def ensure_model(
    name: str, work: Path, src: Path, overrides: Mapping[str, Any], repo_root: Path
) -> Dict[str, Any]:
    """
    Make sure ``work/models/model.pt`` exists and fits the configured network.

    A checkpoint that does not fit (the overrides changed the architecture) is renamed to
    ``model.pt.mismatch-<time>``, never deleted.  Returns ``{"initial": bool, "source": str}``.
    """
    import torch

    model_pt = work / "models" / "model.pt"
    parser = load_config(work, ("inference.json", "inference.yaml"), overrides, repo_root)
    if parser is None:
        raise FileNotFoundError(f"{name}: no configs/inference.json in {src}")
    network = parser.get_parsed_content("network_def", instantiate=True)

    if model_pt.is_file():
        if _fits(network, model_pt):
            return {"initial": is_initial(model_pt), "source": str(model_pt)}
        aside = model_pt.with_name(f"model.pt.mismatch-{time.strftime('%Y%m%d-%H%M%S')}")
        logger.warning(f"{name}: {model_pt} does not fit the configured network; moved to {aside.name}")
        os.replace(model_pt, aside)

    repo_model = src / "models" / "model.pt"
    if repo_model.is_file() and _fits(network, repo_model):
        tmp = model_pt.with_suffix(".pt.tmp")
        shutil.copy2(repo_model, tmp)
        os.replace(tmp, model_pt)
        (model_pt.parent / INITIAL_MARKER).unlink(missing_ok=True)
        logger.info(f"{name}: starting from the repository bundle's checkpoint {repo_model}")
        return {"initial": False, "source": str(repo_model)}

    # freshly initialised weights, through the training config's initialisation when it has one
    train = load_config(work, ("train.json", "train.yaml"), overrides, repo_root)
    how = "random initialisation"
    spec = train.get("initialise_network") if train is not None else None
    if isinstance(spec, dict) and "_target_" in spec:
        import pydoc

        try:
            kwargs = {
                k: train.get_parsed_content(f"initialise_network#{k}")
                for k in spec
                if not k.startswith("_") and k != "network"
            }
            target = pydoc.locate(spec["_target_"])
            if not callable(target):
                raise ValueError(f"cannot find {spec['_target_']!r}")
            target(network=network, **kwargs)
            how = "initialise_network(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"
        except Exception as e:
            logger.warning(f"{name}: initialise_network failed ({e}); using random initialisation")
    tmp = model_pt.with_suffix(".pt.tmp")
    torch.save(network.state_dict(), str(tmp))
    os.replace(tmp, model_pt)
    (model_pt.parent / INITIAL_MARKER).write_text(
        json.dumps({"mtime_ns": model_pt.stat().st_mtime_ns, "how": how}, indent=1)
    )
    logger.warning(
        f"{name}: no trained checkpoint; serving initial weights ({how}) from {model_pt} until the first training"
    )
    return {"initial": True, "source": how}


def is_initial(model_pt: Path) -> bool:
    """True while ``model_pt`` is still the file the app initialised (no training has replaced it)."""
    marker = model_pt.parent / INITIAL_MARKER
    if not marker.is_file() or not model_pt.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("mtime_ns") == model_pt.stat().st_mtime_ns
    except (ValueError, OSError):
        return False
