"""Tests of dex_monai.analysis.modularity on routings whose answer is known by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dex_monai.analysis import (
    expert_usage,
    expert_usage_from_json,
    expert_usage_to_json,
    linear_probe_modality_accuracy,
    modality_expert_nmi,
    plot_expert_usage_grid,
    plot_modality_expert_heatmaps,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple[int, int]:
    """(width, height) read from the IHDR chunk of a PNG file."""
    data = open(path, "rb").read(32)
    assert data[:8] == PNG_SIGNATURE, "not a PNG file"
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _specialised_routing(n: int, n_mod: int, group: int, k: int, layers: int, seed: int = 0):
    """Modality m picks k experts at random among its own disjoint group [m*group, (m+1)*group)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, n_mod, n)
    idx = np.empty((n, layers, k), dtype=np.int64)
    for i in range(n):
        for layer in range(layers):
            idx[i, layer] = codes[i] * group + rng.choice(group, size=k, replace=False)
    names = np.array([f"mod{c}" for c in range(n_mod)])
    return idx, names[codes]


# ------------------------------------------------------------------------------------------- usage
def test_expert_usage_exact_on_tiny_case():
    # 4 images, 2 layers, top-2 of 4 experts
    idx = np.array(
        [
            [[0, 1], [2, 3]],  # CT
            [[0, 2], [2, 3]],  # CT
            [[3, 1], [0, 0]],  # MR
            [[3, 3], [1, 0]],  # MR
        ]
    )
    usage = expert_usage(idx, ["CT", "CT", "MR", "MR"], num_experts=4)
    assert list(usage) == ["CT", "MR"]
    np.testing.assert_allclose(usage["CT"], [[0.5, 0.25, 0.25, 0.0], [0.0, 0.0, 0.5, 0.5]])
    np.testing.assert_allclose(usage["MR"], [[0.0, 0.25, 0.0, 0.75], [0.75, 0.25, 0.0, 0.0]])
    for u in usage.values():
        np.testing.assert_allclose(u.sum(axis=1), 1.0)
    # same result from a torch tensor, from a list over layers and from router dictionaries
    t = torch.as_tensor(idx)
    for variant in (t, [t[:, 0], t[:, 1]], [{"indices": t[:, 0], "gates": torch.rand(4, 2)}, {"indices": t[:, 1]}]):
        again = expert_usage(variant, np.array(["CT", "CT", "MR", "MR"]), 4)
        for m in usage:
            np.testing.assert_allclose(again[m], usage[m])


def test_expert_usage_layers_with_different_expert_counts():
    layer0 = np.array([[0, 7], [1, 6], [2, 5]])  # 8 experts
    layer1 = np.array([[0], [1], [1]])  # 2 experts, top-1
    usage = expert_usage([layer0, layer1], [0, 1, 1], num_experts=[8, 2])
    assert set(usage) == {0, 1}
    assert usage[0].shape == (2, 8)
    assert np.isnan(usage[1][1, 2:]).all() and not np.isnan(usage[1][0]).any()
    np.testing.assert_allclose(np.nansum(usage[1], axis=1), 1.0)
    np.testing.assert_allclose(usage[1][1, :2], [0.0, 1.0])
    np.testing.assert_allclose(usage[1][0], [0, 0.25, 0.25, 0, 0, 0.25, 0.25, 0])


def test_expert_usage_rejects_bad_input():
    with pytest.raises(ValueError, match="only 4 experts"):
        expert_usage(np.array([[[4]]]), ["a"], 4)
    with pytest.raises(ValueError, match="labels for"):
        expert_usage(np.zeros((3, 2, 1), dtype=int), ["a", "b"], 4)
    with pytest.raises(ValueError, match="whole numbers"):
        expert_usage(np.full((2, 1, 1), 0.5), ["a", "b"], 4)
    with pytest.raises(ValueError, match="non-negative"):
        expert_usage(np.array([[[-1]]]), ["a"], 4)


def test_usage_json_round_trip():
    usage = expert_usage([np.array([[0, 1], [2, 3]]), np.array([[1], [0]])], ["CT", "MR"], [4, 2])
    record = expert_usage_to_json(usage)
    assert record["modalities"] == ["CT", "MR"]
    assert record["layers"] == 2 and record["num_experts"] == [4, 2]
    assert [len(row) for row in record["usage"]["MR"]] == [4, 2]
    back = expert_usage_from_json(record)
    for m in usage:
        np.testing.assert_array_equal(np.isnan(back[m]), np.isnan(usage[m]))
        np.testing.assert_allclose(np.nan_to_num(back[m]), np.nan_to_num(usage[m]))


# --------------------------------------------------------------------------------------------- NMI
def test_nmi_is_one_for_perfectly_specialised_experts():
    # each modality picks 2 of its own 3 experts (varying within the group): expert identifies modality
    idx, mods = _specialised_routing(n=300, n_mod=4, group=3, k=2, layers=3)
    np.testing.assert_allclose(modality_expert_nmi(idx, mods), 1.0)
    # top-1 routing with one expert per modality: every normalisation gives 1
    codes = np.unique(mods, return_inverse=True)[1]
    one = np.stack([codes * 2, codes * 2 + 1], axis=-1)[:, None, :1]
    for norm in ("modality", "arithmetic", "geometric", "min", "max"):
        np.testing.assert_allclose(modality_expert_nmi(one, mods, normalization=norm), 1.0)


