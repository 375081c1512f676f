"""The layer table of a PyTorch model, read off the model itself with forward hooks.

It reproduces what the `torch-summary` package printed for the original notebook (SPEC.md)
without depending on that package: every leaf module that runs gets a row, numbered in call
order, with its output shape and its own parameter count. Functional ReLUs get no row.
"""

from __future__ import annotations

import torch
from torch import nn

from common.spec import IMAGE_SIZE, LayerRow, format_layer_table


def layer_rows(model: nn.Module) -> list[LayerRow]:
    """One `LayerRow` per leaf-module call of an eval-mode forward pass on one 1x28x28 image."""
    rows: list[LayerRow] = []

    def record(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        params = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
        rows.append(LayerRow(f"{type(module).__name__}-{len(rows) + 1}", tuple(output.shape[1:]), params))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [leaf.register_forward_hook(record) for leaf in leaves]
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return rows


def summary(model: nn.Module) -> str:
    """The model's layer table in torch-summary's layout."""
    return format_layer_table(layer_rows(model))


if __name__ == "__main__":
    from torch_ref.model import Net

    print(summary(Net()))
