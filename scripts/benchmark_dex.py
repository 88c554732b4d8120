#!/usr/bin/env python
"""Pre-training step time and peak memory of DEX MAE against a dense MAE of the same dimensions.

Both models are built from the same code (the dense one has plain MLPs instead of DEX layers) and run in this
process on the same random batch, in pairs of back-to-back steps (order alternating), so that the drifting speed
of a shared machine falls on both alike. A step is forward (including the GEMA update), backward and an AdamW step
(``fused=True``, on CPU and CUDA). Prints one JSON object: median step times (split into forward + backward and
optimiser), ``step_time_ratio_dex_over_dense`` (the median over pairs of DEX step / dense step; its quartiles, the
ratio of the medians and of the fastest steps show the noise), images/s, peak memory, and the FLOPs of a step
counted by ``torch.utils.flop_counter`` (so the time ratio can be read against the arithmetic ratio).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak resident-set growth above the level
before the model was built, sampled every millisecond in a separate pass (so the sampler does not slow the timed
steps; ``malloc_trim`` between runs so freed memory is returned).

With ``--reference DIR`` (a checkout of the public DEX code, GitHub YutingHe-list/DEX, in an environment where
``timm`` imports; nothing of it is copied here) the reference DEX MAE and its dense twin are built with the same
dimensions and timed in the same round-robin; the report adds their step times and the paired speed-ups
``speedup_dex_over_reference_dex`` (median over rounds of reference DEX step / this package's DEX step) and
``speedup_dense_over_reference_dense``.

Examples::

    python scripts/benchmark_dex.py --config S
    python scripts/benchmark_dex.py --config S --threads 2 --reference /path/to/DEX
    python scripts/benchmark_dex.py --config B --device cuda --bf16 --reference /path/to/DEX
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from functools import partial

import torch

from dex_monai.networks import DEXMaskedAutoEncoder

CONFIGS = {
    "S": dict(
        img_size=64, patch_size=8, hidden_size=192, mlp_dim=768, num_layers=6, num_heads=3, num_experts=8, top_k=2,
        decoder_hidden_size=128, decoder_mlp_dim=512, decoder_num_layers=2, decoder_num_heads=4, batch=32,
    ),
    "tiny": dict(  # a seconds-long smoke run (tests), not a benchmark
        img_size=32, patch_size=8, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2, num_experts=4, top_k=2,
        decoder_hidden_size=16, decoder_mlp_dim=32, decoder_num_layers=1, decoder_num_heads=2, batch=4,
    ),
    "B": dict(
        img_size=224, patch_size=16, hidden_size=768, mlp_dim=3072, num_layers=12, num_heads=12, num_experts=8,
        top_k=2, decoder_hidden_size=512, decoder_mlp_dim=2048, decoder_num_layers=8, decoder_num_heads=16, batch=8,
    ),
}


MASKING_RATIO = 0.75
GEMA_MOMENTUM = 0.99
NOISE_STD = 1.0


class PeakRSS:
    """Samples this process's resident set size in a thread; reports the peak growth in MiB."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.base = self.rss()
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


def _with_optimizer(model: torch.nn.Module, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1.5e-4, weight_decay=0.05, fused=True)


def build(
    config: dict, dense: bool, device: torch.device, compile_model: bool = False
) -> tuple[DEXMaskedAutoEncoder, torch.optim.Optimizer]:
    kwargs = {k: v for k, v in config.items() if k != "batch"}
    model = DEXMaskedAutoEncoder(in_channels=3, spatial_dims=2, masking_ratio=MASKING_RATIO, dense=dense, **kwargs)
    model.set_schedule_values(gema_momentum=GEMA_MOMENTUM, noise_std=NOISE_STD)
    model, optimizer = _with_optimizer(model, device)
    if compile_model:
        model.compile()  # in place: parameters and state-dict names stay those of the eager model
    return model, optimizer


def builders(
    config: dict, device: torch.device, reference=None, compile_model: bool = False
) -> dict[str, Callable]:
    """Name -> a function building ``(model, optimizer, losses)``; the reference models when ``reference`` is given.

    Args:
        reference: the imported reference ``models_mae_DEX`` (see ``reference_models.load_reference``) or None.
        compile_model: ``torch.compile`` this package's models (the reference models stay eager, as published).
    """
    made = {
        name: partial(lambda dense: (*build(config, dense, device, compile_model), package_losses), name == "dense")
        for name in ("dense", "dex")
    }
    if reference is not None:
        from reference_models import build_reference, reference_losses

        losses = partial(reference_losses, masking_ratio=MASKING_RATIO, momentum=GEMA_MOMENTUM, noise_std=NOISE_STD)
        for name in ("dense", "dex"):
            made[f"reference_{name}"] = partial(
                lambda dense: (*_with_optimizer(build_reference(reference, config, dense), device), losses),
                name == "dense",
            )
    return made


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def package_losses(model: DEXMaskedAutoEncoder, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """This package's forward (GEMA included): ``(mae, alignment, balance)`` scalar losses."""
    _, out = model(images)
    return out["mae"], out["alignment"], out["balance"]


def train_step(model, optimizer, images, bf16: bool, losses: Callable = package_losses) -> tuple[float, float]:
    """One pre-training step; returns (seconds of forward + backward, seconds of the optimiser step)."""
    start = _now(images.device)
    with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=bf16):
        mae, alignment, balance = losses(model, images)
        loss = mae + 0.1 * alignment + 0.01 * balance
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    middle = _now(images.device)
    optimizer.step()
    return middle - start, _now(images.device) - middle


