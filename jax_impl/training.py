"""JAX training as pure functions, state in and state out; read it top to bottom.

1. `create_train_state`: fresh weights and an empty optimiser state for one seed;
   `create_seed_states` stacks several seeds on a leading axis (one run is a group of one).
2. `train_step`: one SGD step of one seed, returning the new state instead of mutating it.
3. `over_seeds`: any per-seed function applied to every seed of a stacked state.
4. One epoch, two ways, both consuming the core's `EpochPlan` so the batches are the same:
   `train_epoch` dispatches one compiled step per host-prepared batch (fastest on CPU, where
   XLA runs a convolution inside `lax.scan` markedly slower), and `scan_epoch` is a whole
   epoch as one `lax.scan` over device-resident uint8 data (the choice on accelerators).
5. `swa_step`: the weights taken into their average at the end of an epoch (an EMA is taken
   in `train_step`); `evaluated_variables_of`: the average, where the recipe keeps one.
6. `eval_step` and `predict`: eval-mode log-probabilities from variables alone.

Nothing here reads a clock, a file or a flag: jax_impl.seed_group is the shell that compiles
these functions, feeds them and hands their results to the driver.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from flax.training import train_state

from common.recipes import Recipe
from common.spec import IMAGE_SIZE, NUM_CLASSES
from jax_impl import augment
from jax_impl.averaging import WeightAverage, ema_update, evaluated_variables, start_average, swa_update
from jax_impl.model import PLAIN_LAYERS, Layers, Net
from jax_impl.optim import make_optimizer

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


def create_train_state(
    key: jax.Array, recipe: Recipe, steps_per_epoch: int, layers: Layers = PLAIN_LAYERS
) -> TrainState:
    """Fresh weights (PyTorch's initial distributions) and an empty optimiser state. `layers`
    (see jax_impl.fast.choice) changes how the model computes, not its weights or their initial values."""
    model = Net(dropout=recipe.dropout, layers=layers)
    variables = model.init(key, jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1), jnp.float32), train=False)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        averaged=start_average(variables, recipe),
        tx=make_optimizer(recipe, steps_per_epoch),
        label_smoothing=recipe.label_smoothing,
        ema_decay=recipe.ema_decay if recipe.average == "ema" else None,
    )


def create_seed_states(
    seeds: list[int], recipe: Recipe, steps_per_epoch: int, layers: Layers = PLAIN_LAYERS
) -> tuple[TrainState, jax.Array]:
    """(states, dropout keys) of `seeds`, stacked on a leading axis. Seed s's root key splits
    into its initial weights' key and its dropout key, whatever group it is trained in."""

    def one_seed(key: jax.Array) -> tuple[TrainState, jax.Array]:
        init_key, dropout_key = jax.random.split(key)
        return create_train_state(init_key, recipe, steps_per_epoch, layers), dropout_key

    return jax.vmap(one_seed)(jnp.stack([jax.random.key(seed) for seed in seeds]))


def training_loss(log_probs: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
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


def train_step(state: TrainState, batch: tuple[jax.Array, jax.Array], key: jax.Array) -> tuple[TrainState, Metrics]:
    """One SGD step on (images NHWC float32, labels int32).

    `key` is the run's dropout key; this step's masks come from fold_in(key, state.step), so
    the masks depend only on the seed and the step number, and a resumed run draws the same.
    """
    images, labels = batch
    _check_batch(images, labels)
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


def over_seeds(function: Callable, in_axes: tuple[int | None, ...], vectorised: bool) -> Callable:
    """`function` of one seed applied to arguments stacked on a leading seed axis (in_axes 0)
    or shared by all seeds (None). Vectorised: `jax.vmap`, one batched computation. Otherwise
    seed after seed in the same compiled program: XLA turns a vmapped convolution (a batch of
    kernels) into a grouped convolution, which its CPU backend runs far slower per seed than the
    plain one (docs/fast_layers.md). `jax.lax.map` is not used for the
    seed-by-seed case because it is a `lax.scan`, whose convolutions XLA:CPU also runs slower."""
    if vectorised:
        return jax.vmap(function, in_axes=in_axes)

    def seed_by_seed(*args: Any) -> Any:
        count = next(jax.tree_util.tree_leaves(arg)[0].shape[0] for arg, axis in zip(args, in_axes, strict=True)
                     if axis == 0)
        results = [function(*(jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], arg) if axis == 0 else arg
                              for arg, axis in zip(args, in_axes, strict=True))) for i in range(count)]
        return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *results)

    return seed_by_seed


def train_epoch(step: Callable, state: TrainState, keys: jax.Array,
                batches: Iterable[tuple[jax.Array, jax.Array]], report: Callable[[int, Metrics], None]) -> TrainState:
    """Every batch through `step` (the compiled `over_seeds(train_step)`), one in flight: JAX
    dispatches step i + 1 before step i has finished, so the host prepares the next batch while
    the device computes. `report(images, metrics)` reads a step's metrics once the next is queued."""
    in_flight = None
    for inputs, targets in batches:
        state, metrics = step(state, (inputs, targets), keys)
        if in_flight:
            report(*in_flight)  # waits for the previous step only
        in_flight = (targets.shape[-1], metrics)
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
            placement: jax.Device | jax.sharding.Sharding, seed_axis: bool = False) -> np.ndarray:
    """Log-probabilities of normalised images (N, 28, 28), `batch_size` at a time, through
    `evaluate` (a compiled `eval_step`); with `seed_axis`, one row of them per seed. `placement`
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
    return np.concatenate([np.asarray(out)[..., :count, :] for out, count in outputs], axis=1 if seed_axis else 0)
