# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""
Export of the three fine-tuning bundles' networks, in both fine-tuning modes, on tiny networks:

* ONNX through ``monai.bundle.onnx_export`` (the function behind ``python -m monai.bundle onnx_export``), run by
  onnxruntime;
* ``torch.export`` through ``dex_monai.export`` (``torch.export.save`` / ``torch.export.load``).

Each exported model must give the checkpoint's logits (max abs difference < 1e-3) for batches of 1 and 2. In
"experts" mode the two test images are forced to different experts in every layer (checked in eager mode), and the
example input of the export is another random batch, so a routing frozen at export time would fail the comparison
(``test_forced_routing_changes_logits`` shows the difference is far above the tolerance). No deprecation warning may
be raised by the export or the loading, except one FutureWarning that torch 2.13's ONNX exporter raises inside itself
(``TORCH_INTERNAL``).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from bundle_helpers import bundle_args
from export_helpers import BUNDLES, REPO, comparison_batches, dex_layers, tiny_checkpoint

with warnings.catch_warnings():
    # importing ignite (through MONAI's bundle engines) imports torch.distributed.optim, which applies torch.jit.script
    # and torch.jit.interface to its own optimisers at import time (a DeprecationWarning per use, once per process);
    # it is no part of the export path, so it is imported here once, quietly
    warnings.simplefilter("ignore", DeprecationWarning)
    import ignite.engine  # noqa: F401

onnxruntime = pytest.importorskip("onnxruntime", reason="install the 'export' extra: pip install -e .[export]")

TOLERANCE = 1e-3
MODES = ("experts", "director")
CASES = [(bundle, mode) for bundle in BUNDLES for mode in MODES]
# the README's --converter_kwargs; pass copies: onnx_export adds keys to the dict it is given
ONNX_KWARGS = {"input_names": ["image"], "output_names": ["pred"], "dynamic_shapes": [{0: "batch"}], "dynamo": True}
# raised inside torch 2.13's own ONNX exporter when it deep-copies the ExportedProgram (not from a call of ours)
TORCH_INTERNAL = ("`isinstance(treespec, LeafSpec)` is deprecated",)
pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")


def _deprecations(record: list[warnings.WarningMessage]) -> list[str]:
    kinds = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
    return [f"{w.category.__name__}: {w.message}" for w in record
            if issubclass(w.category, kinds) and not str(w.message).startswith(TORCH_INTERNAL)]


