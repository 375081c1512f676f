"""Paired models for the parity suite: one set of weights, in PyTorch and in Flax.

The PyTorch model is the source of truth; its weights, including non-trivial BatchNorm
statistics and affine parameters, are converted with `bridge.convert` (so the conversion is
under test everywhere the pair is used). Dropout masks are injected into both frameworks, in
PyTorch with forward hooks and in Flax with `nn.intercept_methods`, because the two draw
different masks from the same seed by design. The Flax model is built from the layers a test
asks for (plain or fast, see jax_impl.fast.choice).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import linen as nn

from bridge.convert import torch_to_flax
from jax_impl.model import Layers
from jax_impl.model import Net as FlaxNet
from torch_ref.model import Net as TorchNet

DROPOUT_LAYERS = {"drop1": (16, 24, 24), "drop2": (16, 10, 10)}  # name -> (C, H, W)


def torch_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> TorchNet:
    """A PyTorch model with random weights and random, non-trivial BatchNorm state."""
    torch.manual_seed(seed)
    model = TorchNet()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for i in range(1, 6):
            bn = getattr(model, f"bn{i}")
            size = bn.num_features
            bn.weight.copy_(1 + 0.3 * torch.randn(size, generator=generator))
            bn.bias.copy_(0.3 * torch.randn(size, generator=generator))
            bn.running_mean.copy_(0.5 * torch.randn(size, generator=generator))
            bn.running_var.copy_(0.5 + 1.5 * torch.rand(size, generator=generator))
    return model.to(dtype)


def flax_variables(model: TorchNet, dtype=jnp.float32) -> dict:
    """The same weights as Flax variables, through the project's converter."""
    # Copies: JAX may alias NumPy memory on CPU, and PyTorch updates its statistics in place.
    state_dict = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), torch_to_flax(state_dict))


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))


def dropout_masks(rng: np.random.Generator, batch: int, keep: float = 0.85) -> dict[str, np.ndarray]:
    """Element-wise Bernoulli(keep) masks, NCHW, for both dropout layers."""
    return {name: (rng.random((batch, *shape)) < keep).astype(np.float64) for name, shape in DROPOUT_LAYERS.items()}


@contextlib.contextmanager
def torch_masks(model: TorchNet, masks: dict[str, np.ndarray]) -> Iterator[None]:
    """Make the model's Dropout layers apply `masks` (inverted dropout, scale 1/(1-p))."""
    handles = []
    for name, mask in masks.items():
        layer = getattr(model, name)

        def apply(module, inputs, output, mask=mask):
            if not module.training:
                return output
            return inputs[0] * torch.as_tensor(mask, dtype=inputs[0].dtype) / (1 - module.p)

        handles.append(layer.register_forward_hook(apply))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def flax_masks(masks: dict[str, jax.Array]) -> Iterator[None]:
    """Make every Flax Dropout called `drop1`/`drop2` apply the given NHWC masks. The masks may
    be traced arrays, so a jitted function can take them as arguments."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, nn.Dropout) and context.method_name == "__call__" and module.name in masks:
            deterministic = kwargs.get("deterministic", module.deterministic)
            if not deterministic:
                x = args[0]
                return x * masks[module.name].astype(x.dtype) / (1 - module.rate)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


def flax_forward(variables: dict, images_nhwc, train: bool, masks: dict | None, layers: Layers):
    """(log-probs, updated batch_stats or None) of the Flax model built from `layers`."""
    model = FlaxNet(layers=layers)
    with flax_masks(masks or {}):
        if train:
            out, updates = model.apply(variables, images_nhwc, train=True, mutable=["batch_stats"],
                                       rngs={"dropout": jax.random.key(0)})
            return out, updates["batch_stats"]
        return model.apply(variables, images_nhwc, train=False), None


class _PoolRoutedToRunnerUp(torch.nn.Module):
    """2x2 max pooling whose gradient goes, in every window whose two largest values are within
    `reach` of each other (but not equal), to the second largest instead of the largest."""

    def __init__(self, reach: float):
        super().__init__()
        self.reach = reach

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        windows = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
        order = torch.argsort(windows.detach(), dim=-1, stable=True)
        ranked = torch.gather(windows.detach(), -1, order)
        gap = ranked[..., 3] - ranked[..., 2]
        near = (gap > 0) & (gap < self.reach * x.detach().abs().max())
        chosen = torch.where(near, order[..., 2], windows.detach().argmax(-1))
        return torch.gather(windows, -1, chosen[..., None])[..., 0]


@contextlib.contextmanager
def kinks_flipped(model: TorchNet, reach: float) -> Iterator[None]:
    """Every kink of the forward pass within `reach` (relative to its layer's largest activation)
    decided the other way: a ReLU input that close to 0 passes its gradient if it was negative
    and blocks it if positive; a max-pool window whose two largest values are that close sends
    its gradient to the other one. The worst a rounding error of that size could do to a gradient."""
    relu = torch.nn.functional.relu

    def flipped_relu(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        near = (x != 0) & (x.abs() < reach * x.detach().abs().max())
        return x * ((x > 0) ^ near).to(x.dtype)

    pools = model.pool1, model.pool2
    torch.nn.functional.relu = flipped_relu
    model.pool1, model.pool2 = _PoolRoutedToRunnerUp(reach), _PoolRoutedToRunnerUp(reach)
    try:
        yield
    finally:
        torch.nn.functional.relu = relu
        model.pool1, model.pool2 = pools