def test_nmi_near_zero_for_random_routing():
    rng = np.random.default_rng(1)
    n, layers, experts, k = 20000, 4, 8, 2
    idx = np.argsort(rng.random((n, layers, experts)), axis=-1)[..., :k]
    mods = rng.choice(["CT", "MR", "XR", "US"], size=n)
    nmi = modality_expert_nmi(idx, mods)
    assert nmi.shape == (layers,)
    assert (nmi >= 0).all() and (nmi < 0.01).all(), nmi
    assert (modality_expert_nmi(idx, mods, normalization="arithmetic") < 0.01).all()


def test_nmi_arithmetic_matches_sklearn_on_expanded_choices():
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(2)
    n, k = 500, 2
    mods = rng.choice(["a", "b", "c"], size=n)
    codes = np.unique(mods, return_inverse=True)[1]
    # partly specialised: biased towards expert codes*2, otherwise random
    preferred = (codes * 2)[:, None, None] + np.arange(k)
    idx = np.where(rng.random((n, 2, k)) < 0.6, preferred, rng.integers(0, 6, (n, 2, k)))
    ours = modality_expert_nmi(torch.as_tensor(idx), mods, normalization="arithmetic")
    for layer in range(2):
        ref = normalized_mutual_info_score(np.repeat(mods, k), idx[:, layer, :].reshape(-1))
        assert ours[layer] == pytest.approx(ref, abs=1e-10)
    assert 0.05 < ours[0] < 0.95
    with pytest.raises(ValueError, match="normalization"):
        modality_expert_nmi(idx, mods, normalization="bogus")


# ------------------------------------------------------------------------------------ linear probe
def test_linear_probe_separable_versus_identical_features():
    rng = np.random.default_rng(3)
    n = 150
    mods = np.repeat(["CT", "MR", "XR"], n // 3)
    codes = np.unique(mods, return_inverse=True)[1]
    separable = rng.normal(size=(n, 8)) + 6.0 * np.eye(8)[codes]
    acc, chance = linear_probe_modality_accuracy(torch.as_tensor(separable, dtype=torch.float32), mods)
    assert acc >= 0.95
    assert chance == pytest.approx(1 / 3, abs=0.01)
    same = linear_probe_modality_accuracy(np.ones((n, 8)), mods, seed=1)
    assert same.accuracy == pytest.approx(same.chance, abs=0.1)
    assert same.accuracy < 0.5
    # chance is the majority share on unbalanced data; deterministic for a fixed seed
    unbalanced = np.array(["CT"] * 60 + ["MR"] * 20 + ["XR"] * 20)
    noise = rng.normal(size=(100, 4))
    res = linear_probe_modality_accuracy(noise, unbalanced, seed=5)
    assert res.chance == pytest.approx(0.6, abs=0.05)
    assert res == linear_probe_modality_accuracy(noise, unbalanced, seed=5)


def test_linear_probe_errors():
    with pytest.raises(ValueError, match="two modalities"):
        linear_probe_modality_accuracy(np.zeros((10, 2)), ["a"] * 10)
    with pytest.raises(ValueError, match="stratified split"):
        linear_probe_modality_accuracy(np.zeros((5, 2)), ["a", "a", "a", "a", "b"])


# ---------------------------------------------------------------------------------------- heatmaps
def test_heatmap_png_written_with_sensible_aspect(tmp_path):
    idx, mods = _specialised_routing(n=64, n_mod=4, group=2, k=2, layers=3)
    usage = expert_usage(idx, mods, num_experts=8)
    wide = plot_modality_expert_heatmaps(usage, tmp_path / "routing" / "expert_usage_epoch_1.png", title="epoch 1")
    w, h = _png_size(wide)
    assert w > 2.5 * h  # four panels side by side, each 3 layers x 8 experts

    tall = plot_modality_expert_heatmaps({"CT": np.random.rand(12, 4)}, tmp_path / "one.png")
    w, h = _png_size(tall)
    assert h > w  # one panel, 12 layers x 4 experts

    # layers with different expert counts (NaN cells) and many modalities wrapping onto rows
    ragged = expert_usage([np.array([[0, 5]] * 10), np.array([[1]] * 10)], list(range(10)), [6, 2])
    many = plot_modality_expert_heatmaps(ragged, tmp_path / "many.png", max_columns=4)
    w, h = _png_size(many)
    assert w > h > 0


def test_grid_of_runs_with_missing_modality(tmp_path):
    a = {"CT": np.eye(3, 4), "MR": np.ones((3, 4)) / 4}
    b = {"CT": [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]}  # ragged list form, fewer experts
    path = plot_expert_usage_grid({"run a": a, "run b": b}, tmp_path / "grid.png", footnote="No statistics: run c")
    w, h = _png_size(path)
    assert w > h > 0
