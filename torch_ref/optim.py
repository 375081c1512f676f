"""The optimiser and learning-rate schedule of a recipe, in torch.optim (jax_impl.optim: optax).

A PyTorch scheduler is an object stepped once per epoch (StepLR) or once per batch (OneCycleLR);
`recipe.schedule.per_step` says which.
"""

from __future__ import annotations

import torch

from common.recipes import Recipe


def make_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.SGD:
    """torch.optim.SGD with the recipe's momentum, Nesterov flag and (coupled) weight decay."""
    return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                           nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The recipe's schedule as a PyTorch scheduler."""
    schedule = recipe.schedule
    if schedule.kind == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=schedule.step_size, gamma=schedule.gamma)
    if schedule.kind == "onecycle":
        return one_cycle_scheduler(optimizer, recipe, recipe.epochs * steps_per_epoch)
    if schedule.kind == "swa":
        # OneCycle until the averaging starts, then SWALR; both stepped after every batch, so
        # SWALR's "epochs" are steps here.
        before_averaging = (recipe.swa_start - 1) * steps_per_epoch
        swa = torch.optim.swa_utils.SWALR(optimizer, swa_lr=schedule.swa_lr,
                                          anneal_epochs=schedule.anneal_epochs * steps_per_epoch,
                                          anneal_strategy=schedule.anneal_strategy)
        return torch.optim.lr_scheduler.SequentialLR(
            optimizer, [one_cycle_scheduler(optimizer, recipe, before_averaging), swa], milestones=[before_averaging])
    raise ValueError(f"unknown schedule kind {schedule.kind!r}")


def one_cycle_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe,
                        total_steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """OneCycleLR to the recipe's peak lr over `total_steps` batches, cosine, momentum held."""
    schedule = recipe.schedule
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.lr, total_steps=total_steps, pct_start=schedule.pct_start, anneal_strategy="cos",
        cycle_momentum=False, div_factor=schedule.div_factor, final_div_factor=schedule.final_div_factor,
    )
