"""(l) Weight averaging: torch.optim.swa_utils.AveragedModel (EMA and SWA rules, use_buffers=True)
against jax_impl.averaging, one update at a time and after training steps.

One update at a time: both take in the same sequence of weights and BatchNorm statistics, so
they differ only by rounding. float64: 1e-12, a few roundings of values of order 1. float32:
each update rounds once in each framework and torch's lerp may fuse its multiply-add where XLA
does not, which changes a rounding by at most 1 ulp on any CPU; the EMA forgets old roundings
and SWA's 1 / (n + 1) weights shrink them, so after 20 updates they stay within a few ulps: 1e-6 relative and absolute.

After training steps: both frameworks train from the same weights on the same batches and
dropout masks (tests/parity/test_trajectory.py) in float64, JAX averaging inside its compiled
`train_step` (EMA) or through `swa_step` (SWA, every 10 steps as at the end of an epoch), PyTorch
through torch_ref.averaging's AveragedModel. 30 steps keep the trajectories within 1e-10 of each
other (float64 reduction order only); the averages, weighted means of them, too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bridge.convert import flax_to_torch, torch_to_flax
from common.recipes import SEED
from jax_impl.averaging import WeightAverage, ema_update, evaluated_variables, start_average, swa_update
from jax_impl.training import evaluated_variables_of, swa_step, train_step
from tests.frameworks import new_jax_state
from tests.parity.helpers import dropout_masks, flax_masks, flax_variables, nchw_to_nhwc, torch_masks, torch_model
from tests.parity.test_trajectory import shared_batches
from torch_ref.averaging import averaged_model

PRECISIONS = {"float32": (torch.float32, jnp.float32, 1e-6), "float64": (torch.float64, jnp.float64, 1e-12)}
UPDATES = 20
STEPS, EPOCH_STEPS, BATCH = 30, 10, 64
DECAY = 0.9  # remembers about 10 steps: far enough from the last weights that a wrong rule shows


@pytest.fixture
def precision(precision_name):
    return PRECISIONS[precision_name]


def recipe(kind: str):
    return SEED.with_overrides(average=kind, ema_decay=DECAY)


def model_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The state_dict as arrays, without num_batches_tracked (JAX keeps no such counter)."""
    return {key: value.detach().numpy().copy() for key, value in model.state_dict().items()
            if not key.endswith("num_batches_tracked")}


@pytest.mark.parametrize("kind", ["ema", "swa"])
def test_every_update_matches_averaged_model(kind, precision):
    torch_dtype, jax_dtype, tolerance = precision
    model = torch_model(dtype=torch_dtype)
    averaged = averaged_model(model, recipe(kind))
    average = start_average(flax_variables(model, jax_dtype), recipe(kind))
    rng = np.random.default_rng(3)
    for update in range(UPDATES):
        with torch.no_grad():  # a new version of every weight and statistic (variances stay positive)
            for name, value in model.state_dict().items():
                if value.is_floating_point():
                    step = torch.as_tensor(rng.normal(0, 0.1, value.shape), dtype=torch_dtype)
                    value.copy_(value * torch.exp(step) if name.endswith("running_var") else value + step)
        averaged.update_parameters(model)
        variables = torch_to_flax(model_weights(model))
        variables = jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf, jax_dtype), variables)
        average = ema_update(average, variables, DECAY) if kind == "ema" else swa_update(average, variables)
        assert int(average.count) == int(averaged.n_averaged) == update + 1
        ours = flax_to_torch(average.variables)
        for key, theirs in model_weights(averaged.module).items():
            np.testing.assert_allclose(ours[key], theirs, rtol=tolerance, atol=tolerance,
                                       err_msg=f"{key}, update {update}")


def steps_to_average(data) -> tuple[list, list[dict[str, np.ndarray]]]:
    """The STEPS batches and dropout masks both frameworks train on."""
    rng = np.random.default_rng(11)
    return shared_batches(data)[:STEPS], [dropout_masks(rng, BATCH) for _ in range(STEPS)]


