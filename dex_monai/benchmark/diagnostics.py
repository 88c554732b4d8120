# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Collapse diagnostics of a pre-trained encoder, the same numbers for DEX and for the dense MAE:

* ``routing_nmi`` (routed encoders only): per layer NMI(modality; expert) of the top-k experts every image chose
  (:func:`~dex_monai.analysis.modality_expert_nmi`), and the expert-by-modality usage behind the heatmaps;
* ``cluster_nmi`` (every encoder): a dense encoder has no experts, so its "experts" are defined as the ``E`` clusters
  (k-means, ``E`` = the DEX expert count, fixed seed) of the images' layer features (mean of the patch tokens after
  the block); per layer NMI(modality; cluster) and the cluster-by-modality usage. Computed for DEX too, so both are
  compared on one definition;
* ``effective_rank`` per modality of the final features: ``exp(H(p))`` with ``p`` the normalised singular values of the
  centred features (Roy & Vetterli 2007) -- a collapsed representation has a low rank;
* ``modality_cka``: linear CKA between the final features and the one-hot modality labels (Kornblith et al. 2019),
  1 when the features' geometry is the modality alone, 0 when it carries none of it -- "collapse toward modality
  shortcuts" as a number.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dex_monai.analysis import expert_usage, modality_expert_nmi

__all__ = ["effective_rank", "encoder_diagnostics", "kmeans", "layer_features_and_routes", "linear_cka"]


def layer_features_and_routes(
    encoder: torch.nn.Module, images: torch.Tensor, batch: int = 64, device: str = "cpu"
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Per layer the mean patch token of every image ``[N, D]``, per DEX layer the chosen experts ``[N, K]`` (empty
    list for a dense encoder), and the final normed mean patch token ``[N, D]``."""
    encoder.eval()
    layers = encoder.dex_layers() if hasattr(encoder, "dex_layers") else []
    feats: list[list[torch.Tensor]] = [[] for _ in encoder.blocks]
    routes: list[list[torch.Tensor]] = [[] for _ in layers]
    final = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch):
            tokens, hidden = encoder(images[i : i + batch].to(device))
            final.append(tokens[:, 1:].mean(1).float().cpu())
            for record, h in zip(feats, hidden):
                record.append(h[:, 1:].mean(1).float().cpu())
            for record, layer in zip(routes, layers):
                record.append(layer.routing["indices"].cpu())
    return ([torch.cat(f).numpy() for f in feats], [torch.cat(r).numpy() for r in routes], torch.cat(final).numpy())


def kmeans(x: np.ndarray, k: int, seed: int = 0, iterations: int = 50) -> np.ndarray:
    """Cluster id ``[N]`` of every row of ``x`` ``[N, D]`` (standardised per feature) by k-means (scikit-learn,
    ``n_init=4``, fixed seed)."""
    from sklearn.cluster import KMeans

    z = (x - x.mean(0)) / (x.std(0) + 1e-8)
    return KMeans(n_clusters=k, n_init=4, max_iter=iterations, random_state=seed).fit_predict(z)


def effective_rank(x: np.ndarray) -> float:
    """``exp(-sum p log p)`` of the normalised singular values ``p`` of the centred ``x`` ``[N, D]``; in ``[1, min(N, D)]``."""
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of ``x`` ``[N, D1]`` and ``y`` ``[N, D2]``: ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    cross = np.linalg.norm(yc.T @ xc) ** 2
    return float(cross / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)))


def encoder_diagnostics(
    encoder: torch.nn.Module, images: torch.Tensor, modalities: Sequence[str], num_clusters: int, seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Every diagnostic of the module docstring for one encoder on ``images`` ``[N, 3, S, S]`` of ``modalities`` ``[N]``.

    Returns a JSON-ready dict: ``cluster_nmi`` ``[L]``, ``cluster_usage`` ``{modality: [L, E]}``, ``effective_rank``
    ``{modality: float}``, ``modality_cka``, and for routed encoders ``routing_nmi`` ``[L]`` and ``routing_usage``.
    """
    feats, routes, final = layer_features_and_routes(encoder, images, device=device)
    names = sorted(set(modalities))
    clusters = [kmeans(f, num_clusters, seed)[:, None] for f in feats]
    result = {
        "cluster_nmi": [float(v) for v in modality_expert_nmi(clusters, list(modalities), num_experts=num_clusters)],
        "cluster_usage": {m: u.tolist() for m, u in expert_usage(clusters, list(modalities), num_clusters).items()},
        "effective_rank": {m: effective_rank(final[[i for i, n in enumerate(modalities) if n == m]]) for m in names},
        "modality_cka": linear_cka(final, np.eye(len(names))[[names.index(m) for m in modalities]]),
    }
    if routes:
        experts = [int(layer.num_experts) for layer in encoder.dex_layers()]
        result["routing_nmi"] = [float(v) for v in modality_expert_nmi(routes, list(modalities), num_experts=experts)]
        result["routing_usage"] = {m: np.nan_to_num(u).tolist()
                                   for m, u in expert_usage(routes, list(modalities), experts).items()}
    return result
