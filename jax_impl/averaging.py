"""Weight averaging as pure functions: torch.optim.swa_utils.AveragedModel's rules in JAX.

An average holds a copy of the variables ({"params", "batch_stats"}: BatchNorm's running
statistics are averaged with the weights, AveragedModel's use_buffers=True) and how many
versions it has taken in. The first version is copied; each later one moves the average
towards it: by torch.lerp with weight 1 - decay (EMA, get_ema_multi_avg_fn; the lerp is torch's
own formula), or by (new - average) / (n + 1) (SWA, get_swa_avg_fn: the equal-weight mean of
every version taken in). torch_ref.averaging is the PyTorch side.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from common.recipes import Recipe


class WeightAverage(struct.PyTreeNode):
    """AveragedModel's state: the averaged variables and n_averaged."""

    count: jax.Array
    variables: Any


def start_average(variables: dict, recipe: Recipe) -> WeightAverage | None:
    """An empty average of variables shaped like `variables`, or None when the recipe keeps none."""
    if recipe.average == "none":
        return None
    # Zeros, not the variables themselves: the first update overwrites them, and the average must
    # not share buffers with the weights (a training step donates both).
    return WeightAverage(count=jnp.zeros((), jnp.int32), variables=jax.tree_util.tree_map(jnp.zeros_like, variables))


def lerp(start: jax.Array, end: jax.Array, weight: jax.Array) -> jax.Array:
    """torch.lerp: start + weight * (end - start), computed from the nearer end for weights >= 0.5."""
    difference = end - start
    return jnp.where(weight < 0.5, start + weight * difference, end - difference * (1 - weight))


def updated_average(average: WeightAverage, variables: dict, rule: Callable) -> WeightAverage:
    """`average` having taken in `variables` by `rule(averaged, new)`; the first version is copied."""
    def update(averaged: jax.Array, new: jax.Array) -> jax.Array:
        return jnp.where(average.count == 0, new, rule(averaged, new))

    return WeightAverage(average.count + 1, jax.tree_util.tree_map(update, average.variables, variables))


def ema_update(average: WeightAverage, variables: dict, decay: float) -> WeightAverage:
    """One exponential-moving-average step: average = decay * average + (1 - decay) * variables."""
    return updated_average(average, variables, lambda averaged, new: lerp(averaged, new, jnp.asarray(1 - decay,
                                                                                                      new.dtype)))


def swa_update(average: WeightAverage, variables: dict) -> WeightAverage:
    """One stochastic-weight-averaging step: the mean of the n versions so far and this one."""
    count = average.count + 1
    return updated_average(average, variables, lambda averaged, new: averaged + (new - averaged) / count)


def evaluated_variables(variables: dict, average: WeightAverage | None) -> dict:
    """What to evaluate and save: the average once it holds a version (SWA holds none before its
    first epoch), else the trained variables. Works on one seed or on seeds stacked on a leading axis."""
    if average is None:
        return variables

    def choose(averaged: jax.Array, trained: jax.Array) -> jax.Array:
        holds_any = jnp.reshape(average.count > 0, average.count.shape + (1,) * (trained.ndim - average.count.ndim))
        return jnp.where(holds_any, averaged, trained)

    return jax.tree_util.tree_map(choose, average.variables, variables)
