"""(c, continued) Dropout without injected masks: the frameworks draw different masks from the
same seed by design, so their statistics are compared instead of their values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jax_impl.model import Net as FlaxNet
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


def test_dropout_is_element_wise_at_the_same_rate_in_both(test_images, layers):
    model = torch_model()
    variables = flax_variables(model)
    torch.manual_seed(0)
    ours = mask_statistics(flax_kept(variables, test_images, layers))
    theirs = mask_statistics(torch_kept(model, test_images))
    # 256 x 16 x 24 x 24 = 2.4M Bernoulli(0.85) draws: standard deviation of the share 2.3e-4.
    for kept_share, dropped_maps in (ours, theirs):
        assert abs(kept_share - 0.85) < 5 * 2.3e-4
        assert dropped_maps == 0  # element-wise: a whole 24x24 map is never dropped
    assert abs(ours[0] - theirs[0]) < 5 * 2.3e-4 * np.sqrt(2)
