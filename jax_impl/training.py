"""JAX training as pure functions, state in and state out; read it top to bottom.

1. `create_train_state`: a model's fresh weights, an empty optimiser state and a seed's dropout key.
2. `train_step`: one SGD step, returning the new state instead of mutating it.
3. One epoch, two ways, both consuming the core's `EpochPlan` so the batches are the same:
   `train_epoch` dispatches one compiled step per host-prepared batch (fastest on CPU, where
   XLA runs a convolution inside `lax.scan` markedly slower), and `scan_epoch` is a whole
   epoch as one `lax.scan` over device-resident uint8 data (the choice on accelerators).
4. `swa_step`: the weights taken into their average at the end of an epoch (an EMA is taken
   in `train_step`); `evaluated_variables_of`: the average, where the recipe keeps one.
5. `eval_step` and `predict`: eval-mode log-probabilities from variables alone.

One seed throughout. Nothing here reads a clock, a file or a flag: jax_impl.train compiles
these functions, feeds them and records their results; jax_impl.seeds stacks several seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from common.recipes import Recipe
from common.spec import IMAGE_SIZE, NUM_CLASSES
from jax_impl import augment
from jax_impl.averaging import WeightAverage, ema_update, evaluated_variables, start_average, swa_update
from jax_impl.model import Net

Metrics = dict[str, jax.Array]  # a batch's summed loss and correct count


class TrainState(train_state.TrainState):
    """Flax's TrainState (step, params, optimiser state, apply_fn, tx) plus BatchNorm statistics,
    the averaged weights of a recipe that keeps them (jax_impl.averaging), and two static fields
    (like apply_fn), so that the step that reads them stays a function of the state alone: the
    recipe's label smoothing and its EMA decay (None: no average taken at every step)."""

    batch_stats: Any
    averaged: WeightAverage | None = None
    label_smoothing: float = struct.field(pytree_node=False, default=0.0)
    ema_decay: float | None = struct.field(pytree_node=False, default=None)


def create_train_state(model: Net, tx: optax.GradientTransformation, seed: int,
                       recipe: Recipe) -> tuple[TrainState, jax.Array]:
    """`model`'s fresh weights (PyTorch's initial distributions), `tx`'s empty optimiser state,
    and the seed's dropout key: the seed's root key splits into the two."""
    init_key, dropout_key = jax.random.split(jax.random.key(seed))
    # One program rather than op by op: eagerly, each initialiser's random ops compile on their own.
    initialise = jax.jit(model.init, static_argnames="train")
    variables = initialise(init_key, jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1), jnp.float32), train=False)
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        averaged=start_average(variables, recipe),
        tx=tx,
        label_smoothing=recipe.label_smoothing,
        ema_decay=recipe.ema_decay if recipe.average == "ema" else None,
    )
    return state, dropout_key


