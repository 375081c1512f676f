"""--ops: which implementation of the layers a JAX run is built from, decided here and only here.

- plain: jax_impl.model's idiomatic Flax layers (PLAIN_LAYERS), differentiable in every mode.
- fast: jax_impl.fast.layers (FAST_LAYERS), the same maths computed the way XLA:CPU runs
  fastest (docs/fast_layers.md); reverse-mode differentiation only.
- auto: fast on CPU, where it was measured faster; plain on GPUs and TPUs, where the fast
  layers were never measured and XLA's own kernels are the safe choice.

Both give the same results up to float summation order, except dropout: the two draw
different masks from the same key.
"""

from __future__ import annotations

from jax_impl import model
from jax_impl.fast.layers import FAST_LAYERS


def resolve_ops(choice: str, platform: str) -> str:
    """The --ops choice (auto, plain or fast) made concrete for a JAX platform ("cpu", "gpu", ...)."""
    if choice == "auto":
        return "fast" if platform == "cpu" else "plain"
    layers_for(choice)  # raises on an unknown name
    return choice


def layers_for(ops: str) -> model.Layers:
    """The layers of a concrete choice. model.PLAIN_LAYERS is read when called, so that a test
    that replaces it (tests/parity/mutations.py) reaches every plain model built afterwards."""
    layers = {"plain": model.PLAIN_LAYERS, "fast": FAST_LAYERS}
    if ops not in layers:
        raise ValueError(f"unknown ops {ops!r}: expected one of {', '.join(layers)}")
    return layers[ops]
