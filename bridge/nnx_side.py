"""Flax NNX modules on the Flax side of bridge.diff, held to what a linen module is held to.

An NNX module owns its state, and is called as `model(x)` after `model.train()` or
`model.eval()`. Each pass here runs on a copy (`nnx.clone`, inside the traced function: NNX
refuses to update variables made outside it), its weights replaced by the PyTorch side's, so
the user's module never changes. Its state is exposed as linen's variables, one collection per kind of variable
(`nnx.Param` -> "params", `nnx.BatchStat` -> "batch_stats"), so that the weight map, the
stages and the hints serve both APIs. Every submodule call is recorded with its path, as linen's
`nn.intercept_methods` records them, by wrapping the `__call__` of the module's classes for the
duration of the pass; its `nnx.Dropout` layers apply the shared draws (bridge.capture).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bridge.capture import Call, DropoutDraws, channels_last, keep_mask

COLLECTIONS = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


def is_nnx(module: object) -> bool:
    return isinstance(module, nnx.Module)


def variables_of(model: nnx.Module) -> dict:
    """The module's state as linen variables: {"params": ..., "batch_stats": ...} (empty ones left out)."""
    found = {name: nnx.to_pure_dict(nnx.state(model, kind)) for name, kind in COLLECTIONS.items()}
    return {name: tree for name, tree in found.items() if jax.tree_util.tree_leaves(tree)}


def apply(model: nnx.Module, variables: dict, x: jax.Array, train: bool,
          draws: DropoutDraws | None) -> tuple[jax.Array, dict, list[Call]]:
    """(output, updated non-parameter collections, every module call) of one pass of a copy of
    `model` holding `variables`, in training or evaluation mode."""
    copy = nnx.clone(model)  # fresh variables, in the trace of the pass that uses them
    for name, kind in COLLECTIONS.items():
        if name in variables:
            part = nnx.state(copy, kind)
            nnx.replace_by_pure_dict(part, jax.tree_util.tree_map(jnp.asarray, variables[name]))
            nnx.update(copy, part)
    copy.train() if train else copy.eval()
    with module_calls(copy, draws if train else None) as calls:
        output = copy(x)
    updated = {name: tree for name, tree in variables_of(copy).items() if name != "params"} if train else {}
    return output, updated, calls


@contextlib.contextmanager
def module_calls(model: nnx.Module, draws: DropoutDraws | None) -> Iterator[list[Call]]:
    """Record every call of `model` and its submodules, innermost first (as PyTorch's forward
    hooks and linen's interceptor see them); with `draws`, its training-mode nnx.Dropout layers
    apply them. A module called through a parent class's `__call__` is recorded once."""
    paths = {id(module): "/".join(map(str, path)) for path, module in nnx.iter_modules(model)}
    classes = {type(module) for _, module in nnx.iter_modules(model)}
    calls: list[Call] = []
    dropout_calls, running = [0], set()
    originals = {cls: cls.__dict__.get("__call__") for cls in classes}

    def recorded(original):
        def call(self, *args, **kwargs):
            if id(self) not in paths or id(self) in running:
                return original(self, *args, **kwargs)
            running.add(id(self))
            try:
                output = _dropped(self, args, draws, dropout_calls) if isinstance(self, nnx.Dropout) else None
                if output is None:
                    output = original(self, *args, **kwargs)
            finally:
                running.discard(id(self))
            calls.append(Call(paths[id(self)], self, tuple(a for a in args if isinstance(a, jax.Array)), output))
            return output

        return call

    for cls in classes:
        cls.__call__ = recorded(cls.__call__)
    try:
        yield calls
    finally:
        for cls, original in originals.items():
            if original is None:  # inherited: take the wrapper away again
                del cls.__call__
            else:
                cls.__call__ = original


def _dropped(layer: nnx.Dropout, args: tuple, draws: DropoutDraws | None, dropout_calls: list[int]) -> jax.Array | None:
    """The layer's output with the shared draws as its mask (None: it drops nothing here)."""
    if draws is None or not args or layer.deterministic or layer.rate == 0:
        return None
    x = args[0]
    torch_layout_shape = (x.shape[0], x.shape[-1], *x.shape[1:-1]) if x.ndim >= 3 else x.shape
    uniform = channels_last(draws.draw(dropout_calls[0], tuple(torch_layout_shape)))
    dropout_calls[0] += 1
    keep = keep_mask(uniform, layer.rate, tuple(layer.broadcast_dims))
    return jnp.where(np.asarray(keep), x / (1 - layer.rate), jnp.zeros_like(x))
