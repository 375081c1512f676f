"""(e) The learning rate of every step of a seed-recipe run, and SGD-momentum updates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from common.recipes import RECIPES, SEED, OneCycleSchedule, SWASchedule
from jax_impl.optim import learning_rate_schedule, make_optimizer
from torch_ref.optim import make_scheduler

STEPS_PER_EPOCH = 235  # ceil(60000 / 256): the seed recipe's epochs, last batch included


def torch_learning_rates(recipe, steps_per_epoch):
    """The lr of every optimiser step of a whole run, stepping the scheduler as train_epoch does."""
    parameter = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([parameter], lr=recipe.lr, momentum=recipe.momentum)
    scheduler = make_scheduler(optimizer, recipe, steps_per_epoch)
    rates = []
    for _ in range(recipe.epochs):
        for _ in range(steps_per_epoch):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if recipe.schedule.per_step:
                scheduler.step()
        if not recipe.schedule.per_step:
            scheduler.step()
    return np.array(rates)


SWA_EXAMPLE = SEED.with_overrides(lr=0.2, batch_size=128, average="swa", swa_start=11)
SCHEDULED = {**RECIPES, "onecycle-example": SEED.with_overrides(
    schedule=OneCycleSchedule(pct_start=0.25, div_factor=10, final_div_factor=100), lr=0.2, batch_size=128),
    # SWALR annealing up over one epoch (cosine), down over two (linear), and jumping at once.
    "swa-cos-example": SWA_EXAMPLE.with_overrides(schedule=SWASchedule(swa_lr=0.05, anneal_epochs=1)),
    "swa-linear-example": SWA_EXAMPLE.with_overrides(
        schedule=SWASchedule(swa_lr=0.005, anneal_epochs=2, anneal_strategy="linear", final_div_factor=100)),
    "swa-jump-example": SWA_EXAMPLE.with_overrides(swa_start=13, schedule=SWASchedule(swa_lr=0.05, anneal_epochs=0)),
}


@pytest.mark.parametrize("name", sorted(SCHEDULED))
def test_learning_rate_of_every_step_of_a_whole_run(name, float64):
    """Every recipe, every step. The JAX schedule runs in float64 here (x64 on), so any
    difference is the formula's: PyTorch's OneCycleLR computes in Python floats, 1e-12 leaves
    room for the order of operations only. (SWALR recovers its starting rate from the previous
    step's by dividing by 1 - alpha, which magnifies rounding near the end of its annealing, but
    the result weighs that starting rate by the same 1 - alpha: the rounding stays at 1e-16.)"""
    recipe = SCHEDULED[name]
    steps_per_epoch = -(-60000 // recipe.batch_size)  # last, shorter batch included
    expected = torch_learning_rates(recipe, steps_per_epoch)
    schedule = jax.jit(jax.vmap(learning_rate_schedule(recipe, steps_per_epoch)))
    ours = np.asarray(schedule(jnp.arange(len(expected))))
    assert len(ours) == recipe.epochs * steps_per_epoch
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=0)


def test_seed_schedule_decays_after_epoch_10_in_float32():
    """What users see (float32): optax holds 0.004 as 0.0040000002 (relative 5e-8)."""
    expected = torch_learning_rates(SEED, STEPS_PER_EPOCH)
    ours = np.asarray(jax.vmap(learning_rate_schedule(SEED, STEPS_PER_EPOCH))(jnp.arange(len(expected))))
    np.testing.assert_allclose(ours, expected, rtol=1e-7)
    assert expected[235 * 10 - 1] == 0.04 and expected[235 * 10] == 0.04 * 0.1


SGD_VARIANTS = {
    "momentum": {"momentum": 0.9},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "weight-decay": {"momentum": 0.9, "weight_decay": 5e-4},
    "nesterov+weight-decay": {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-3},
    "no-momentum+weight-decay": {"momentum": 0.0, "weight_decay": 5e-3},
}


@pytest.mark.parametrize("variant", sorted(SGD_VARIANTS))
def test_sgd_updates_match_torch_at_every_step(variant, float64):
    """torch.optim.SGD and the project's optax optimiser (jax_impl.optim.make_optimizer),
    built from the same recipe fields, step by step: after each of five updates with different
    gradients the parameters agree. PyTorch adds weight decay to the gradient before the
    momentum buffer (coupled, not AdamW-style decoupled), and its Nesterov step is
    gradient + momentum * buffer; optax must do the same. Weight decay 5e-3 in the last variants
    so that it moves the parameters by far more than the tolerance. float64 and a few
    multiply-adds per element: agreement to a few ulps, 1e-14 relative."""
    rng = np.random.default_rng(0)
    start = rng.normal(size=(4, 3))
    grads = [rng.normal(size=(4, 3)) for _ in range(5)]
    recipe = SEED.with_overrides(lr=0.05, **SGD_VARIANTS[variant])

    parameter = torch.tensor(start, requires_grad=True)
    optimizer = torch.optim.SGD([parameter], lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov,
                                weight_decay=recipe.weight_decay)
    tx = make_optimizer(recipe, learning_rate_schedule(recipe, steps_per_epoch=100))
    params = jnp.asarray(start)
    opt_state = tx.init(params)
    for grad in grads:
        parameter.grad = torch.tensor(grad)
        optimizer.step()
        updates, opt_state = tx.update(jnp.asarray(grad), opt_state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(np.asarray(params), parameter.detach().numpy(), rtol=1e-14, atol=1e-15)
    assert not np.allclose(np.asarray(params), start - recipe.lr * sum(grads), rtol=1e-6)  # not plain SGD