def _max_differences(run, network: torch.nn.Module, pair: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        return {name: float((torch.as_tensor(run(x)) - network(x)).abs().max())
                for name, x in comparison_batches(pair).items()}


@pytest.mark.parametrize("bundle,mode", CASES)
def test_onnx_export_matches_checkpoint(bundle, mode, tmp_path):
    from monai.bundle import onnx_export

    network, overrides, pair, ckpt = tiny_checkpoint(bundle, mode, tmp_path)
    configs = REPO / "bundles" / bundle / "configs"
    onnx_path = tmp_path / "model.onnx"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        onnx_export(
            net_id="network_def", filepath=str(onnx_path), ckpt_file=str(ckpt),
            meta_file=str(configs / "metadata.json"), config_file=str(configs / "inference.json"),
            input_shape=[2, *BUNDLES[bundle][1][1:]], use_trace=True, converter_kwargs=dict(ONNX_KWARGS), **overrides,
        )
    assert _deprecations(record) == []
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    differences = _max_differences(lambda x: session.run(None, {"image": x.numpy()})[0], network, pair)
    assert max(differences.values()) < TOLERANCE, differences


@pytest.mark.parametrize("bundle,mode", CASES)
def test_torch_export_matches_checkpoint(bundle, mode, tmp_path):
    from dex_monai.export import bundle_export, load_exported

    network, overrides, pair, ckpt = tiny_checkpoint(bundle, mode, tmp_path)
    configs = REPO / "bundles" / bundle / "configs"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        path = tmp_path / "model.pt2"
        bundle_export(
            "network_def", path, ckpt, str(configs / "inference.json"),
            str(configs / "metadata.json"), input_shape=BUNDLES[bundle][1], **overrides,
        )
        exported, files = load_exported(path)
    assert _deprecations(record) == []
    assert files["metadata.json"] == json.loads((configs / "metadata.json").read_text())
    assert files["configs.json"]["inference.json"]["network_def"]["mode"] == "@finetune_mode"
    differences = _max_differences(exported, network, pair)
    assert max(differences.values()) < TOLERANCE, differences
    with pytest.raises(Exception):  # the channel and spatial sizes are fixed; only the batch is dynamic
        exported(torch.rand(1, BUNDLES[bundle][1][1] + 1, *BUNDLES[bundle][1][2:]))


def _reference_experts(experts, units: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Unit by unit, the gate-weighted sum of the chosen experts' GELU MLPs."""
    out = torch.zeros_like(units)
    for u in range(units.shape[0]):
        for gate, e in zip(gates[u], indices[u].tolist()):
            hidden = F.gelu(F.linear(units[u], experts.linear1_weight[e], experts.linear1_bias[e]))
            out[u] += gate * F.linear(hidden, experts.linear2_weight[e], experts.linear2_bias[e])
    return out


@pytest.mark.parametrize("tokens", [1, 5])
def test_export_paths_match_the_routed_experts(tokens):
    """The export path (dense for one token per unit, i.e. token routing; gathered otherwise) gives the result of the
    grouped training-time path and of a unit-by-unit reference."""
    from dex_monai.networks.blocks.dex_layer import StackedExpertMLP

    torch.manual_seed(0)
    experts = StackedExpertMLP(5, 8, 12)
    with torch.no_grad():
        for weight in (experts.linear1_bias, experts.linear2_bias):
            weight.normal_()
        units = torch.randn(7, tokens, 8)
        indices = torch.stack([torch.randperm(5)[:2] for _ in range(7)])
        gates = torch.softmax(torch.randn(7, 2), -1)
        reference = _reference_experts(experts, units, gates, indices)
        torch.testing.assert_close(experts(units, gates, indices), reference)
        torch.testing.assert_close(experts._forward_exportable(units, gates, indices), reference)
        torch.testing.assert_close(experts._forward_dense(units, gates, indices), reference)


def test_token_routing_layer_exports(tmp_path):
    """A DEX layer routing every token: ``torch.export`` (dynamic batch) and ONNX give the eager output."""
    from dex_monai.networks.blocks.dex_layer import DEXLayer

    torch.manual_seed(0)
    layer = DEXLayer(16, 32, num_experts=4, top_k=2, mode="experts", routing="token").eval()
    with torch.no_grad():
        layer.experts.linear1_weight.add_(torch.randn_like(layer.experts.linear1_weight))
        layer.router.gate.weight.mul_(10.0)
    x = torch.randn(3, 6, 16)
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        program = torch.export.export(layer, (x,), dynamic_shapes=({0: batch},))
    torch.onnx.export(program, f=str(tmp_path / "layer.onnx"), input_names=["x"])
    session = onnxruntime.InferenceSession(str(tmp_path / "layer.onnx"), providers=["CPUExecutionProvider"])
    for size in (1, 2):
        with torch.no_grad():
            expected = layer(x[:size])
            assert len({tuple(r.tolist()) for r in layer.routing["indices"].reshape(-1, 2)}) > 1  # routing varies
            torch.testing.assert_close(program.module()(x[:size]), expected, atol=1e-5, rtol=1e-5)
        got = torch.from_numpy(session.run(None, {"x": x[:size].numpy()})[0])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_forced_routing_changes_logits(tmp_path):
    """Sending the first test image to the second image's experts moves the logits far beyond the tolerance, so a
    routing frozen at export time could not pass the comparisons above."""
    network, _, pair, _ = tiny_checkpoint("dex_seg2d", "experts", tmp_path)
    with torch.no_grad():
        routed = network(pair[:1])
        for layer in dex_layers(network):
            layer.router.gate.weight.copy_(layer.router.gate.weight[[2, 3, 0, 1]])
        swapped = network(pair[:1])
    assert float((routed - swapped).abs().max()) > 100 * TOLERANCE


@pytest.mark.slow
def test_export_commands_from_the_readme(tmp_path):
    """The two commands of the bundle README, run from the bundle folder, with tiny overrides."""
    bundle = "dex_seg2d"
    network, overrides, pair, ckpt = tiny_checkpoint(bundle, "experts", tmp_path)
    common = ["--ckpt_file", str(ckpt), "--meta_file", "configs/metadata.json", "--config_file",
              "configs/inference.json", "--input_shape", "[2,3,32,32]", *bundle_args(overrides)]
    commands = {
        "onnx": [sys.executable, "-m", "monai.bundle", "onnx_export", "network_def", "--filepath",
                 str(tmp_path / "model.onnx"), "--use_trace", "True", "--converter_kwargs", str(ONNX_KWARGS), *common],
        "pt2": [sys.executable, "-m", "dex_monai.export", "network_def", "--filepath", str(tmp_path / "model.pt2"),
                *common],
    }
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    for name, cmd in commands.items():
        proc = subprocess.run(cmd, cwd=REPO / "bundles" / bundle, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{name}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        assert "Deprecat" not in proc.stderr.replace(TORCH_INTERNAL[0], ""), proc.stderr[-3000:]
    from dex_monai.export import load_exported

    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_diff = _max_differences(lambda x: session.run(None, {"image": x.numpy()})[0], network, pair)
    pt2_diff = _max_differences(load_exported(tmp_path / "model.pt2")[0], network, pair)
    assert max(onnx_diff.values()) < TOLERANCE and max(pt2_diff.values()) < TOLERANCE, (onnx_diff, pt2_diff)


TRT_MISSING = [name for name in ("tensorrt", "polygraphy") if importlib.util.find_spec(name) is None]


def _trt_parser(bundle: str, overrides: dict):
    from monai.bundle import ConfigParser

    configs = REPO / "bundles" / bundle / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "inference.json"), str(configs / "inference_trt.json")])
    parser.update(overrides)
    return parser


