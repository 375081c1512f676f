"""(e) The learning rate of every step of a seed-recipe run, and SGD-momentum updates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from common.recipes import SEED
from jax_impl.schedules import learning_rate_schedule, make_optimizer
from torch_ref.trainer import make_scheduler

STEPS_PER_EPOCH = 235  # ceil(60000 / 256): the seed recipe's epochs, last batch included


def torch_learning_rates(recipe, steps_per_epoch):
    """The lr of every optimiser step of a whole run, stepping the scheduler as train_epoch does."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=recipe.lr, momentum=recipe.momentum)
    scheduler = make_scheduler(optimizer, recipe)
    rates = []
    for _ in range(recipe.epochs):
        rates += [optimizer.param_groups[0]["lr"]] * steps_per_epoch
        scheduler.step()
    return np.array(rates)


def test_learning_rate_of_every_step_of_the_seed_run():
    expected = torch_learning_rates(SEED, STEPS_PER_EPOCH)
    schedule = jax.jit(jax.vmap(learning_rate_schedule(SEED, STEPS_PER_EPOCH)))
    ours = np.asarray(schedule(jnp.arange(len(expected))))
    assert len(ours) == 15 * 235
    # optax evaluates the schedule in float32: 0.004 is stored as 0.0040000002 (relative 5e-8).
    np.testing.assert_allclose(ours, expected, rtol=1e-7)
    assert expected[235 * 10 - 1] == 0.04 and expected[235 * 10] == 0.04 * 0.1


def test_sgd_momentum_updates_match_over_three_steps(float64):
    """torch.optim.SGD(momentum) and the project's optax optimiser: same parameters after three
    updates with different gradients (the momentum buffer matters from the second on)."""
    rng = np.random.default_rng(0)
    start = rng.normal(size=(4, 3))
    grads = [rng.normal(size=(4, 3)) for _ in range(3)]
    recipe = SEED.with_overrides(lr=0.05, momentum=0.9)

    parameter = torch.tensor(start, requires_grad=True)
    optimizer = torch.optim.SGD([parameter], lr=recipe.lr, momentum=recipe.momentum)
    for grad in grads:
        parameter.grad = torch.tensor(grad)
        optimizer.step()

    tx = make_optimizer(recipe, steps_per_epoch=100)
    params = jnp.asarray(start)
    opt_state = tx.init(params)
    for grad in grads:
        updates, opt_state = tx.update(jnp.asarray(grad), opt_state, params)
        params = optax.apply_updates(params, updates)
    # float64 and three multiply-adds per element: agreement to a few ulps.
    np.testing.assert_allclose(np.asarray(params), parameter.detach().numpy(), rtol=1e-14, atol=1e-15)