def time_round(makers: dict[str, Callable], config: dict, device: torch.device, steps: int, warmup: int, bf16: bool,
               seed: int):
    """Times ``steps`` rounds of one step of each freshly built model, all on the same batch.

    The models of a round step back to back, their order rotating from round to round, so that slow drifts of
    the machine's speed fall on all alike. No sampler thread runs meanwhile.

    Returns:
        ``{name: [(forward + backward s, optimiser s), ...]}`` (index i of every list: round i) and the parameter
        counts of the models.
    """
    release_memory(device)
    torch.manual_seed(seed)
    batch = torch.rand(config["batch"], 3, config["img_size"], config["img_size"], device=device)
    models = {name: make() for name, make in makers.items()}
    names = list(models)
    for _ in range(warmup):
        for model, optimizer, losses in models.values():
            train_step(model, optimizer, batch, bf16, losses)
    times: dict[str, list] = {name: [] for name in names}
    for step in range(steps):
        shift = step % len(names)
        for name in names[shift:] + names[:shift]:
            model, optimizer, losses = models[name]
            times[name].append(train_step(model, optimizer, batch, bf16, losses))
    info = {
        name: {
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
        for name, (model, _, _) in models.items()
    }
    del models
    release_memory(device)
    return times, info


def expert_grouping_cost(config: dict, device: torch.device, repeats: int = 40) -> dict:
    """Forward + backward time of one layer's experts for the same routed rows split two ways.

    ``spread``: the batch's images spread over all experts (as routing does, about batch * top_k / experts images per
    expert); ``two_experts``: the same number of (image, expert) pairs on two experts only. Same arithmetic, fewer
    and larger matrix products; the ratio is what smaller per-expert products cost on this device.
    """
    from dex_monai.networks.blocks.dex_layer import StackedExpertMLP

    torch.manual_seed(0)
    batch, top_k, num_experts = config["batch"], config["top_k"], config["num_experts"]
    visible = max(1, int((config["img_size"] // config["patch_size"]) ** 2 * (1.0 - MASKING_RATIO)))
    tokens = 1 + visible  # CLS + the patches the encoder sees
    experts = StackedExpertMLP(num_experts, config["hidden_size"], config["mlp_dim"]).to(device)
    units = torch.randn(batch, tokens, config["hidden_size"], device=device, requires_grad=True)
    gates = torch.full((batch, top_k), 1.0 / top_k, device=device)
    spread = torch.stack([(torch.arange(top_k) + i * top_k) % num_experts for i in range(batch)]).to(device)
    layouts = {"spread": spread, "two_experts": torch.stack([torch.arange(top_k)] * batch).to(device)}
    times: dict[str, list] = {name: [] for name in layouts}
    for repeat in range(repeats + 2):
        for name, indices in layouts.items():
            experts.zero_grad(set_to_none=True)  # as in a training step: no accumulation into earlier gradients
            units.grad = None
            start = _now(device)
            experts(units, gates, indices).square().mean().backward()
            if repeat >= 2:
                times[name].append(_now(device) - start)
    medians = {f"{name}_s": round(statistics.median(values), 5) for name, values in times.items()}
    pair_ratios = [a / b for a, b in zip(times["spread"], times["two_experts"])]
    return medians | {"ratio_spread_over_two_experts": round(statistics.median(pair_ratios), 3)}


def step_flops(config: dict, dense: bool, device: torch.device, bf16: bool) -> float:
    """Floating-point operations of one training step (forward, backward; matrix products and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = torch.rand(config["batch"], 3, config["img_size"], config["img_size"], device=device)
    model, optimizer = build(config, dense, device)
    train_step(model, optimizer, batch, bf16)
    with FlopCounterMode(display=False) as counter:
        train_step(model, optimizer, batch, bf16)
    del model, optimizer
    release_memory(device)
    return float(counter.get_total_flops())


def peak_memory(config: dict, dense: bool, device: torch.device, bf16: bool, steps: int = 2) -> float:
    """Peak memory (MiB) of building the model and running a few training steps."""
    release_memory(device)
    batch = torch.rand(config["batch"], 3, config["img_size"], config["img_size"], device=device)
    with PeakRSS() as rss:
        model, optimizer = build(config, dense, device)
        for _ in range(steps):
            train_step(model, optimizer, batch, bf16)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else rss.peak_mib
    del model, optimizer
    release_memory(device)
    return round(peak, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="S")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of every model per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of freshly built models; medians over all rounds")
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--reference", default=None, help="checkout of the public DEX code: time its models too")
    parser.add_argument("--timing-only", action="store_true", help="skip peak memory, FLOPs and expert grouping")
    parser.add_argument("--batch", type=int, default=0, help="images per step (0: the configuration's)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile this package's models (compiled during the warm-up steps)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = CONFIGS[args.config] | ({"batch": args.batch} if args.batch else {})
    reference = None
    if args.reference:
        from reference_models import load_reference

        reference = load_reference(args.reference)
    makers = builders(config, device, reference, args.compile)
    runs: dict[str, list] = {name: [] for name in makers}
    info: dict[str, dict] = {}
    for round_index in range(args.rounds):
        times, info = time_round(makers, config, device, args.steps, args.warmup, args.bf16, seed=round_index)
        for name in runs:
            runs[name] += times[name]
    steps = {name: [sum(parts) for parts in runs[name]] for name in runs}
    phases = {
        name: {
            "forward_backward_s": round(statistics.median(p[0] for p in runs[name]), 5),
            "optimizer_s": round(statistics.median(p[1] for p in runs[name]), 5),
        }
        for name in runs
    }
    dense_step = statistics.median(steps["dense"])
    dex_step = statistics.median(steps["dex"])
    pair_ratios = [dex / dense for dex, dense in zip(steps["dex"], steps["dense"])]
    quartiles = statistics.quantiles(pair_ratios, n=4)
    is_target_setting = (args.config, device.type) in (("S", "cpu"), ("B", "cuda"))
    report = {
        "config": args.config,
        "settings": config,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "bf16": args.bf16,
        "compiled": args.compile,
        "steps_timed_per_model": len(steps["dex"]),
        "dense": {
            "median_step_s": round(dense_step, 5),
            **phases["dense"],
            "images_per_s": round(config["batch"] / dense_step, 2),
            **info["dense"],
        },
        "dex": {
            "median_step_s": round(dex_step, 5),
            **phases["dex"],
            "images_per_s": round(config["batch"] / dex_step, 2),
            **info["dex"],
        },
        "step_time_ratio_dex_over_dense": round(statistics.median(pair_ratios), 3),
        "step_time_ratio_quartiles": [round(quartiles[0], 3), round(quartiles[2], 3)],
        "step_time_ratio_of_medians": round(dex_step / dense_step, 3),
        "step_time_ratio_of_fastest_steps": round(min(steps["dex"]) / min(steps["dense"]), 3),
        "phase_ratios_dex_over_dense": {
            phase: round(phases["dex"][phase] / phases["dense"][phase], 3)
            for phase in ("forward_backward_s", "optimizer_s")
        },
        "target_step_time_ratio": 1.6 if is_target_setting else None,
    }
    if reference is not None:
        report |= reference_figures(steps, config["batch"])
        report["target_speedup_over_reference"] = 1.25 if is_target_setting else None
    if not args.timing_only:
        peaks = {name: peak_memory(config, name == "dense", device, args.bf16) for name in ("dense", "dex")}
        flops = {name: step_flops(config, name == "dense", device, args.bf16) for name in ("dense", "dex")}
        for name in ("dense", "dex"):
            report[name]["peak_memory_mib"] = peaks[name]
        report |= {
            "expert_layer_grouping": expert_grouping_cost(config, device),
            "step_gflops": {name: round(value / 1e9, 6) for name, value in flops.items()},
            "flop_ratio_dex_over_dense": round(flops["dex"] / flops["dense"], 3),
            "peak_memory_ratio_dex_over_dense": round(peaks["dex"] / max(peaks["dense"], 1e-9), 3),
        }
    print(json.dumps(report, indent=2))


def reference_figures(steps: dict[str, list[float]], batch: int) -> dict:
    """Step times of the reference models and paired speed-ups (step i of every model ran in the same round)."""
    figures: dict = {}
    for name in ("dense", "dex"):
        ref = steps[f"reference_{name}"]
        figures[f"reference_{name}"] = {
            "median_step_s": round(statistics.median(ref), 5),
            "images_per_s": round(batch / statistics.median(ref), 2),
        }
        speedups = [r / own for r, own in zip(ref, steps[name])]
        quartiles = statistics.quantiles(speedups, n=4)
        figures[f"speedup_{name}_over_reference_{name}"] = round(statistics.median(speedups), 3)
        figures[f"speedup_{name}_quartiles"] = [round(quartiles[0], 3), round(quartiles[2], 3)]
    ratios = [d / s for d, s in zip(steps["reference_dex"], steps["reference_dense"])]
    figures["reference_step_time_ratio_dex_over_dense"] = round(statistics.median(ratios), 3)
    return figures


if __name__ == "__main__":
    main()
