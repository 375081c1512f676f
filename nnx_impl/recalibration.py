"""BatchNorm statistics recomputed after training, torch.optim.swa_utils.update_bn's pass, the
NNX way: a copy of the model whose BatchNorms take each batch's statistics whole (momentum 1)
and whose dropout is off, run in train mode batch by batch; every batch weighs the same in the
result (jax_impl.recalibration's cumulative average, shared by both Flax twins). torch_ref's
and jax_impl's recalibration are the other two.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from jax_impl.recalibration import recalibrated_batch_stats
from nnx_impl.model import BatchNorm2d, Net, load_variables, variables_of


def statistics_model(model: Net) -> Net:
    """A copy of `model` whose train-mode pass leaves one batch's statistics as its own."""
    copy = nnx.clone(model)
    for _, module in nnx.iter_modules(copy):
        if isinstance(module, BatchNorm2d):
            module.momentum = 1.0
    copy.train()
    copy.set_attributes(deterministic=True)  # dropout off, BatchNorm still on batch statistics
    return copy


@nnx.jit
def batch_statistics(model: Net, images: jax.Array) -> dict:
    """Every BatchNorm's statistics of one batch of images (B, 28, 28, 1), as a `batch_stats` tree."""
    model(images)
    return variables_of(model)["batch_stats"]


def recalibrate_batchnorm(model: Net, images: np.ndarray, batch_size: int,
                          placement: jax.Device | jax.sharding.Sharding) -> None:
    """update_bn's result over normalised `images` (N, 28, 28), `batch_size` at a time in their
    order, written into `model`'s BatchNorm statistics; its weights do not change."""
    counter = statistics_model(model)
    batch_stats = recalibrated_batch_stats(lambda _, batch: batch_statistics(counter, batch), None, images,
                                           batch_size, placement)
    load_variables(model, {"params": variables_of(model)["params"], "batch_stats": batch_stats})
