"""Weight averaging the PyTorch way: `torch.optim.swa_utils.AveragedModel`.

AveragedModel keeps a copy of the model and how many versions of its weights it has taken in
(n_averaged): the first is copied, later ones are averaged in by `get_ema_multi_avg_fn(decay)`
(after every step) or `get_swa_avg_fn()` (the equal-weight mean, here of the weights at the end
of each epoch from the recipe's swa_start on). use_buffers=True averages BatchNorm's running
statistics with the weights. SWA takes the one-tensor-at-a-time `get_swa_avg_fn`, because
`get_swa_multi_avg_fn` fails on the integer num_batches_tracked buffers (torch 2.13: "Integer
division with addcdiv is no longer supported"). jax_impl.averaging is the same rule in JAX.
"""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_avg_fn

from common.recipes import Recipe


def averaged_model(model: torch.nn.Module, recipe: Recipe) -> AveragedModel | None:
    """The recipe's average of `model`, holding no version yet; None when the recipe keeps none."""
    if recipe.average == "none":
        return None
    if recipe.average == "ema":
        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(recipe.ema_decay), use_buffers=True)
    return AveragedModel(model, avg_fn=get_swa_avg_fn(), use_buffers=True)


def evaluated_model(model: torch.nn.Module, averaged: AveragedModel | None) -> torch.nn.Module:
    """What to evaluate and save: the average once it holds a version (SWA holds none before its
    first epoch), else the trained model."""
    if averaged is not None and averaged.n_averaged.item() > 0:
        return averaged.module
    return model


def averaged_state_dict(saved: dict) -> dict:
    """The averaged model's own state_dict from AveragedModel's (its keys are "module."-prefixed,
    beside n_averaged): a weights file of the model, like model.pt."""
    return {key.removeprefix("module."): value for key, value in saved.items() if key.startswith("module.")}
