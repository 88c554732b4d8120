"""Helpers of the export tests: a tiny bundle network with distinct experts and routing forced apart per image."""

from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ENCODER = {"hidden_size": 48, "mlp_dim": 96, "num_layers": 2, "num_heads": 2, "num_experts": 4, "top_k": 2}
#: per bundle: the tiny overrides of its network and the shape ``[1, C, *roi]`` of one input
BUNDLES = {
    "dex_seg3d": ({"roi_size": [32, 32, 32], "patch_size": 16, "feature_size": 8, **ENCODER}, [1, 1, 32, 32, 32]),
    "dex_seg2d": ({"roi_size": [32, 32], "patch_size": 16, "feature_size": 8, **ENCODER}, [1, 3, 32, 32]),
    "dex_classification": ({"img_side": 32, "patch_size": 16, **ENCODER}, [1, 3, 32, 32]),
}
#: the group of experts (top_k = 2 of 4) that image 0 and image 1 of the test pair are forced to
GROUPS = ({0, 1}, {2, 3})


def build_network(bundle: str, overrides: dict) -> torch.nn.Module:
    """``network_def`` of the bundle's inference config with ``overrides``, in eval mode."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "inference.json"))
    parser.update(overrides)
    return parser.get_parsed_content("network_def").eval()


def dex_layers(network: torch.nn.Module) -> list:
    from dex_monai.networks.blocks.dex_layer import DEXLayer

    return [m for m in network.modules() if isinstance(m, DEXLayer)]


@torch.no_grad()
def make_experts_distinct(network: torch.nn.Module, seed: int = 0) -> None:
    """Experts start as copies of the director; perturb each so that the routing decision changes the output."""
    generator = torch.Generator().manual_seed(seed)
    for layer in dex_layers(network):
        for weight in (layer.experts.linear1_weight, layer.experts.linear2_weight):
            weight.add_(torch.randn(weight.shape, generator=generator) * weight.std())


@torch.no_grad()
def force_routing_apart(network: torch.nn.Module, pair: torch.Tensor, margin: float = 4.0) -> None:
    """Set every router's gate so that ``pair[0]`` chooses experts ``GROUPS[0]`` and ``pair[1]`` ``GROUPS[1]``.

    Layer by layer (a router changes nothing upstream of it), with ``a, b`` the two CLS tokens the router sees, a
    vector ``v`` in their span with ``v.a = margin`` and ``v.b = -margin`` is solved for; the gate rows are
    ``[v, 0.8 v, -v, -0.8 v] / 2``, so the logits of image 0 rank experts 0, 1 first and those of image 1 experts 2, 3.
    """
    for layer in dex_layers(network):
        seen = {}
        handle = layer.router.register_forward_pre_hook(lambda _m, args: seen.update(cls=args[0][:, 0].double()))
        network(pair)
        handle.remove()
        a, b = seen["cls"]
        gram = torch.stack([torch.stack([a @ a, a @ b]), torch.stack([a @ b, b @ b])])
        coef = torch.linalg.solve(gram, torch.tensor([margin, -margin], dtype=torch.float64))
        v = coef[0] * a + coef[1] * b
        layer.router.gate.weight.copy_((torch.stack([v, 0.8 * v, -v, -0.8 * v]) / 2).float())


def routed_groups(network: torch.nn.Module, images: torch.Tensor) -> list[list[set[int]]]:
    """Per DEX layer, the set of experts each image chose in an eager forward."""
    with torch.no_grad():
        network(images)
    return [[set(row.tolist()) for row in layer.routing["indices"]] for layer in dex_layers(network)]


def tiny_checkpoint(bundle: str, mode: str, folder: Path) -> tuple[torch.nn.Module, dict, torch.Tensor, Path]:
    """A tiny ``network_def`` of ``bundle`` in fine-tuning ``mode`` with distinct experts, and, in experts mode,
    routing forced apart for a pair of random images of the bundle's ROI. Its state dict is saved to
    ``folder/model.pt``.

    Returns:
        the network, the config overrides that rebuild it, the pair ``[2, C, *roi]``, the checkpoint path.
    """
    torch.manual_seed(0)
    overrides = {**BUNDLES[bundle][0], "finetune_mode": mode, "bundle_root": str(folder)}
    network = build_network(bundle, overrides)
    make_experts_distinct(network)
    shape = BUNDLES[bundle][1]
    pair = torch.cat([torch.rand(*shape), 2.0 * torch.rand(*shape) - 0.5])
    if mode == "experts":
        force_routing_apart(network, pair)
        assert routed_groups(network, pair) == [list(GROUPS)] * len(dex_layers(network))
    ckpt = folder / "model.pt"
    torch.save(network.state_dict(), ckpt)
    return network, overrides, pair, ckpt


def comparison_batches(pair: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batches of 1 and 2 images: each image alone, the pair, the pair reversed."""
    return {"first": pair[:1], "second": pair[1:], "pair": pair, "reversed": pair.flip(0)}
