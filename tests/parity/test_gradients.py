"""(d) Gradients of the training loss with respect to every parameter.

Train mode (batch statistics) with the same injected dropout masks, 64 synthetic images.
float64: only the order of reductions differs; gradients agree to ~1e-14 relative, and the
required 1e-10 (relative to each tensor's norm) leaves four orders of magnitude. A kink (a ReLU
input near 0, a max-pool window with two near-equal values) decided the other way would need a
rounding error of its size; the nearest kinks of these inputs lie ~5e-8 of their layer's largest
activation from flipping, eight orders beyond float64's ~1e-16. This is the test of equality.

float32 is what users see, and two parts bound it on any CPU:
- Rounding: the gradients of this model are themselves only accurate to ~1e-4 of their norm in
  float32 (BatchNorm's backward subtracts nearly equal sums); two such results can be 2e-4
  apart. The size of a rounding error is float32's and the computation's, whichever kernel a
  CPU picks (docs/tolerances.md: 1.1e-4 PyTorch, 3.5e-5 JAX, against float64).
- Kinks: float32 rounding moves an activation by up to ~1e-5 of its layer's largest (a K-term
  sum is within K * 2**-24 of its terms' sizes, K <= 144 here), and a ReLU or max-pool decision
  that close to its threshold may go either way in either framework, on one CPU or another.
  Each flip moves a gradient by a discrete amount, so the bound adds the largest change that
  flipping every such kink at once makes to the float64 gradient (`kinks_flipped`), computed
  for these inputs in the test itself: ~6% for this batch. Where no kink flips, the two agree to
  ~1e-4 (printed).
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
from tests.parity.helpers import (
    dropout_masks,
    flax_forward,
    flax_variables,
    kinks_flipped,
    nchw_to_nhwc,
    torch_model,
)
from torch_ref import training as torch_training


def torch_gradients(model, images, labels, masks, label_smoothing):
    from tests.parity.helpers import torch_masks

    model.train()
    model.zero_grad()
    with torch_masks(model, masks):
        loss = torch_training.training_loss(model(images), labels, label_smoothing)
    loss.backward()
    return loss.item(), {name: p.grad.detach().numpy() for name, p in model.named_parameters()}


MODEL_SEED = 5
FLOAT64_RELATIVE = 1e-10
FLOAT32_ROUNDING = 2e-4  # two float32 gradients, each ~1e-4 of its norm from the float64 one
KINK_REACH = 1e-5  # how far float32 rounding may move an activation, relative to its layer's largest


def kink_flip_bound(images: np.ndarray, labels: np.ndarray, masks: dict, label_smoothing: float) -> float:
    """The largest change, relative to its norm, of any parameter's float64 gradient when every
    kink within KINK_REACH is decided the other way."""
    model = torch_model(seed=MODEL_SEED, dtype=torch.float64)
    inputs, targets = torch.as_tensor(images, dtype=torch.float64), torch.as_tensor(labels)
    _, exact = torch_gradients(model, inputs, targets, masks, label_smoothing)
    with kinks_flipped(model, KINK_REACH):
        _, flipped = torch_gradients(model, inputs, targets, masks, label_smoothing)
    return max(float(np.linalg.norm(flipped[name] - grad) / np.linalg.norm(grad)) for name, grad in exact.items())


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


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=["nll", "smoothed"])
def test_parameter_gradients_match(synthetic_images, synthetic_mnist, dtype_name, compiled, label_smoothing, layers,
                                   capsys):
    if dtype_name == "float64":
        jax.config.update("jax_enable_x64", True)
    try:
        torch_dtype, jax_dtype = {"float32": (torch.float32, jnp.float32),
                                  "float64": (torch.float64, jnp.float64)}[dtype_name]
        model = torch_model(seed=MODEL_SEED, dtype=torch_dtype)
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
    rounding = FLOAT32_ROUNDING if dtype_name == "float32" else FLOAT64_RELATIVE
    assert loss == pytest.approx(expected_loss, rel=rounding)  # a flipped kink does not move a value, only a slope
    relative = rounding + (kink_flip_bound(images, labels, masks, label_smoothing) if dtype_name == "float32" else 0)
    assert set(ours) == set(expected) and len(ours) == 16
    errors = {name: float(np.linalg.norm(ours[name] - grad) / np.linalg.norm(grad)) for name, grad in expected.items()}
    with capsys.disabled():
        print(f"\n{dtype_name} gradients: largest relative difference {max(errors.values()):.1e}, bound {relative:.1e}")
    for name, error in errors.items():
        assert error < relative, f"{name}: relative error {error:.2e}"
