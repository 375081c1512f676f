"""(c, continued) Dropout without injected masks: the frameworks draw different masks from the
same seed by design, so their statistics are compared instead of their values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import linen as nn

from common.recipes import SEED
from jax_impl.model import Net as FlaxNet
from jax_impl.training import train_step
from tests.frameworks import new_jax_state
from tests.parity.helpers import flax_variables, nchw_to_nhwc, torch_model


def mask_statistics(kept: np.ndarray) -> tuple[float, float]:
    """(share of kept activations, share of whole (image, channel) maps dropped); NCHW."""
    maps = kept.reshape(kept.shape[0], kept.shape[1], -1)
    return float(kept.mean()), float((~maps.any(axis=2)).mean())


def torch_kept(model, images) -> np.ndarray:
    seen = {}
    model.drop1.register_forward_hook(lambda m, inputs, out: seen.update(x=inputs[0], y=out))
    with torch.no_grad():
        model.train()(torch.as_tensor(images))
    kept = (seen["y"] != 0).numpy()
    assert (seen["x"] != 0).all()  # BatchNorm outputs are never exactly 0 here
    return kept


def flax_kept(variables, images, layers) -> np.ndarray:
    _, state = FlaxNet(layers=layers).apply(variables, jnp.asarray(nchw_to_nhwc(images)), train=True,
                               rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats", "intermediates"],
                               capture_intermediates=lambda module, _: module.name == "drop1")
    output = np.asarray(state["intermediates"]["drop1"]["__call__"][0])
    return (output != 0).transpose(0, 3, 1, 2)


def test_dropout_is_element_wise_at_the_same_rate_in_both(synthetic_images, layers):
    model = torch_model()
    variables = flax_variables(model)
    torch.manual_seed(0)
    ours = mask_statistics(flax_kept(variables, synthetic_images, layers))
    theirs = mask_statistics(torch_kept(model, synthetic_images))
    # 256 x 16 x 24 x 24 = 2.4M Bernoulli(0.85) draws: standard deviation of the share 2.3e-4.
    for kept_share, dropped_maps in (ours, theirs):
        assert abs(kept_share - 0.85) < 5 * 2.3e-4
        assert dropped_maps == 0  # element-wise: a whole 24x24 map is never dropped
    assert abs(ours[0] - theirs[0]) < 5 * 2.3e-4 * np.sqrt(2)


def test_each_training_step_draws_new_masks_in_both(synthetic_images, layers):
    """Two consecutive training steps drop independent activations. With Bernoulli(0.85) masks,
    two independent draws agree at a share 0.85^2 + 0.15^2 = 0.745 of the elements (identical
    masks: 1.0). 32 x 16 x 24 x 24 = 295k elements, so the share has a standard deviation of
    8e-4; five of them is the bound. JAX runs jax_impl.training.train_step itself, whose masks come
    from the run's key and the step number."""
    images = synthetic_images[:32]
    expected_agreement, bound = 0.85**2 + 0.15**2, 5 * 8e-4
    model = torch_model()
    torch.manual_seed(0)
    torch_steps = [torch_kept(model, images) for _ in range(2)]
    assert abs((torch_steps[0] == torch_steps[1]).mean() - expected_agreement) < bound

    state = new_jax_state(SEED, 10, layers)[0]
    variables = flax_variables(model)
    state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
    kept = []

    def record_drop1(next_fun, args, kwargs, context):
        output = next_fun(*args, **kwargs)
        if context.module.name == "drop1" and context.method_name == "__call__":
            jax.debug.callback(lambda mask: kept.append(np.asarray(mask).transpose(0, 3, 1, 2)), output != 0)
        return output

    @jax.jit
    def step(state, batch):
        with nn.intercept_methods(record_drop1):
            return train_step(state, batch, jax.random.key(1))

    batch = (jnp.asarray(nchw_to_nhwc(images)), jnp.asarray(np.arange(32) % 10, jnp.int32))
    for _ in range(2):
        state, _ = step(state, batch)
    jax.effects_barrier()
    assert len(kept) == 2
    assert abs((kept[0] == kept[1]).mean() - expected_agreement) < bound
