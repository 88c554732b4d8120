# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""
Emergent-modularity measurements for mixture-of-experts routings.

Everything here is a pure function of arrays (NumPy arrays, PyTorch tensors or nested sequences);
nothing depends on the network classes, and PyTorch is never imported (tensors are recognised by
their ``detach``/``cpu`` methods).

Vocabulary used in the docstrings:

* ``N`` images, ``L`` MoE layers, ``K`` experts chosen per image (top-k), ``E_l`` experts in layer ``l``
  and ``E_max = max_l E_l``; ``M`` distinct modalities.
* A *routing* is given either as one integer array ``[N, L, K]`` (``[N, L]`` is read as ``K = 1``), or
  as a list over layers of integer arrays ``[N, K]`` (``[N]`` is read as ``K = 1``; extra trailing
  dimensions, e.g. token routings ``[N, T, K]``, are flattened into the choices of each image).  A
  list entry may also be the router output dictionary ``{"indices": ..., "gates": ...}`` of a
  ``DEXLayer``, so ``out["routing"]`` of the network can be passed after concatenating the batches.
  Use the list form when the layers have different expert counts.
* Each of the choices of an image counts as one observation of the pair (modality, expert): with
  top-2 routing, an image contributes two observations per layer.  :func:`expert_usage` and
  :func:`modality_expert_nmi` are computed from the same modality x expert count table, so the
  heatmap drawn from the usage and the NMI always describe the same statistics.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple, Union

import numpy as np

__all__ = [
    "LinearProbeResult",
    "NMI_NORMALIZATIONS",
    "count_table_nmi",
    "expert_usage",
    "expert_usage_from_json",
    "expert_usage_to_json",
    "linear_probe_modality_accuracy",
    "modality_expert_counts",
    "modality_expert_nmi",
    "normalized_entropy",
]

ArrayLike = Union[np.ndarray, Sequence, Any]
"""NumPy array, PyTorch tensor or (nested) sequence of numbers."""

NMI_NORMALIZATIONS = ("modality", "arithmetic", "geometric", "min", "max")
"""Accepted values of ``normalization`` in :func:`modality_expert_nmi`."""


