# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""A trained network as an MLflow model (pytorch flavour with signature and input example), linked to its run and
registered in the model registry when the tracking store has one."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["EXPERIMENT_KIND_TAG", "MODEL_TRAINING_KIND", "MainOutput", "cpu_copy", "first_tensor", "network_signature", "log_network"]

#: Experiment tag MLflow 3's UI reads to choose the experiment's pages (GenAI or model training).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"

#: Its value for model-training experiments (the Runs page, not the GenAI overview).
MODEL_TRAINING_KIND = "custom_model_development"

logger = logging.getLogger(__name__)


def first_tensor(output: Any) -> torch.Tensor | None:
    """The network's main output: the output itself when a tensor, else the first tensor of a tuple/list/dict."""
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else ()
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    return None


class MainOutput(torch.nn.Module):
    """Wraps a network whose forward returns a tuple/dict (the MAE: reconstruction and losses; the ViT: tokens and
    hidden states) so that the logged model returns its main output (:func:`first_tensor`), as MLflow's pytorch
    flavour serves single tensors. ``self.network`` is the wrapped network."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, *spatial]`` -> the network's first output tensor."""
        output = first_tensor(self.network(x))
        if output is None:
            raise RuntimeError(f"{type(self.network).__name__} returned no tensor.")
        return output


def network_signature(network: torch.nn.Module, input_shape: Sequence[int], seed: int = 0) -> tuple[Any, np.ndarray]:
    """
    An input example ``[B, C, *spatial]`` (float32 drawn from ``seed`` among 0, 0.25, 0.5, 0.75, 1: values that print
    in a few characters, as MLflow stores the example as JSON, twice; a 96^3 volume takes about 5 MB a copy) and the
    MLflow signature
    inferred from it and the network's output (:func:`first_tensor`) in eval mode. The batch axis is left
    variable (-1), as a served model takes any batch size; the example holds at least two images, because
    ``torch.export`` (MLflow's ``pt2`` format) would fix a batch axis of size one.
    """
    from mlflow.models import infer_signature
    from mlflow.types.schema import Schema, TensorSpec

    generator = torch.Generator().manual_seed(seed)
    shape = [max(2, int(input_shape[0])), *(int(s) for s in input_shape[1:])]
    example = torch.randint(0, 5, shape, generator=generator).float() / 4
    with torch.no_grad():
        output = first_tensor(network(example))
    signature = infer_signature(example.numpy(), None if output is None else output.detach().float().numpy())
    variable = [Schema([TensorSpec(spec.type, (-1, *spec.shape[1:]), spec.name) for spec in schema.inputs])
                if schema is not None else None for schema in (signature.inputs, signature.outputs)]
    signature.inputs, signature.outputs = variable
    return signature, example.numpy()


def cpu_copy(network: torch.nn.Module, input_shape: Sequence[int]) -> torch.nn.Module:
    """
    An eval-mode CPU copy of ``network``. DEX layers keep the tensors of their last forward pass (routing record,
    auxiliary losses), which are part of an autograd graph after a training step and cannot be copied; one forward
    pass without gradients on a zero input ``input_shape`` replaces them first. ``network`` keeps its device and mode.
    """
    parameter = next(network.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    training = network.training
    try:
        with torch.no_grad():
            network.eval()(torch.zeros(*[int(s) for s in input_shape], device=device))
    finally:
        network.train(training)
    return copy.deepcopy(network).to("cpu").eval()


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (``log_model``, ``register_model``) uses the global tracking URI (and the
    ``MLFLOW_TRACKING_URI`` variable it sets): point it at ``uri`` for the block, then put both back."""
    from mlflow.tracking._tracking_service import utils

    previous, previous_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    utils.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils.set_tracking_uri(previous)
        if previous_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


def log_network(
    network: torch.nn.Module,
    run_id: str,
    tracking_uri: str,
    input_shape: Sequence[int],
    name: str = "model",
    registered_model_name: str | None = None,
) -> Any:
    """
    Log ``network`` into the run as an MLflow model (``mlflow.pytorch`` in the ``pt2`` format: a CPU copy in eval
    mode, wrapped in :class:`MainOutput` when its forward returns more than a tensor, exported with ``torch.export``
    (per-image routing survives export, see ``networks.blocks.dex_layer``), so loading it unpickles nothing and
    needs no ``dex_monai``; with the signature and input example of :func:`network_signature`; pip requirements
    given, not inferred, so nothing is imported in a subprocess), then register it as ``registered_model_name`` when
    the store has a model registry (SQLite and tracking servers do; a store without one only gets the warning).

    Args:
        network: the trained network, possibly wrapped in ``DistributedDataParallel`` (left on its device and in its
            train/eval mode).
        run_id: the MLflow run.
        tracking_uri: the run's tracking store.
        input_shape: input example shape ``[B, C, *spatial]``.
        name: model name within the run.
        registered_model_name: registry name (None: not registered).

    Returns:
        MLflow's ``ModelInfo``; its ``registered_model_version`` is set when registered.
    """
    import mlflow
    import monai
    from mlflow.exceptions import MlflowException

    from dex_monai.engines.utils import unwrap_network

    model = cpu_copy(unwrap_network(network), input_shape)  # DistributedDataParallel: the module it wraps
    with torch.no_grad():
        if not isinstance(model(torch.zeros(*[int(s) for s in input_shape])), torch.Tensor):
            model = MainOutput(model).eval()
    signature, example = network_signature(model, input_shape)
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"monai=={monai.__version__}"]
    with _tracking_uri(tracking_uri):
        client = mlflow.MlflowClient(tracking_uri)
        run = client.get_run(run_id)
        # created here, in the run's experiment: log_model alone would put it in the fluent API's active experiment
        logged = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                            params={k: str(v) for k, v in run.data.params.items()})
        info = mlflow.pytorch.log_model(model, name=name, signature=signature, input_example=example,
                                        pip_requirements=requirements, serialization_format="pt2", run_id=run_id,
                                        model_id=logged.model_id)
        if registered_model_name:
            try:
                version = mlflow.register_model(info.model_uri, registered_model_name)
                info.registered_model_version = version.version
            except MlflowException as e:
                logger.warning(f"model not registered as {registered_model_name!r} (no model registry?): {e}")
    return info
