# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""
``torch.export`` of a bundle's network: the successor of the traced TorchScript model.

The network of a bundle config is built, loaded from a checkpoint, put in eval mode and exported with a dynamic
batch dimension; the ExportedProgram is written with ``torch.export.save`` together with the bundle's metadata and
config (as ``ckpt_export`` does for TorchScript). Routing stays per image in the exported graph: the DEX layers
switch to their export path (``StackedExpertMLP._forward_gathered``) under ``torch.export``, so every image's
experts are chosen by its own CLS token at run time.

Command line (arguments as ``python -m monai.bundle onnx_export``; any other ``--key value`` overrides the config)::

    python -m dex_monai.export network_def --filepath models/model.pt2 --ckpt_file models/model.pt \\
        --meta_file configs/metadata.json --config_file configs/inference.json --input_shape "[1,1,96,96,96]"

Use the result with::

    program = torch.export.load("models/model.pt2")
    logits = program.module()(images)  # images [B, C, *roi_size], any B >= 1
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

__all__ = ["export_network", "bundle_export", "load_exported"]

#: the smallest batch of the example input: torch.export specialises dimensions of size 0 and 1
_MIN_EXAMPLE_BATCH = 2


def export_network(network: nn.Module, input_shape: Sequence[int], max_batch: int = 1024) -> torch.export.ExportedProgram:
    """Export ``network`` (in eval mode, without gradients) for inputs ``[B, *input_shape[1:]]``, B in
    ``[1, max_batch]``.

    Args:
        network: the module to export; it is switched to eval mode.
        input_shape: ``[B, C, *spatial]`` of an example input; only ``C`` and the spatial sizes are kept fixed.
        max_batch: the largest batch the exported program accepts.

    Returns:
        the ExportedProgram; its ``module()`` maps ``[B, C, *spatial]`` to the network's output for that batch.
    """
    network.eval()
    example = torch.rand(max(_MIN_EXAMPLE_BATCH, int(input_shape[0])), *[int(s) for s in input_shape[1:]])
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with torch.no_grad():
        return torch.export.export(network, (example,), dynamic_shapes=({0: batch},))


def _input_shape_from_metadata(meta: Mapping[str, Any]) -> list[int]:
    image = meta["network_data_format"]["inputs"]["image"]
    return [1, int(image["num_channels"]), *[int(s) for s in image["spatial_shape"]]]


def bundle_export(
    net_id: str = "network_def",
    filepath: str | os.PathLike = "models/model.pt2",
    ckpt_file: str | os.PathLike = "models/model.pt",
    config_file: str | Sequence[str] = "configs/inference.json",
    meta_file: str | Sequence[str] | None = "configs/metadata.json",
    key_in_ckpt: str = "",
    input_shape: Sequence[int] | None = None,
    **override: Any,
) -> None:
    """Build ``net_id`` from a bundle config, load ``ckpt_file`` into it and save its ``torch.export`` program.

    Args:
        net_id: the network's id in the config.
        filepath: where the ExportedProgram is written (``.pt2``).
        ckpt_file: the checkpoint, a state dict (read with ``weights_only=True``).
        config_file: the bundle config(s) defining ``net_id``.
        meta_file: the bundle metadata; stored in the program as ``metadata.json`` and used for the input shape
            when ``input_shape`` is not given.
        key_in_ckpt: key of the network's weights in a nested checkpoint, ``""`` for a bare state dict.
        input_shape: ``[B, C, *spatial]`` of an example input; the batch size is dynamic in the export.
        override: ``id: value`` pairs overriding the config (e.g. ``roi_size``, ``finetune_mode``).

    The program stores the metadata as ``metadata.json`` and the configs (by file name) as ``configs.json``
    (see :func:`load_exported`).
    """
    from monai.bundle import ConfigParser

    for name in ([config_file] if isinstance(config_file, (str, os.PathLike)) else list(config_file)) + [ckpt_file]:
        if not os.path.isfile(name):
            raise FileNotFoundError(
                f"{name} does not exist (from {os.getcwd()}): run inside the bundle folder, or give --config_file, "
                "--meta_file and --ckpt_file (python -m dex_monai.export --help)."
            )
    parser = ConfigParser()
    parser.read_config(f=config_file)
    if meta_file is not None:
        parser.read_meta(f=meta_file)
    parser.update(dict(override))
    network = parser.get_parsed_content(net_id)
    state = torch.load(ckpt_file, map_location="cpu", weights_only=True)
    network.load_state_dict(state[key_in_ckpt] if key_in_ckpt else state)
    network = network.to("cpu")
    if input_shape is None:
        if not parser.get("_meta_"):
            raise ValueError("give --input_shape, or --meta_file with network_data_format#inputs#image.")
        input_shape = _input_shape_from_metadata(parser.get("_meta_"))
    program = export_network(network, input_shape)
    names = [config_file] if isinstance(config_file, (str, os.PathLike)) else list(config_file)
    configs = {os.path.basename(str(name)): ConfigParser.load_config_file(name) for name in names}
    extra_files = {"metadata.json": json.dumps(parser.get("_meta_", {})), "configs.json": json.dumps(configs)}
    os.makedirs(os.path.dirname(os.path.abspath(filepath)), exist_ok=True)
    torch.export.save(program, filepath, extra_files=extra_files)
    shape = ", ".join(str(s) for s in input_shape[1:])
    print(f"exported {net_id} to {filepath}: input [B, {shape}], B dynamic")


def load_exported(filepath: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Load a program written by :func:`bundle_export`.

    Returns:
        the callable module (``[B, C, *spatial] -> output``) and the stored JSON files by name
        (``metadata.json``; ``configs.json``: ``{config file name: content}``).
    """
    extra_files = {"metadata.json": "", "configs.json": ""}
    program = torch.export.load(filepath, extra_files=extra_files)
    return program.module(), {name: json.loads(text) for name, text in extra_files.items() if text}


if __name__ == "__main__":
    import sys

    import fire

    if {"-h", "--help"} & set(sys.argv[1:]):  # fire would pass --help to **override
        print("python -m dex_monai.export [network_def] --filepath models/model.pt2 --ckpt_file models/model.pt "
              "--config_file configs/inference.json --meta_file configs/metadata.json [--input_shape [1,C,...]] "
              "[--<config id> <value> ...]\n")
        print(bundle_export.__doc__)
        sys.exit(0)
    fire.Fire(bundle_export)