def train_torch(batches: list, masks: list[dict[str, np.ndarray]], kind: str) -> tuple[torch.nn.Module, object]:
    """(model, AveragedModel) after float64 SGD steps from torch_model(seed=7), averaging by the
    recipe: after every step (EMA) or every EPOCH_STEPS steps (SWA)."""
    model = torch_model(seed=7, dtype=torch.float64).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=SEED.lr, momentum=SEED.momentum)
    averaged = averaged_model(model, recipe(kind))
    for step, (batch, step_masks) in enumerate(zip(batches, masks, strict=True), start=1):
        optimizer.zero_grad()
        with torch_masks(model, step_masks):
            F.nll_loss(model(torch.as_tensor(batch.images[:, None], dtype=torch.float64)),
                       torch.as_tensor(batch.labels)).backward()
        optimizer.step()
        if kind == "ema" or step % EPOCH_STEPS == 0:
            averaged.update_parameters(model)
    return model, averaged


def train_both(data, kind: str):
    """STEPS float64 SGD steps in both frameworks, each averaging its weights by the recipe."""
    batches, masks = steps_to_average(data)
    variables = flax_variables(torch_model(seed=7, dtype=torch.float64), jnp.float64)
    _, averaged = train_torch(batches, masks, kind)

    state = new_jax_state(recipe(kind), EPOCH_STEPS)[0]
    state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"],
                          opt_state=state.tx.init(variables["params"]),
                          averaged=start_average(variables, recipe(kind)))

    @jax.jit
    def step(state, images, labels, step_masks):
        with flax_masks(step_masks):
            return train_step(state, (images, labels), jax.random.key(0))[0]

    for number, (batch, step_masks) in enumerate(zip(batches, masks, strict=True), start=1):
        nhwc = {name: jnp.asarray(nchw_to_nhwc(mask), jnp.float64) for name, mask in step_masks.items()}
        state = step(state, jnp.asarray(batch.images[..., None], jnp.float64), jnp.asarray(batch.labels, jnp.int32),
                     nhwc)
        if kind == "swa" and number % EPOCH_STEPS == 0:
            state = jax.jit(swa_step)(state)
    return state, averaged


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ema", "swa"])
def test_averaged_weights_after_training_steps_match(kind, synthetic_mnist, float64):
    state, averaged = train_both(synthetic_mnist, kind)
    assert int(state.averaged.count) == int(averaged.n_averaged) == (STEPS if kind == "ema" else STEPS // EPOCH_STEPS)
    theirs = model_weights(averaged.module)
    evaluated = flax_to_torch(evaluated_variables_of(state))
    trained = flax_to_torch({"params": state.params, "batch_stats": state.batch_stats})
    ours = flax_to_torch(state.averaged.variables)
    for key, value in theirs.items():
        np.testing.assert_allclose(ours[key], value, rtol=1e-10, atol=1e-12 * np.abs(value).max(), err_msg=key)
        np.testing.assert_array_equal(evaluated[key], ours[key], err_msg=f"{key}: not the average evaluated")
    # The average is not the last weights (else this test could not tell a wrong rule apart).
    assert max(np.abs(trained[key] - theirs[key]).max() / np.abs(theirs[key]).max() for key in theirs) > 1e-3


def test_an_empty_average_evaluates_the_trained_weights():
    """SWA holds nothing before its first epoch: evaluation uses the trained weights meanwhile."""
    variables = flax_variables(torch_model())
    average = start_average(variables, recipe("swa"))
    assert isinstance(average, WeightAverage) and int(average.count) == 0
    for ours, trained in zip(jax.tree_util.tree_leaves(evaluated_variables(variables, average)),
                             jax.tree_util.tree_leaves(variables), strict=True):
        np.testing.assert_array_equal(ours, trained)
    assert start_average(variables, SEED) is None
