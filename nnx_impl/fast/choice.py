"""--ops for the NNX model: the same choice as the linen twin's (jax_impl.fast.choice.resolve_ops:
fast on CPU, plain on accelerators), made concrete as NNX layers."""

from __future__ import annotations

from nnx_impl.fast.layers import FAST_LAYERS
from nnx_impl.model import PLAIN_LAYERS, Layers


def layers_for(ops: str) -> Layers:
    """The NNX layers of a concrete choice, "plain" or "fast"."""
    layers = {"plain": PLAIN_LAYERS, "fast": FAST_LAYERS}
    if ops not in layers:
        raise ValueError(f"unknown ops {ops!r}: expected one of {', '.join(layers)}")
    return layers[ops]
