"""BatchNorm statistics recomputed after training, PyTorch's way: `torch.optim.swa_utils.update_bn`.

The running averages a model ends training with were collected under dropout and augmentation,
from weights that kept changing; evaluation sees neither. update_bn resets every BatchNorm's
statistics and recomputes them in train mode as the cumulative average of the batches'
statistics (momentum None: every batch weighs the same), changing no weight. Dropout is
switched off for the pass, so the statistics are those of the activations evaluation sees.
jax_impl.recalibration is the same pass in JAX.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from torch_ref.data import to_tensor


@contextlib.contextmanager
def dropout_off(model: torch.nn.Module) -> Iterator[None]:
    """Every Dropout of `model` at rate 0 (the identity, even in train mode), restored afterwards."""
    dropouts = [module for module in model.modules() if isinstance(module, torch.nn.Dropout)]
    rates = [dropout.p for dropout in dropouts]
    for dropout in dropouts:
        dropout.p = 0.0
    try:
        yield
    finally:
        for dropout, rate in zip(dropouts, rates, strict=True):
            dropout.p = rate


def recalibrate_batchnorm(model: torch.nn.Module, images: np.ndarray, batch_size: int, device: torch.device) -> None:
    """update_bn over normalised `images` (N, 28, 28), `batch_size` at a time in their order,
    dropout off, without autograd (update_bn itself records the graph it never uses)."""
    batches = (to_tensor(images[start : start + batch_size], device) for start in range(0, len(images), batch_size))
    with dropout_off(model), torch.no_grad():
        torch.optim.swa_utils.update_bn(batches, model)
