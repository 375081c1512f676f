"""JAX training the Flax NNX way: the model and its optimiser are objects updated in place, as
in PyTorch (`optimizer.zero_grad(); loss.backward(); optimizer.step()`); read it top to bottom.

1. `create_train_state`: the optimiser over the model's parameters (`nnx.Optimizer`), the
   same optax SGD and schedule as the linen twin (jax_impl.optim).
2. `train_step`: one SGD step, `@nnx.jit`: the loss's value and gradients (`nnx.value_and_grad`),
   the update applied in place, the BatchNorm statistics updated in place by the forward pass.
3. `train_epoch`: every batch of the core's `EpochPlan` through the step.
4. `swa_step`: the weights taken into their average at the end of an epoch (an EMA is taken in
   `train_step`); the average is an `nnx.Module` too (nnx_impl.averaging).
5. `eval_step` and `predict`: eval-mode log-probabilities.

The linen twin (jax_impl.training) threads a state through pure functions instead; the two
compute the same steps (tests/parity/test_nnx.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_impl import training as linen_training
from jax_impl.training import Metrics, check_batch, training_loss
from nnx_impl.averaging import AveragedModel
from nnx_impl.model import Net, variables_of


def create_train_state(model: Net, tx: optax.GradientTransformation) -> nnx.Optimizer:
    """The optimiser of `model`'s parameters (not its BatchNorm statistics, which are no weights)."""
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit(static_argnames="label_smoothing")
def train_step(model: Net, optimizer: nnx.Optimizer, batch: tuple[jax.Array, jax.Array], key: jax.Array,
               label_smoothing: float = 0.0, averaged: AveragedModel | None = None) -> Metrics:
    """One SGD step on (images NHWC float32, labels int32), `model` in train mode: its weights,
    BatchNorm statistics and the optimiser's state change in place, and an EMA `averaged` takes
    the new weights in (as torch_ref's step calls update_parameters after optimizer.step()).

    `key` is the run's dropout key; the model's random streams are reseeded with
    fold_in(key, step) first, so that the masks depend only on the seed and the step number (as
    the linen twin's do), and a resumed run draws the same without saving any stream's state.
    """
    images, labels = batch
    check_batch(images, labels)
    step_key = jax.random.fold_in(key, optimizer.step[...])
    nnx.reseed(model, default=step_key, dropout=step_key)  # whichever stream its Dropout layers draw from

    def loss_fn(model: Net) -> tuple[jax.Array, jax.Array]:
        log_probs = model(images)
        return training_loss(log_probs, labels, label_smoothing), log_probs

    (loss, log_probs), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    if averaged is not None and averaged.ema_decay is not None:
        averaged.update_parameters(model)
    return {"loss_sum": loss * labels.shape[0], "correct": jnp.sum(jnp.argmax(log_probs, axis=1) == labels)}


def train_epoch(model: Net, optimizer: nnx.Optimizer, key: jax.Array, batches: Iterable[tuple[jax.Array, jax.Array]],
                report: Callable[[int, Metrics], None], label_smoothing: float = 0.0,
                averaged: AveragedModel | None = None) -> None:
    """Every batch through `train_step`, the host one batch ahead as in jax_impl.training.train_epoch:
    the next batch is prepared while the step just queued computes, and `report(images,
    metrics)` reads a step's metrics only after that, one step behind.

    Only an EMA goes into the step: an SWA average changes once an epoch (`swa_step`), and
    `nnx.jit` would otherwise walk its copy of the model at every step for nothing."""
    model.train()
    every_step = averaged if averaged is not None and averaged.ema_decay is not None else None
    batches = iter(batches)
    batch, in_flight = next(batches, None), None
    while batch is not None:
        metrics = train_step(model, optimizer, batch, key, label_smoothing, every_step)
        count, batch = batch[1].shape[-1], next(batches, None)
        if in_flight:
            report(*in_flight)
        in_flight = (count, metrics)
    if in_flight:
        report(*in_flight)


@nnx.jit
def swa_step(model: Net, averaged: AveragedModel) -> None:
    """`model`'s current weights taken into its SWA average (at the end of an epoch)."""
    averaged.update_parameters(model)


@nnx.jit
def is_finite(model: Net, averaged: AveragedModel | None = None) -> jax.Array:
    """Whether every weight and BatchNorm statistic, trained and averaged, is finite (checked
    before a checkpoint is written)."""
    trees = [variables_of(model)] + ([] if averaged is None else [variables_of(averaged.module)])
    return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(trees)]))


@nnx.jit
def eval_step(model: Net, images: jax.Array) -> jax.Array:
    """Log-probabilities of `model` as it is (put it in eval mode first)."""
    return model(images)


def predict(model: Net, images: np.ndarray, batch_size: int,
            placement: jax.Device | jax.sharding.NamedSharding) -> np.ndarray:
    """Eval-mode log-probabilities of normalised images (N, 28, 28), `batch_size` at a time, each
    batch placed on a device or split over several as the linen twin's `predict` does (which
    this calls, with the model where the linen twin passes its variables). Split, the outputs
    are gathered onto every device first, as the linen twin's compiled step returns them, so
    that each process can read them whole."""
    model.eval()
    whole = placement
    if isinstance(placement, jax.sharding.NamedSharding):
        whole = jax.sharding.NamedSharding(placement.mesh, jax.sharding.PartitionSpec())
    return linen_training.predict(lambda model, batch: jax.device_put(eval_step(model, batch), whole), model, images,
                                  batch_size, placement)
