"""`python -m nnx_impl.evaluate WEIGHTS`: test accuracy of Flax weights with the NNX model (see --help).

Builds the model and loads the weights, nothing else: evaluation needs no optimiser. Reads an
NNX checkpoint, and every file the linen twin reads (its variables are the NNX model's state).
"""

from __future__ import annotations

import sys

import jax
import numpy as np

from common.evaluation import WeightsFunctions, main
from jax_impl.devices import select_device
from jax_impl.fast.choice import resolve_ops
from nnx_impl.checkpoints import NAMES, check_fits, read_weights
from nnx_impl.fast.choice import layers_for
from nnx_impl.model import Net, load_variables, variables_of
from nnx_impl.recalibration import recalibrate_batchnorm
from nnx_impl.training import predict


def placed(variables: dict, device: str, ops: str) -> tuple[jax.Device, Net]:
    """(device, the model holding `variables` on it), every shape checked against the model's."""
    jax_device = select_device(device)
    model = Net(layers=layers_for(resolve_ops(ops, jax_device.platform)))
    check_fits(variables_of(model), variables, "the weights file")
    load_variables(model, jax.device_put(variables, jax_device))
    return jax_device, model


def predict_with_weights(variables: dict, images: np.ndarray, batch_size: int, device: str = "auto",
                         ops: str = "auto") -> np.ndarray:
    """Eval-mode log-probabilities of normalised images (N, 28, 28) under `variables`."""
    jax_device, model = placed(variables, device, ops)
    return predict(model, images, batch_size, jax_device)


def recalibrate_weights(variables: dict, images: np.ndarray, batch_size: int, device: str = "auto",
                        ops: str = "auto") -> dict:
    """`variables` with their BatchNorm statistics recomputed over normalised `images`
    (nnx_impl.recalibration), as NumPy arrays."""
    jax_device, model = placed(variables, device, ops)
    recalibrate_batchnorm(model, images, batch_size, jax_device)
    return jax.device_get(variables_of(model))


WEIGHTS = WeightsFunctions(read=read_weights, predict=predict_with_weights, recalibrate=recalibrate_weights)

if __name__ == "__main__":
    sys.exit(main(NAMES, "nnx_impl.evaluate", WEIGHTS))
