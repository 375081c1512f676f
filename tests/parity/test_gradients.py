"""(d) Gradients of the training loss with respect to every parameter.

Train mode (batch statistics) with the same injected dropout masks, 64 synthetic images.
float64: only the order of reductions differs; gradients agree to ~1e-14 relative, and the
required 1e-10 (relative to each tensor's norm) leaves four orders of magnitude.
float32: the gradients of this model are themselves only accurate to ~1e-4 of their norm in
float32 (BatchNorm's backward subtracts nearly equal sums). Measured for three weight seeds:
PyTorch float32 vs the float64 gradient 1.1e-4, JAX float32 vs float64 3.5e-5, JAX vs PyTorch
in float32 0.9-1.1e-4. Two results each ~1e-4 from the truth can be 2e-4 apart; 1e-3 bounds
that with a factor 5 to spare.
With label smoothing the loss gains a term in every log-probability; the same bounds hold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bridge.convert import flax_to_torch
from jax_impl import training as jax_training
from tests.parity.helpers import dropout_masks, flax_forward, flax_variables, nchw_to_nhwc, torch_model
from torch_ref import training as torch_training


def torch_gradients(model, images, labels, masks, label_smoothing):
    from tests.parity.helpers import torch_masks

    model.train()
    model.zero_grad()
    with torch_masks(model, masks):
        loss = torch_training.training_loss(model(images), labels, label_smoothing)
    loss.backward()
    return loss.item(), {name: p.grad.detach().numpy() for name, p in model.named_parameters()}


def flax_gradients(variables, images, labels, masks, compiled, label_smoothing, layers):
    def loss_fn(params):
        log_probs, _ = flax_forward({"params": params, "batch_stats": variables["batch_stats"]}, images, True, masks,
                                    layers)
        return jax_training.training_loss(log_probs, labels, label_smoothing)

    value_and_grad = jax.value_and_grad(loss_fn)
    if compiled:
        value_and_grad = jax.jit(value_and_grad)
    loss, grads = value_and_grad(variables["params"])
    # Gradients have the layout of the parameters: convert them like weights.
    as_torch = flax_to_torch({"params": grads, "batch_stats": variables["batch_stats"]})
    return float(loss), {k: v for k, v in as_torch.items() if not k.split(".")[1].startswith(("running", "num"))}


@pytest.mark.parametrize("dtype_name, relative", [("float32", 1e-3), ("float64", 1e-10)])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=["nll", "smoothed"])
def test_parameter_gradients_match(synthetic_images, synthetic_mnist, dtype_name, relative, compiled, label_smoothing,
                                   layers):
    if dtype_name == "float64":
        jax.config.update("jax_enable_x64", True)
    try:
        torch_dtype, jax_dtype = {"float32": (torch.float32, jnp.float32),
                                  "float64": (torch.float64, jnp.float64)}[dtype_name]
        model = torch_model(seed=5, dtype=torch_dtype)
        variables = flax_variables(model, jax_dtype)
        images = synthetic_images[:64]
        labels = synthetic_mnist.train_labels[:64].astype(np.int64)
        masks = dropout_masks(np.random.default_rng(3), 64)
        expected_loss, expected = torch_gradients(model, torch.as_tensor(images, dtype=torch_dtype),
                                                  torch.as_tensor(labels), masks, label_smoothing)
        nhwc_masks = {name: jnp.asarray(nchw_to_nhwc(mask)) for name, mask in masks.items()}
        loss, ours = flax_gradients(variables, jnp.asarray(nchw_to_nhwc(images), jax_dtype),
                                    jnp.asarray(labels, jnp.int32), nhwc_masks, compiled, label_smoothing, layers)
    finally:
        jax.config.update("jax_enable_x64", False)
    assert loss == pytest.approx(expected_loss, rel=relative)
    assert set(ours) == set(expected) and len(ours) == 16
    for name, grad in expected.items():
        error = np.linalg.norm(ours[name] - grad) / np.linalg.norm(grad)
        assert error < relative, f"{name}: relative error {error:.2e}"
