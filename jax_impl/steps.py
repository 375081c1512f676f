"""The pure functions of training: state creation, one SGD step, evaluation.

Everything here is a function of its arguments: parameters, BatchNorm statistics and the
optimiser state travel in `TrainState`, randomness in an explicit key. The epoch runners of
jax_impl.epochs compile `train_step` once per batch shape and donate the incoming state, so
XLA updates it in place.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import struct
from flax.training import train_state

from common.recipes import Recipe
from common.spec import IMAGE_SIZE, NUM_CLASSES
from jax_impl.model import PLAIN_LAYERS, Layers, Net
from jax_impl.schedules import make_optimizer


class TrainState(train_state.TrainState):
    """Flax's TrainState (step, params, optimiser state, apply_fn, tx) plus BatchNorm statistics
    and the recipe's label smoothing, a static field (like apply_fn) so the step that reads it
    stays a function of the state alone."""

    batch_stats: Any
    label_smoothing: float = struct.field(pytree_node=False, default=0.0)


def create_train_state(
    key: jax.Array, recipe: Recipe, steps_per_epoch: int, layers: Layers = PLAIN_LAYERS
) -> TrainState:
    """Fresh weights (PyTorch's initial distributions) and an empty optimiser state. `layers`
    (see jax_impl.ops) changes how the model computes, not its weights or their initial values."""
    model = Net(dropout=recipe.dropout, layers=layers)
    variables = model.init(key, jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1), jnp.float32), train=False)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=make_optimizer(recipe, steps_per_epoch),
        label_smoothing=recipe.label_smoothing,
    )


def nll_loss(log_probs: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean negative log-likelihood, as torch.nn.functional.nll_loss; with label smoothing, as
    torch's cross_entropy(label_smoothing=...): a weight 1 - label_smoothing on the true class's
    term and label_smoothing on the mean of all ten log-probabilities."""
    nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=1).mean()
    if not label_smoothing:
        return nll
    return (1 - label_smoothing) * nll - label_smoothing * log_probs.mean()


def _check_batch(images: jax.Array, labels: jax.Array) -> None:
    """Trace-time checks: they cost nothing per step and catch NCHW or integer inputs early."""
    chex.assert_rank(images, 4)
    chex.assert_shape(images, (None, IMAGE_SIZE, IMAGE_SIZE, 1))
    chex.assert_type(images, float)
    chex.assert_shape(labels, (images.shape[0],))
    chex.assert_type(labels, jnp.int32)


def train_step(
    state: TrainState, batch: tuple[jax.Array, jax.Array], key: jax.Array
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on (images NHWC float32, labels int32).

    `key` is the run's dropout key; this step's masks come from fold_in(key, state.step), so
    the masks depend only on the seed and the step number, and a resumed run draws the same.
    Returns the new state and the batch's summed loss and correct count.
    """
    images, labels = batch
    _check_batch(images, labels)
    step_key = jax.random.fold_in(key, state.step)

    def loss_fn(params):
        log_probs, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True,
            rngs={"dropout": step_key}, mutable=["batch_stats"],
        )
        return nll_loss(log_probs, labels, state.label_smoothing), (log_probs, updates["batch_stats"])

    (loss, (log_probs, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics = {
        "loss_sum": loss * labels.shape[0],
        "correct": jnp.sum(jnp.argmax(log_probs, axis=1) == labels),
    }
    return state, metrics


def eval_step(state: TrainState, images: jax.Array) -> jax.Array:
    """Eval-mode log-probabilities (running BatchNorm statistics, no dropout)."""
    chex.assert_rank(images, 4)
    chex.assert_type(images, float)
    log_probs = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, images, train=False)
    chex.assert_shape(log_probs, (images.shape[0], NUM_CLASSES))
    return log_probs
