"""BatchNorm statistics recomputed after training: torch.optim.swa_utils.update_bn's pass in JAX.

Train mode, dropout off, no weight changed; every batch's statistics (mean and unbiased
variance) weigh the same in the result, the cumulative average update_bn computes with
momentum None: after batch k, running = (1 - 1/k) * running + (1/k) * batch. The batch
statistics come from the model itself, built with momentum 1 (its running statistics become
the batch's) and no dropout, so the plain and the fast layers compute them as they train.
torch_ref.recalibration is the PyTorch side.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jax_impl.model import Layers, Net
from jax_impl.training import evaluated_variables_of


def statistics_model(layers: Layers) -> Net:
    """The model whose train-mode pass returns one batch's statistics as its new `batch_stats`."""
    return Net(dropout=0.0, layers=dataclasses.replace(layers, batchnorm=functools.partial(layers.batchnorm,
                                                                                             momentum=1.0)))


def batch_statistics(model: Net, variables: dict, images: jax.Array) -> dict:
    """Every BatchNorm's statistics of one batch of images (B, 28, 28, 1), as a `batch_stats` tree."""
    _, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    return updates["batch_stats"]


def recalibrated_batch_stats(statistics: Callable[[dict, jax.Array], dict], variables: dict, images: np.ndarray,
                             batch_size: int, placement: jax.Device | jax.sharding.Sharding) -> dict:
    """update_bn's result for `variables` over normalised `images` (N, 28, 28), `batch_size` at
    a time in their order; `statistics` is a compiled `batch_statistics` (over seeds, if stacked)."""
    running = None
    for count, start in enumerate(range(0, len(images), batch_size), start=1):
        batch = statistics(variables, jax.device_put(images[start : start + batch_size, ..., None], placement))
        factor = 1.0 / count
        running = batch if running is None else jax.tree_util.tree_map(
            lambda average, new, factor=factor: (1 - factor) * average + factor * new, running, batch)
    return running


def recalibrate_batchnorm(state: Any, statistics: Callable[[dict, jax.Array], dict], images: np.ndarray,
                          batch_size: int, placement: jax.Device | jax.sharding.Sharding) -> Any:
    """A TrainState (training.TrainState, one seed's or stacked seeds') with the BatchNorm statistics
    it evaluates recomputed over `images`: the average's, once it holds any, else the trained ones."""
    batch_stats = recalibrated_batch_stats(statistics, evaluated_variables_of(state), images, batch_size, placement)
    averaged = state.averaged
    if averaged is not None and np.asarray(jax.device_get(averaged.count)).ravel()[0] > 0:  # the same for every seed
        return state.replace(averaged=averaged.replace(variables={**averaged.variables, "batch_stats": batch_stats}))
    return state.replace(batch_stats=batch_stats)
