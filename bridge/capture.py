"""Every layer's inputs and output in both frameworks, in the order they ran, and dropout masks
shared between them.

PyTorch: a forward hook on every module. Flax linen: `nn.intercept_methods`, which sees every
submodule's `__call__` with its path. The two frameworks draw different dropout masks from any
seed by design, so both sides' standard dropout layers apply masks made from one set of uniform
draws: the k-th dropout call of each side gets the k-th draw (PyTorch's layout; Flax's after
moving the channels last), keeps what is >= its own rate, and shares a draw along its own
broadcast axes (PyTorch's Dropout1d/2d/3d: whole channels; Flax: `broadcast_dims`). A port whose
rate, scaling or broadcast differs from the original therefore gives other outputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import linen as nn

# The axes a PyTorch dropout layer shares one draw along (NCHW: all but batch and channel).
TORCH_DROPOUT_SHARED_AXES = {torch.nn.Dropout: (), torch.nn.Dropout1d: (2,), torch.nn.Dropout2d: (2, 3),
                             torch.nn.Dropout3d: (2, 3, 4)}


@dataclass
class Call:
    """One module call: its path ('' for the whole model), the module, its inputs and output."""

    path: str
    module: object
    inputs: tuple
    output: object


@dataclass
class DropoutDraws:
    """Uniform draws in PyTorch's layout, one per dropout call, made by the PyTorch side's calls
    and reused by every later pass on either side."""

    seed: int
    draws: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    def draw(self, index: int, shape: tuple[int, ...]) -> np.ndarray:
        while len(self.draws) <= index:
            self.draws.append(self._rng.random(shape))
        if self.draws[index].shape != shape:  # a layer the other side lacks: draws that match nothing
            return np.random.default_rng([self.seed, index]).random(shape)
        return self.draws[index]


def keep_mask(draws: np.ndarray, rate: float, shared_axes: tuple[int, ...]) -> np.ndarray:
    """Which values a dropout layer keeps: one draw per position, shared along `shared_axes`."""
    keep = draws >= rate
    for axis in shared_axes:
        keep = keep.take([0], axis=axis)
    return np.array(np.broadcast_to(keep, draws.shape))  # writable: torch.as_tensor wants to own it


def channels_last(array: np.ndarray) -> np.ndarray:
    return np.moveaxis(array, 1, -1) if array.ndim >= 3 else array


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, tuple | list):
        return tuple(_detached(item) for item in value)
    return value


@contextlib.contextmanager
def torch_calls(model: torch.nn.Module, draws: DropoutDraws | None) -> Iterator[list[Call]]:
    """Record every module call of `model`; in training mode its dropout layers apply `draws`."""
    names = {id(module): name for name, module in model.named_modules()}
    calls: list[Call] = []
    dropout_calls = [0]

    def hook(module, inputs, output):
        kind = type(module)
        if draws is not None and kind in TORCH_DROPOUT_SHARED_AXES and module.training and inputs:
            x = inputs[0]
            keep = keep_mask(draws.draw(dropout_calls[0], tuple(x.shape)), module.p, TORCH_DROPOUT_SHARED_AXES[kind])
            dropout_calls[0] += 1
            output = torch.where(torch.as_tensor(np.ascontiguousarray(keep)), x / (1 - module.p), torch.zeros_like(x))
        calls.append(Call(names[id(module)], module, _detached(inputs), _detached(output)))
        return output

    handles = [module.register_forward_hook(hook) for module in model.modules()]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _flax_deterministic(module: nn.Dropout, args: tuple, kwargs: dict) -> bool | None:
    given = kwargs.get("deterministic", args[1] if len(args) > 1 else None)
    return module.deterministic if given is None else given


@contextlib.contextmanager
def flax_calls(draws: DropoutDraws | None) -> Iterator[list[Call]]:
    """Record every linen module call inside the block, with its array arguments; in training its
    nn.Dropout layers (and subclasses) apply `draws`. Under `jax.jit` the recorded arrays are
    tracers, for the jitted function to return."""
    calls: list[Call] = []
    dropout_calls = [0]

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        module = context.module
        if (draws is not None and isinstance(module, nn.Dropout) and args
                and _flax_deterministic(module, args, kwargs) is False and module.rate > 0):
            x = args[0]
            torch_layout_shape = (x.shape[0], x.shape[-1], *x.shape[1:-1]) if x.ndim >= 3 else x.shape
            uniform = channels_last(draws.draw(dropout_calls[0], tuple(torch_layout_shape)))
            dropout_calls[0] += 1
            keep = keep_mask(uniform, module.rate, tuple(module.broadcast_dims))
            output = jnp.where(keep, x / (1 - module.rate), jnp.zeros_like(x))
        else:
            output = next_fun(*args, **kwargs)
        calls.append(Call("/".join(module.path), module, tuple(a for a in args if isinstance(a, jax.Array)),
                          output))
        return output

    with nn.intercept_methods(interceptor):
        yield calls