@pytest.mark.parametrize("bundle", ["dex_seg2d", "dex_seg3d"])
def test_tensorrt_config_composes(bundle):
    """``inference_trt.json`` merges over ``inference.json``: its references resolve (on CPU ``trt_compile`` leaves
    the network as it is)."""
    parser = _trt_parser(bundle, {**BUNDLES[bundle][0], "sw_batch_size": 3, "device": "$torch.device('cpu')"})
    assert parser.get_parsed_content("trt_args") == {"precision": "fp16", "dynamic_batchsize": [1, 3, 3]}
    assert parser.get_parsed_content("ckpt_path").endswith("models/model.pt")
    assert "$from monai.networks import trt_compile" in parser.get("imports")
    assert type(parser.get_parsed_content("network")).__name__ == "DEXUNETR"


@pytest.mark.skipif(not torch.cuda.is_available() or bool(TRT_MISSING),
                    reason="configs/inference_trt.json compiles with TensorRT: it needs a CUDA GPU and the tensorrt "
                           f"and polygraphy packages (no CUDA: {not torch.cuda.is_available()}, missing: {TRT_MISSING})")
@pytest.mark.parametrize("bundle", ["dex_seg2d", "dex_seg3d"])
def test_tensorrt_network_matches_checkpoint(bundle, tmp_path):
    network, overrides, pair, ckpt = tiny_checkpoint(bundle, "experts", tmp_path)
    parser = _trt_parser(bundle, {**overrides, "ckpt_path": str(ckpt), "trt_precision": "fp32",
                                  "device": "$torch.device('cuda:0')"})
    compiled = parser.get_parsed_content("network")
    compiled.load_state_dict(torch.load(ckpt, weights_only=True))
    compiled.eval()
    with torch.no_grad():
        differences = {name: float((compiled(x.cuda()).cpu() - network(x)).abs().max())
                       for name, x in comparison_batches(pair).items()}
    assert Path(str(ckpt) + ".plan").is_file()
    assert max(differences.values()) < 1e-2, differences  # TensorRT may use TF32 for fp32 products
