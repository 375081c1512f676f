"""Weight averaging the NNX way: `torch.optim.swa_utils.AveragedModel` as an `nnx.Module`.

As in PyTorch, the average is a copy of the model that holds its own weights and BatchNorm
statistics, plus how many versions it has taken in (n_averaged), and `update_parameters(model)`
moves it towards the model in place. The rules themselves (the first version copied, then EMA's
lerp or SWA's equal-weight mean) are the linen twin's pure functions (jax_impl.averaging), so
the three twins average alike; torch_ref.averaging is the PyTorch side.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from common.recipes import Recipe
from jax_impl.averaging import WeightAverage, ema_update, swa_update
from nnx_impl.model import Net, load_variables, variables_of


class AveragedModel(nnx.Module):
    """The average of a model's versions: `module` (a copy of the model) and `n_averaged`.
    `ema_decay` None: SWA's equal-weight mean; else an exponential moving average."""

    def __init__(self, model: Net, ema_decay: float | None = None):
        self.module = nnx.clone(model)
        self.n_averaged = nnx.Variable(jnp.zeros((), jnp.int32))
        self.ema_decay = ema_decay

    def update_parameters(self, model: Net) -> None:
        """Take `model`'s weights and BatchNorm statistics into the average (use_buffers=True)."""
        average = WeightAverage(self.n_averaged[...], variables_of(self.module))
        if self.ema_decay is None:
            updated = swa_update(average, variables_of(model))
        else:
            updated = ema_update(average, variables_of(model), self.ema_decay)
        load_variables(self.module, updated.variables)
        self.n_averaged[...] = updated.count


def averaged_model(model: Net, recipe: Recipe) -> AveragedModel | None:
    """The recipe's average of `model`, holding no version yet; None when the recipe keeps none."""
    if recipe.average == "none":
        return None
    return AveragedModel(model, recipe.ema_decay if recipe.average == "ema" else None)


def evaluated_model(model: Net, averaged: AveragedModel | None) -> Net:
    """What to evaluate and save: the average once it holds a version (SWA holds none before its
    first epoch), else the trained model."""
    if averaged is not None and int(averaged.n_averaged[...]) > 0:
        return averaged.module
    return model
