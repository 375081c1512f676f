"""The optimiser and learning-rate schedule of a recipe, in optax (torch_ref.optim: torch.optim).

optax schedules are functions of the step: the trainer builds one per run and hands it to the
optimiser, and reads the learning rate it shows from the same function.

PyTorch steps an epoch-level scheduler once per epoch; optax asks for the learning rate of
every optimiser step. The translation is exact when the schedule is written in steps with
`steps_per_epoch` steps to an epoch, and the parity tests check it at every step of a run.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from common.recipes import Recipe


def learning_rate_schedule(recipe: Recipe, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate of each optimiser step (counted from 0) for `recipe`."""
    schedule = recipe.schedule
    if schedule.kind == "step":
        # StepLR(step_size, gamma) stepped per epoch: lr * gamma ** (epoch // step_size).
        per_step = optax.exponential_decay(
            recipe.lr, transition_steps=schedule.step_size * steps_per_epoch,
            decay_rate=schedule.gamma, staircase=True,
        )
    elif schedule.kind == "onecycle":
        per_step = one_cycle(recipe.lr, recipe.epochs * steps_per_epoch, schedule.pct_start, schedule.div_factor,
                             schedule.final_div_factor)
    elif schedule.kind == "swa":
        before_averaging = (recipe.swa_start - 1) * steps_per_epoch
        per_step = swa(one_cycle(recipe.lr, before_averaging, schedule.pct_start, schedule.div_factor,
                                 schedule.final_div_factor),
                       before_averaging, schedule.swa_lr, schedule.anneal_epochs * steps_per_epoch,
                       schedule.anneal_strategy)
    else:
        raise ValueError(f"unknown schedule kind {schedule.kind!r}")
    # optax counts steps in int32, and int32 / int is float32 in JAX: evaluated on a float count
    # instead, the learning rate has the precision of the run (float64 when x64 is enabled).
    return lambda count: per_step(jnp.asarray(count, dtype=jnp.result_type(float)))


def one_cycle(max_lr: float, total_steps: int, pct_start: float, div_factor: float,
              final_div_factor: float) -> optax.Schedule:
    """PyTorch's OneCycleLR (cosine, two phases) as a function of the step, written from its
    definition because optax.cosine_onecycle_schedule places the phase boundary differently:
    PyTorch's warm-up phase ends at step pct_start * total_steps - 1."""
    initial_lr = max_lr / div_factor
    min_lr = initial_lr / final_div_factor
    warm_up_end = pct_start * total_steps - 1
    last = total_steps - 1

    def cosine(start, end, fraction):
        return end + (start - end) / 2 * (jnp.cos(jnp.pi * fraction) + 1)

    def schedule(step):
        return jnp.where(step <= warm_up_end, cosine(initial_lr, max_lr, step / warm_up_end),
                         cosine(max_lr, min_lr, (step - warm_up_end) / (last - warm_up_end)))

    return schedule


def swa(before: optax.Schedule, handover: int, swa_lr: float, anneal_steps: int, strategy: str) -> optax.Schedule:
    """`before` until step `handover`, then torch.optim.swa_utils.SWALR as a function of the
    step: from the rate `before` ended at (step handover - 1) to swa_lr over anneal_steps steps,
    by a cosine or a straight line, then swa_lr. PyTorch's SWALR carries the starting rate from
    step to step instead (it recovers it from the previous step's rate), the same value.
    With no annealing steps, swa_lr from the handover on."""
    start_lr = before(handover - 1)

    def anneal(fraction):
        return (1 - jnp.cos(jnp.pi * fraction)) / 2 if strategy == "cos" else fraction

    def schedule(step):
        alpha = anneal(jnp.clip((step - handover) / anneal_steps, 0, 1)) if anneal_steps else 1.0
        return jnp.where(step < handover, before(step), swa_lr * alpha + start_lr * (1 - alpha))

    return schedule


def make_optimizer(recipe: Recipe, schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD as PyTorch's torch.optim.SGD computes it: weight decay added to the gradient, then
    momentum buffer = momentum * buffer + gradient, then parameter -= lr * buffer, with the
    learning rate `schedule` gives each step (`learning_rate_schedule`, built once per run)."""
    sgd = optax.sgd(
        schedule,
        momentum=recipe.momentum or None,
        nesterov=recipe.nesterov,
    )
    if recipe.weight_decay:
        return optax.chain(optax.add_decayed_weights(recipe.weight_decay), sgd)
    return sgd
