"""The layer table of the Flax model, computed from the module itself by shape evaluation.

`jax.eval_shape` runs `init` and `apply(capture_intermediates=...)` abstractly (no FLOPs, no
memory), which records every submodule's output shape in call order, as PyTorch's forward hooks
do. Shapes are reported as (C, H, W), the PyTorch convention of SPEC.md's table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from common.spec import IMAGE_SIZE, LayerRow, format_layer_table
from jax_impl.model import AvgPool2d, BatchNorm2d, MaxPool2d, Net

# The PyTorch layer type each Flax submodule stands for, for torch-summary's row names.
TORCH_LAYER_NAMES = {nn.Conv: "Conv2d", BatchNorm2d: "BatchNorm2d", nn.Dropout: "Dropout",
                     MaxPool2d: "MaxPool2d", AvgPool2d: "AvgPool2d"}


def torch_layer_name(module_type: type) -> str:
    """The PyTorch name of a Flax layer type (subclasses included)."""
    return next(name for flax_type, name in TORCH_LAYER_NAMES.items() if issubclass(module_type, flax_type))


def layer_rows(model: Net) -> list[LayerRow]:
    """One `LayerRow` per submodule call of an eval-mode forward pass on one 28x28 image."""
    image = jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 1), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), image)
    kinds: dict[str, type] = {}  # layer name -> module type, in call order

    def capture(module: nn.Module, method: str) -> bool:
        if module.name is not None:  # a layer, not the model itself
            kinds.setdefault(module.name, type(module))
        return method == "__call__"

    _, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, capture_intermediates=capture, mutable=["intermediates"]),
        variables, image,
    )
    rows = []
    # Pytree flattening sorts dictionary keys, so the call order comes from `kinds`, filled
    # by `capture` as the layers run.
    for name in kinds:
        (output,) = state["intermediates"][name]["__call__"]
        count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables["params"].get(name, {})))
        channels_first = (output.shape[-1], *output.shape[1:-1])
        rows.append(LayerRow(f"{torch_layer_name(kinds[name])}-{len(rows) + 1}", channels_first, count))
    return rows


def summary(model: Net) -> str:
    """The model's layer table in torch-summary's layout."""
    return format_layer_table(layer_rows(model))


if __name__ == "__main__":
    print(summary(Net()))