# ----------------------------------------------------------------------------------------------
# input conversion
# ----------------------------------------------------------------------------------------------
def _to_numpy(x: ArrayLike) -> np.ndarray:
    """Converts a tensor (without importing torch), an array or a nested sequence to a NumPy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu") and hasattr(x, "numpy"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_index_array(x: ArrayLike, what: str) -> np.ndarray:
    """Integer array of expert indices; floats are accepted only when they hold whole numbers."""
    arr = _to_numpy(x)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{what}: expert indices must be integers, got dtype {arr.dtype}.")
    if not np.issubdtype(arr.dtype, np.integer):
        if arr.size and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
            raise ValueError(f"{what}: expert indices must be whole numbers.")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{what}: expert indices must be non-negative, found {int(arr.min())}.")
    return arr


def _layer_indices(expert_indices: ArrayLike | Sequence[ArrayLike]) -> list[np.ndarray]:
    """
    Normalises a routing to a list over layers of int64 arrays ``[N, C_l]`` (``C_l`` choices per image).

    Args:
        expert_indices: ``[N, L, K]`` / ``[N, L]`` array or tensor, or a list over layers of ``[N, ...]``
            arrays (or router dictionaries holding them under ``"indices"``).
    """
    if isinstance(expert_indices, (list, tuple)):
        if len(expert_indices) == 0:
            raise ValueError("expert_indices: the list of layers is empty.")
        layers = []
        for i, item in enumerate(expert_indices):
            if isinstance(item, Mapping):
                if "indices" not in item:
                    raise ValueError(f"expert_indices[{i}]: a router dictionary needs an 'indices' entry.")
                item = item["indices"]
            arr = _as_index_array(item, f"expert_indices[{i}]")
            if arr.ndim == 0:
                raise ValueError(f"expert_indices[{i}]: expected an array [N, K], got a scalar.")
            layers.append(arr.reshape(arr.shape[0], -1))
        return layers
    arr = _as_index_array(expert_indices, "expert_indices")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(
            f"expert_indices: expected an array [N, L, K] (or [N, L]), got shape {tuple(arr.shape)}; "
            "pass a list over layers for ragged routings."
        )
    return [arr[:, layer, :] for layer in range(arr.shape[1])]


def _modality_codes(modalities: ArrayLike, n: int | None = None) -> tuple[list[Hashable], np.ndarray]:
    """
    Sorted distinct modality labels and the code ``[N]`` of every image (index into the labels).
    """
    arr = _to_numpy(modalities)
    if arr.ndim != 1:
        raise ValueError(f"modalities: expected a 1-D array of labels [N], got shape {tuple(arr.shape)}.")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"modalities: {arr.shape[0]} labels for {n} images.")
    if arr.shape[0] == 0:
        raise ValueError("modalities: no images.")
    try:
        labels, codes = np.unique(arr, return_inverse=True)
    except TypeError as e:  # mixed, unorderable label types
        raise ValueError(f"modalities: labels must be of one sortable type ({e}).") from e
    return [lab.item() if isinstance(lab, np.generic) else lab for lab in labels], codes.reshape(-1)


def _resolve_num_experts(num_experts: int | Sequence[int] | None, layers: list[np.ndarray]) -> list[int]:
    """Expert count of every layer; ``None`` infers ``max index + 1`` per layer."""
    n_layers = len(layers)
    if num_experts is None:
        counts = [int(layer.max()) + 1 if layer.size else 1 for layer in layers]
    elif isinstance(num_experts, (int, np.integer)):
        counts = [int(num_experts)] * n_layers
    else:
        counts = [int(e) for e in _to_numpy(num_experts).reshape(-1)]
        if len(counts) != n_layers:
            raise ValueError(f"num_experts: {len(counts)} counts given for {n_layers} layers.")
    for layer, (idx, e) in enumerate(zip(layers, counts)):
        if e < 1:
            raise ValueError(f"num_experts: layer {layer} has {e} experts.")
        if idx.size and int(idx.max()) >= e:
            raise ValueError(f"expert_indices: layer {layer} uses expert {int(idx.max())} but has only {e} experts.")
    return counts


def modality_expert_counts(
    expert_indices: ArrayLike | Sequence[ArrayLike],
    modalities: ArrayLike,
    num_experts: int | Sequence[int] | None = None,
) -> tuple[list[Hashable], list[int], list[np.ndarray]]:
    """
    Modality x expert count table of every layer.

    Returns:
        ``(labels, num_experts, tables)`` with ``tables[l]`` of shape ``[M, E_l]``: how often images of
        modality ``m`` chose expert ``e`` in layer ``l`` (each of the K choices counted once).
    """
    layers = _layer_indices(expert_indices)
    n = layers[0].shape[0]
    for i, layer in enumerate(layers):
        if layer.shape[0] != n:
            raise ValueError(f"expert_indices: layer {i} has {layer.shape[0]} images, layer 0 has {n}.")
    labels, codes = _modality_codes(modalities, n)
    counts = _resolve_num_experts(num_experts, layers)
    n_mod = len(labels)
    tables = []
    for idx, e in zip(layers, counts):
        flat = (codes[:, None] * e + idx).reshape(-1)
        tables.append(np.bincount(flat, minlength=n_mod * e).reshape(n_mod, e).astype(np.float64))
    return labels, counts, tables


# ----------------------------------------------------------------------------------------------
# expert usage
# ----------------------------------------------------------------------------------------------
def expert_usage(
    expert_indices: ArrayLike | Sequence[ArrayLike],
    modalities: ArrayLike,
    num_experts: int | Sequence[int] | None = None,
) -> dict[Hashable, np.ndarray]:
    """
    Fraction of the expert selections that went to each expert, per modality and layer.

    Args:
        expert_indices: the experts every image chose: ``[N, L, K]`` (``[N, L]`` means ``K = 1``), or a
            list over layers of ``[N, K]`` arrays (needed when layers have different expert counts).
        modalities: modality label of every image, ``[N]`` (strings or integers).
        num_experts: experts per layer, one int for all layers or a sequence ``[L]``; ``None`` infers
            ``max index + 1`` per layer (an expert that nobody chose beyond that is then invisible,
            so pass the real counts when they are known).

    Returns:
        ``{modality: usage}`` in sorted modality order, ``usage`` of shape ``[L, E_max]`` (float64):
        ``usage[l, e]`` is the share of the modality's layer-``l`` selections made to expert ``e``.
        Every row sums to 1 over the layer's ``E_l`` experts; the cells ``e >= E_l`` of layers with
        fewer experts are NaN (drawn as masked cells by :func:`plot_modality_expert_heatmaps`).

    Raises:
        ValueError: inconsistent shapes, negative or out-of-range indices, non-integer indices.
    """
    labels, counts, tables = modality_expert_counts(expert_indices, modalities, num_experts)
    e_max = max(counts)
    usage: dict[Hashable, np.ndarray] = {}
    for m, label in enumerate(labels):
        out = np.full((len(tables), e_max), np.nan, dtype=np.float64)
        for layer, table in enumerate(tables):
            row = table[m]
            total = row.sum()
            out[layer, : row.shape[0]] = row / total if total > 0 else 0.0
        usage[label] = out
    return usage


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _nmi_from_table(table: np.ndarray, normalization: str) -> float:
    """Normalised mutual information of the two variables of a count table (rows x columns)."""
    total = table.sum()
    if total <= 0:
        return float("nan")
    p = table / total
    p_row, p_col = p.sum(axis=1), p.sum(axis=0)
    h_row, h_col = _entropy(p_row), _entropy(p_col)
    if h_row == 0.0 and h_col == 0.0:
        # both variables constant: identical partitions (the convention of sklearn)
        return 1.0
    nz = p > 0
    mi = float((p[nz] * (np.log(p[nz]) - np.log(np.outer(p_row, p_col)[nz]))).sum())
    if mi <= 1e-15:
        return 0.0
    if normalization == "modality":
        norm = h_row
    elif normalization == "arithmetic":
        norm = 0.5 * (h_row + h_col)
    elif normalization == "geometric":
        norm = math.sqrt(h_row * h_col)
    elif normalization == "min":
        norm = min(h_row, h_col)
    else:  # "max"
        norm = max(h_row, h_col)
    if norm <= 0.0:
        return 0.0
    return float(min(max(mi / norm, 0.0), 1.0))


def count_table_nmi(table: ArrayLike, normalization: str = "modality") -> float:
    """
    Normalised mutual information of a modality x expert count table ``[M, E]`` (the statistic of
    :func:`modality_expert_nmi` for one layer, when only the counts are kept, as in
    :class:`~dex_monai.handlers.RoutingStatsHandler`); NaN for an empty table.
    """
    if normalization not in NMI_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NMI_NORMALIZATIONS}, got {normalization!r}.")
    return _nmi_from_table(np.asarray(_to_numpy(table), dtype=np.float64), normalization)


def normalized_entropy(load: ArrayLike) -> float:
    """
    Entropy of an expert load ``[E]`` (shares or counts) divided by ``log(E)``: 1.0 when every expert takes the same
    share, 0.0 when one expert takes everything; NaN for an all-zero load, 1.0 for a single expert.
    """
    p = np.clip(np.asarray(_to_numpy(load), dtype=np.float64).reshape(-1), 0.0, None)
    total = p.sum()
    if total <= 0:
        return float("nan")
    if p.shape[0] < 2:
        return 1.0
    return float(_entropy(p / total) / math.log(p.shape[0]))


def modality_expert_nmi(
    expert_indices: ArrayLike | Sequence[ArrayLike],
    modalities: ArrayLike,
    normalization: str = "modality",
    num_experts: int | Sequence[int] | None = None,
) -> np.ndarray:
    """
    Per layer, the normalised mutual information between the modality of an image and its expert choice.

    Observations: each of the ``K`` choices of an image is one (modality, expert) observation, so
    the statistic is computed from the same modality x expert count table as :func:`expert_usage`
    and does not depend on the order of the ``K`` indices (for ``K = 1`` it is the top-1 choice).

    Normalisation (``normalization``), with ``I = I(M; E)`` and entropies ``H``:

    * ``"modality"`` (default): ``I / H(M)`` (the uncertainty coefficient of the modality given the
      expert).  It is 1.0 exactly when the chosen expert identifies the modality, i.e. when every
      modality routes to its own disjoint set of experts, however many experts that set holds and
      however the modality spreads over them; it is 0.0 when routing is independent of modality.
    * ``"arithmetic"``: ``I / ((H(M) + H(E)) / 2)``, identical to
      ``sklearn.metrics.normalized_mutual_info_score`` applied to the expanded per-choice labels.
      Beware: with ``K > 1`` distinct choices per image it cannot reach 1.0 even for perfectly
      specialised experts, because ``H(E) > H(M)`` then.
    * ``"geometric"``, ``"min"``, ``"max"``: the other normalisations of sklearn.

    Conventions (as in sklearn): 1.0 when modality and expert are both constant, 0.0 when the mutual
    information is zero.  The plug-in estimate is biased upwards by roughly
    ``(M - 1)(E - 1) / (2 * N * K)`` nats, so uniform random routing gives values close to, but
    above, zero for small samples.

    Args:
        expert_indices: ``[N, L, K]`` / ``[N, L]`` array, or a list over layers of ``[N, K]`` arrays.
        modalities: modality label of every image, ``[N]``.
        normalization: one of :data:`NMI_NORMALIZATIONS`.
        num_experts: only used to validate the indices (the NMI does not depend on unused experts).

    Returns:
        float64 array ``[L]`` with values in ``[0, 1]``.
    """
    if normalization not in NMI_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NMI_NORMALIZATIONS}, got {normalization!r}.")
    _, _, tables = modality_expert_counts(expert_indices, modalities, num_experts)
    return np.array([_nmi_from_table(t, normalization) for t in tables], dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# linear probe
# ----------------------------------------------------------------------------------------------
class LinearProbeResult(NamedTuple):
    """Result of :func:`linear_probe_modality_accuracy` (unpacks as ``accuracy, chance``)."""

    accuracy: float
    """Held-out accuracy of the logistic regression."""
    chance: float
    """Held-out accuracy of always predicting the training split's most frequent modality."""