def training_loss(log_probs: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean negative log-likelihood, as torch.nn.functional.nll_loss; with label smoothing, as
    torch's cross_entropy(label_smoothing=...): a weight 1 - label_smoothing on the true class's
    term and label_smoothing on the mean of all ten log-probabilities."""
    nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=1).mean()
    if not label_smoothing:
        return nll
    return (1 - label_smoothing) * nll - label_smoothing * log_probs.mean()


def check_batch(images: jax.Array, labels: jax.Array) -> None:
    """Trace-time checks: they cost nothing per step and catch NCHW or integer inputs early."""
    chex.assert_rank(images, 4)
    chex.assert_shape(images, (None, IMAGE_SIZE, IMAGE_SIZE, 1))
    chex.assert_type(images, float)
    chex.assert_shape(labels, (images.shape[0],))
    chex.assert_type(labels, jnp.int32)


def train_step(state: TrainState, batch: tuple[jax.Array, jax.Array], key: jax.Array) -> tuple[TrainState, Metrics]:
    """One SGD step on (images NHWC float32, labels int32).

    `key` is the run's dropout key; this step's masks come from fold_in(key, state.step), so
    the masks depend only on the seed and the step number, and a resumed run draws the same.
    """
    images, labels = batch
    check_batch(images, labels)
    step_key = jax.random.fold_in(key, state.step)

    def loss_fn(params):
        log_probs, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True,
            rngs={"dropout": step_key}, mutable=["batch_stats"],
        )
        return training_loss(log_probs, labels, state.label_smoothing), (log_probs, updates["batch_stats"])

    (loss, (log_probs, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if state.ema_decay is not None:
        state = state.replace(averaged=ema_update(state.averaged, variables_of(state), state.ema_decay))
    metrics = {"loss_sum": loss * labels.shape[0], "correct": jnp.sum(jnp.argmax(log_probs, axis=1) == labels)}
    return state, metrics


def train_epoch(step: Callable, state: TrainState, key: jax.Array,
                batches: Iterable[tuple[jax.Array, jax.Array]], report: Callable[[int, Metrics], None]) -> TrainState:
    """Every batch through `step` (the compiled `train_step`), the host one batch ahead: JAX
    returns from `step` as soon as the step is queued, and the loop prepares the next batch
    before it waits for anything, so that the host's work overlaps the device's.
    `report(images, metrics)` reads a step's metrics only after that, one step behind."""
    batches = iter(batches)
    batch, in_flight = next(batches, None), None
    while batch is not None:
        state, metrics = step(state, batch, key)
        count, batch = batch[1].shape[-1], next(batches, None)
        if in_flight:
            report(*in_flight)  # waits for the previous step only
        in_flight = (count, metrics)
    if in_flight:
        report(*in_flight)
    return state


def scan_epoch(state: TrainState, key: jax.Array, images: jax.Array, labels: jax.Array, order: jax.Array,
               crop: jax.Array, source_index: jax.Array, crop_size: int) -> tuple[TrainState, Metrics]:
    """One seed's batches order[i] (with their augmentation draws) for every i, entirely on the
    device: gather the uint8 images, augment (jax_impl.augment, bit-identical to the core's
    NumPy warp), normalise and step, in one `lax.scan`."""

    def body(state, batch):
        positions, batch_crop, batch_source = batch
        pixels = augment.augment(images[positions], batch_crop, batch_source, crop_size)
        return train_step(state, (augment.normalize(pixels)[..., None], labels[positions]), key)

    return jax.lax.scan(body, state, (order, crop, source_index))


def swa_step(state: TrainState) -> TrainState:
    """The state with its current weights taken into its SWA average (at the end of an epoch)."""
    return state.replace(averaged=swa_update(state.averaged, variables_of(state)))


def is_finite(state: TrainState) -> jax.Array:
    """Whether every weight and BatchNorm statistic, trained and averaged, is finite (checked
    before a checkpoint is written)."""
    leaves = jax.tree_util.tree_leaves((variables_of(state), state.averaged))
    return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in leaves]))


def eval_step(apply_fn: Callable, variables: dict, images: jax.Array) -> jax.Array:
    """Eval-mode log-probabilities (running BatchNorm statistics, no dropout) of variables
    {"params", "batch_stats"}: no optimiser state is needed to evaluate."""
    chex.assert_rank(images, 4)
    chex.assert_type(images, float)
    log_probs = apply_fn(variables, images, train=False)
    chex.assert_shape(log_probs, (images.shape[0], NUM_CLASSES))
    return log_probs


def variables_of(state: TrainState) -> dict:
    """The trained weights, all a model needs to predict: {"params", "batch_stats"}."""
    return {"params": state.params, "batch_stats": state.batch_stats}


def evaluated_variables_of(state: TrainState) -> dict:
    """The weights evaluated and saved: the average, when the recipe keeps one and it holds any."""
    return evaluated_variables(variables_of(state), state.averaged)


def predict(evaluate: Callable, variables: dict, images: np.ndarray, batch_size: int,
            placement: jax.Device | jax.sharding.Sharding) -> np.ndarray:
    """Log-probabilities of normalised images (N, 28, 28), `batch_size` at a time, through
    `evaluate` (a compiled `eval_step`; batched over stacked variables, it gives one row per
    entry of their leading axis, the images' axis being the second to last). `placement`
    is a device, or a sharding that splits each batch over several devices: a batch is then
    padded to a multiple of their number with blank images, whose outputs are dropped (eval mode
    computes every image on its own, so the padding changes no other output)."""
    parts = placement.num_devices if isinstance(placement, jax.sharding.Sharding) else 1
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size, ..., None]
        padding = -len(batch) % parts
        if padding:
            batch = np.concatenate([batch, np.zeros((padding, *batch.shape[1:]), batch.dtype)])
        outputs.append((evaluate(variables, jax.device_put(batch, placement)), len(batch) - padding))
    return np.concatenate([np.asarray(out)[..., :count, :] for out, count in outputs], axis=-2)
