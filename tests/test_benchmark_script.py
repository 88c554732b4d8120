"""The step-time benchmark script runs end to end and reports consistent figures (no speed is asserted here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_dex.py"


def test_benchmark_dex_tiny_run_reports_paired_ratio_flops_and_memory():
    cmd = [sys.executable, str(SCRIPT), "--config", "tiny", "--steps", "4", "--rounds", "2", "--warmup", "1"]
    cmd += ["--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    report = json.loads(done.stdout)
    assert report["steps_timed_per_model"] == 8 and report["threads"] == 1
    for name in ("dense", "dex"):
        figures = report[name]
        assert figures["forward_backward_s"] > 0 and figures["optimizer_s"] > 0
        assert figures["median_step_s"] >= figures["forward_backward_s"]
    assert report["dex"]["trainable"] > report["dense"]["trainable"]  # experts hold more parameters than one MLP
    low, high = report["step_time_ratio_quartiles"]
    assert low <= report["step_time_ratio_dex_over_dense"] <= high
    # the DEX step does more arithmetic: top-2 experts plus the director's forward
    assert report["step_gflops"]["dex"] > report["step_gflops"]["dense"]
    flop_ratio = report["step_gflops"]["dex"] / report["step_gflops"]["dense"]
    assert report["flop_ratio_dex_over_dense"] == pytest.approx(flop_ratio, abs=2e-3)
    grouping = report["expert_layer_grouping"]
    assert grouping["spread_s"] > 0 and grouping["two_experts_s"] > 0
    assert report["target_step_time_ratio"] is None  # the 1.6 target is stated for config S only


# A stand-in for the public DEX code's models_mae_DEX (same constructor and call protocol, a few lines of torch):
# it fails loudly when the harness passes other schedule values than the package's models get.
STUB_REFERENCE = '''
import torch
import torch.nn as nn


class Block(nn.Module):  # timm's Block signature
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, norm_layer=nn.LayerNorm):
        super().__init__()
        self.fc = nn.Linear(dim, int(dim * mlp_ratio))
        self.out = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x):
        return x + self.out(torch.relu(self.fc(x)))


class DEXBlock(nn.Module):
    def __init__(self, dim, experts, mlp_ratio):
        super().__init__()
        self.experts = nn.ModuleList(Block(dim, 1, mlp_ratio) for _ in range(experts))

    def forward(self, x, m=0.999, noise_std=0.0, alpha=1.0):
        assert m == 0.99 and noise_std == 1.0, (m, noise_std)
        return self.experts[0](x), x.new_ones(()), x.new_ones(())


class MaskedAutoencoderViT(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, min_experts, max_experts, min_topk, max_topk, embed_dim,
                 depth, num_heads, decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio, norm_layer,
                 norm_pix_loss):
        super().__init__()
        self.p, self.c = patch_size, in_chans
        self.embed = nn.Linear(patch_size * patch_size * in_chans, embed_dim)
        self.blocks = nn.ModuleList(DEXBlock(embed_dim, max_experts, mlp_ratio) for _ in range(depth))
        self.pred = nn.Linear(embed_dim, patch_size * patch_size * in_chans)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)

    def forward(self, imgs, mask_ratio=0.75, m=0.999, noise_std=0.0):
        assert mask_ratio == 0.75, mask_ratio
        b = imgs.shape[0]
        patches = imgs.unfold(2, self.p, self.p).unfold(3, self.p, self.p).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, self.c * self.p ** 2)
        x = self.embed(patches)
        co, bal = [], []
        for blk in self.blocks:
            x, c, a = blk(x, m=m, noise_std=noise_std, alpha=1.0)
            co.append(c)
            bal.append(a)
        pred = self.pred(x)
        return ((pred - patches) ** 2).mean(), torch.stack(co).mean(), torch.stack(bal).mean(), pred, None
'''


def _stub_checkout(root: Path) -> Path:
    model_dir = root / "DEX_pretraining" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "__init__.py").write_text("")
    (model_dir / "models_mae_DEX.py").write_text(STUB_REFERENCE)
    return root


def test_benchmark_dex_times_the_reference_models_in_the_same_rounds(tmp_path):
    checkout = _stub_checkout(tmp_path / "dex_checkout")
    cmd = [sys.executable, str(SCRIPT), "--config", "tiny", "--steps", "4", "--rounds", "1", "--warmup", "1"]
    cmd += ["--threads", "1", "--timing-only", "--reference", str(checkout)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]  # the stub raises if m, noise_std or mask_ratio differ
    report = json.loads(done.stdout)
    for name in ("dense", "dex"):
        assert report[f"reference_{name}"]["median_step_s"] > 0
        low, high = report[f"speedup_{name}_quartiles"]
        assert low <= report[f"speedup_{name}_over_reference_{name}"] <= high
    assert report["reference_step_time_ratio_dex_over_dense"] > 0
    assert report["target_speedup_over_reference"] is None  # stated for config S on CPU and B on CUDA
    assert "step_gflops" not in report  # --timing-only


def test_reference_models_dense_twin_and_clear_error(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from reference_models import build_reference, load_reference
    finally:
        sys.path.remove(str(SCRIPT.parent))
    with pytest.raises(FileNotFoundError, match="models_mae_DEX"):
        load_reference(tmp_path)
    module = load_reference(_stub_checkout(tmp_path / "dex_checkout"))
    config = dict(img_size=16, patch_size=8, hidden_size=8, mlp_dim=16, num_layers=3, num_heads=2, num_experts=4,
                  top_k=2, decoder_hidden_size=4, decoder_mlp_dim=8, decoder_num_layers=1, decoder_num_heads=2)
    dex = build_reference(module, config, dense=False)
    dense = build_reference(module, config, dense=True)
    assert all(isinstance(blk, module.DEXBlock) for blk in dex.blocks)
    assert all(isinstance(blk.block, module.Block) for blk in dense.blocks)
    # per block: 4 experts of 8*16+16 + 16*8+8 parameters against one such MLP
    mlp = 8 * 16 + 16 + 16 * 8 + 8
    assert sum(p.numel() for p in dex.parameters()) - sum(p.numel() for p in dense.parameters()) == 3 * 3 * mlp
    images = torch.rand(2, 3, 16, 16)
    _, _, balance, _, _ = dense(images, mask_ratio=0.75, m=0.99, noise_std=1.0)
    assert balance.item() == 0.0  # the dense blocks add no auxiliary losses
    with pytest.raises(ValueError, match="mlp_ratio"):
        build_reference(module, config | {"decoder_mlp_dim": 12}, dense=False)


def test_real_reference_checkout_builds_and_steps():
    """With ``DEX_REFERENCE_DIR`` (a checkout of YutingHe-list/DEX) and timm importable: both reference models step."""
    folder = os.environ.get("DEX_REFERENCE_DIR")
    if not folder:
        pytest.skip("set DEX_REFERENCE_DIR to a checkout of the public DEX code (and make timm importable)")
    pytest.importorskip("timm")
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from benchmark_dex import CONFIGS, builders, train_step
        from reference_models import load_reference
    finally:
        sys.path.remove(str(SCRIPT.parent))
    config = CONFIGS["tiny"]
    makers = builders(config, torch.device("cpu"), load_reference(folder))
    images = torch.rand(config["batch"], 3, config["img_size"], config["img_size"])
    counts = {}
    for name in ("reference_dense", "reference_dex"):
        model, optimizer, losses = makers[name]()
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        train_step(model, optimizer, images, False, losses)
        after = [p for p in model.parameters() if p.requires_grad]
        assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the optimiser stepped
        counts[name] = sum(p.numel() for p in after)
    # same dimensions: the reference models train exactly as many parameters as this package's
    for name in ("dense", "dex"):
        package_model = makers[name]()[0]
        assert counts[f"reference_{name}"] == sum(p.numel() for p in package_model.parameters() if p.requires_grad)
    assert counts["reference_dense"] < counts["reference_dex"]


def test_compile_option_compiles_only_this_package_models(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from benchmark_dex import CONFIGS, builders
        from reference_models import load_reference
    finally:
        sys.path.remove(str(SCRIPT.parent))
    config = CONFIGS["tiny"]
    reference = load_reference(_stub_checkout(tmp_path / "dex_checkout"))
    for compile_model in (False, True):
        makers = builders(config, torch.device("cpu"), reference, compile_model=compile_model)
        models = {name: make()[0] for name, make in makers.items()}
        for name, model in models.items():
            compiled = getattr(model, "_compiled_call_impl", None) is not None
            assert compiled == (compile_model and not name.startswith("reference_")), name
        # compiled in place: the state-dict names a checkpoint would carry are the eager model's
        assert not any(key.startswith("_orig_mod") for key in models["dex"].state_dict())
