"""(b) eval-mode and (c) train-mode forward passes, the same weights in both frameworks.

Tolerances: in float64 only the order of floating-point reductions differs (a conv output
sums up to 144 products), so agreement is near 1e-15 and 1e-12 leaves margin. In float32 the
same reordering gives errors of a few float32 ulps per layer on values up to ~20 in magnitude
(log-probabilities of confident digits), ~1e-6 after 6 layers; 1e-5 is the bound users see.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.parity.helpers import (
    dropout_masks,
    flax_forward,
    flax_variables,
    nchw_to_nhwc,
    torch_masks,
    torch_model,
)

PRECISIONS = {"float32": (torch.float32, jnp.float32, 1e-5), "float64": (torch.float64, jnp.float64, 1e-12)}


def run_flax(variables, images, train, masks, layers, compiled):
    if compiled:
        return jax.jit(flax_forward, static_argnums=(2, 4))(variables, images, train, masks, layers)
    return flax_forward(variables, images, train, masks, layers)


@pytest.fixture(params=["float32", "float64"])
def precision(request):
    if request.param == "float64":
        jax.config.update("jax_enable_x64", True)
    yield PRECISIONS[request.param]
    jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("batch", [1, 7, 256])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "jit"])
def test_eval_forward_matches(synthetic_images, precision, batch, compiled, layers):
    torch_dtype, jax_dtype, tolerance = precision
    model = torch_model(dtype=torch_dtype).eval()
    images = synthetic_images[:batch]
    with torch.no_grad():
        expected = model(torch.as_tensor(images, dtype=torch_dtype)).numpy()
    variables = flax_variables(model, jax_dtype)
    ours, _ = run_flax(variables, jnp.asarray(nchw_to_nhwc(images), jax_dtype), False, None, layers, compiled)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=0, atol=tolerance)
    assert (np.asarray(ours).argmax(1) == expected.argmax(1)).all()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "jit"])
def test_train_forward_with_the_same_masks_matches_and_updates_the_same_statistics(
        synthetic_images, precision, compiled, layers):
    """Batch statistics, injected dropout masks, and the running statistics after the step:
    a biased running variance in JAX would be off by n/(n-1) = 1.0002 (bn5: 1.0016 at batch 32)."""
    torch_dtype, jax_dtype, tolerance = precision
    model = torch_model(dtype=torch_dtype).train()
    images = synthetic_images[:32]
    masks = dropout_masks(np.random.default_rng(0), len(images))
    variables = flax_variables(model, jax_dtype)  # before the step changes the statistics
    with torch_masks(model, masks), torch.no_grad():
        expected = model(torch.as_tensor(images, dtype=torch_dtype)).numpy()
    nhwc_masks = {name: jnp.asarray(nchw_to_nhwc(mask)) for name, mask in masks.items()}
    ours, batch_stats = run_flax(variables, jnp.asarray(nchw_to_nhwc(images), jax_dtype), True, nhwc_masks,
                                 layers, compiled)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=0, atol=tolerance)
    for i in range(1, 6):
        bn = getattr(model, f"bn{i}")
        # Running statistics are O(1) averages: relative tolerance as for the outputs.
        np.testing.assert_allclose(batch_stats[f"bn{i}"]["mean"], bn.running_mean.numpy(),
                                   rtol=tolerance, atol=tolerance)
        np.testing.assert_allclose(batch_stats[f"bn{i}"]["var"], bn.running_var.numpy(),
                                   rtol=tolerance, atol=tolerance)


def test_masks_matter(synthetic_images):
    """Guard for the test above: other masks give other outputs, so agreement is not vacuous."""
    model = torch_model().train()
    images = torch.as_tensor(synthetic_images[:8])
    outputs = []
    for seed in (0, 1):
        with torch_masks(model, dropout_masks(np.random.default_rng(seed), 8)), torch.no_grad():
            outputs.append(model(images).numpy())
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-3