def linear_probe_modality_accuracy(
    features: ArrayLike,
    modalities: ArrayLike,
    seed: int = 0,
    test_fraction: float = 0.3,
    max_iter: int = 1000,
    standardize: bool = True,
) -> LinearProbeResult:
    """
    How linearly separable the modalities are in a feature space (e.g. the final CLS features).

    A multinomial logistic regression (scikit-learn, L2, ``C = 1``), after per-feature
    standardisation, is fitted on a stratified split of the images and scored on the held-out part.

    Args:
        features: ``[N, D]`` features (``[N, ...]`` is flattened to ``[N, D]``; ``[N]`` is ``D = 1``).
        modalities: modality label of every image, ``[N]``; at least two modalities, each with at
            least two images.
        seed: seed of the split (the fit itself is deterministic).
        test_fraction: share of the images held out, in ``(0, 1)``.
        max_iter: iteration cap of the solver (convergence warnings are silenced).
        standardize: standardise every feature with the training split's mean and std first.

    Returns:
        :class:`LinearProbeResult` ``(accuracy, chance)``: the held-out accuracy and the chance level,
        the held-out share of the modality that is most frequent in the training split (the accuracy
        of a majority-class guess on the same images; about the largest modality share overall).

    Raises:
        ValueError: fewer than two modalities, too few images for a stratified split, bad shapes.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = _to_numpy(features).astype(np.float64)
    if x.ndim == 0:
        raise ValueError("features: expected an array [N, D].")
    x = x.reshape(x.shape[0], -1)
    labels, y = _modality_codes(modalities, x.shape[0])
    if len(labels) < 2:
        raise ValueError(f"linear probe needs at least two modalities, got {labels}.")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    if not np.all(np.isfinite(x)):
        raise ValueError("features contain NaN or infinite values.")
    try:
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    except ValueError as e:
        raise ValueError(
            f"cannot make a stratified split of {x.shape[0]} images over {len(labels)} modalities "
            f"with test_fraction={test_fraction}: {e}"
        ) from e
    steps = [StandardScaler()] if standardize else []
    model = make_pipeline(*steps, LogisticRegression(max_iter=max_iter))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=ConvergenceWarning)
        model.fit(x_tr, y_tr)
    accuracy = float((model.predict(x_te) == y_te).mean())
    majority = int(np.bincount(y_tr, minlength=len(labels)).argmax())
    chance = float((y_te == majority).mean())
    return LinearProbeResult(accuracy=accuracy, chance=chance)


# ----------------------------------------------------------------------------------------------
# JSON record of the usage (the ``routing/expert_usage_epoch_<N>.json`` artifact)
# ----------------------------------------------------------------------------------------------
def _pad_usage(value: ArrayLike) -> np.ndarray:
    """``[L, E]`` float array from an array or a ragged list of per-layer rows (padded with NaN)."""
    if isinstance(value, (list, tuple)) and value and not all(np.ndim(_to_numpy(r)) == 0 for r in value):
        rows = [np.asarray(_to_numpy(r), dtype=np.float64).reshape(-1) for r in value]
        width = max((r.shape[0] for r in rows), default=0)
        out = np.full((len(rows), max(width, 1)), np.nan)
        for i, r in enumerate(rows):
            out[i, : r.shape[0]] = r
        return out
    arr = np.asarray(_to_numpy(value), dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"usage: expected [layers, experts], got shape {tuple(arr.shape)}.")
    return arr


def expert_usage_to_json(
    usage: Mapping[Hashable, ArrayLike], num_experts: int | Sequence[int] | None = None
) -> dict[str, Any]:
    """
    JSON-ready record of a usage dictionary (the format of the ``routing/expert_usage_epoch_<N>.json``
    artifact that :mod:`dex_monai.compare` reads)::

        {"modalities": [m, ...], "layers": L, "num_experts": [E_0, ..., E_{L-1}],
         "usage": {m: [[fraction per expert] per layer], ...}}

    Rows are ragged: layer ``l`` holds exactly ``E_l`` numbers.  Modality names become strings.

    Args:
        usage: ``{modality: [L, E_max] array}``, e.g. from :func:`expert_usage`.
        num_experts: experts per layer; ``None`` infers them from the NaN padding (the number of
            non-NaN cells of each layer, the largest over modalities).
    """
    if not usage:
        raise ValueError("usage is empty.")
    arrays = {str(k): _pad_usage(v) for k, v in usage.items()}
    n_layers = max(a.shape[0] for a in arrays.values())
    if any(a.shape[0] != n_layers for a in arrays.values()):
        raise ValueError("usage: all modalities must have the same number of layers.")
    if num_experts is None:
        counts = [
            int(max(np.count_nonzero(np.isfinite(a[layer])) for a in arrays.values())) for layer in range(n_layers)
        ]
    elif isinstance(num_experts, (int, np.integer)):
        counts = [int(num_experts)] * n_layers
    else:
        counts = [int(e) for e in num_experts]
    if len(counts) != n_layers:
        raise ValueError(f"num_experts: {len(counts)} counts for {n_layers} layers.")
    return {
        "modalities": list(arrays),
        "layers": n_layers,
        "num_experts": counts,
        "usage": {
            k: [[float(v) if np.isfinite(v) else 0.0 for v in a[layer, : counts[layer]]] for layer in range(n_layers)]
            for k, a in arrays.items()
        },
    }


def expert_usage_from_json(record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """
    Inverse of :func:`expert_usage_to_json`: ``{modality: [L, E_max] array}`` with NaN padding.

    Tolerates missing ``"modalities"`` / ``"layers"`` / ``"num_experts"`` entries (they are inferred
    from ``"usage"``).

    Raises:
        ValueError: no ``"usage"`` mapping in the record.
    """
    raw = record.get("usage") if isinstance(record, Mapping) else None
    if not isinstance(raw, Mapping):
        raise ValueError("routing record has no 'usage' mapping.")
    order = [str(m) for m in record.get("modalities", [])] or [str(m) for m in raw]
    order += [str(m) for m in raw if str(m) not in order]
    raw = {str(k): v for k, v in raw.items()}
    counts = record.get("num_experts")
    out: dict[str, np.ndarray] = {}
    for m in order:
        if m not in raw:
            continue
        arr = _pad_usage(raw[m])
        if counts is not None and len(counts) == arr.shape[0]:
            width = max(arr.shape[1], max(int(c) for c in counts))
            padded = np.full((arr.shape[0], width), np.nan)
            for layer, c in enumerate(counts):
                c = min(int(c), arr.shape[1])
                padded[layer, :c] = arr[layer, :c]
            arr = padded
        out[m] = arr
    return out
