"""`python -m jax_impl.evaluate WEIGHTS`: test accuracy of JAX weights (see --help).

Builds the model and its weights, nothing else: evaluation needs no optimiser state.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from common.evaluation import WeightsFunctions, main
from common.spec import IMAGE_SIZE
from jax_impl.checkpoints import NAMES, read_weights, restored
from jax_impl.devices import select_device
from jax_impl.fast.choice import layers_for, resolve_ops
from jax_impl.model import Layers, Net
from jax_impl.recalibration import batch_statistics, recalibrated_batch_stats, statistics_model
from jax_impl.training import eval_step, predict


def placed(variables: dict, device: str, ops: str) -> tuple[jax.Device, Layers, dict]:
    """(device, layers, `variables` on the device), every shape checked against the model's."""
    jax_device = select_device(device)
    layers = layers_for(resolve_ops(ops, jax_device.platform))
    shapes = jax.eval_shape(functools.partial(Net(layers=layers).init, train=False), jax.random.key(0),
                            jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1)))
    return jax_device, layers, jax.device_put(restored(shapes, variables, "the weights file"), jax_device)


def predict_with_weights(variables: dict, images: np.ndarray, batch_size: int, device: str = "auto",
                         ops: str = "auto") -> np.ndarray:
    """Eval-mode log-probabilities of normalised images (N, 28, 28) under `variables`
    {"params", "batch_stats"}."""
    jax_device, layers, variables = placed(variables, device, ops)
    evaluate = jax.jit(functools.partial(eval_step, Net(layers=layers).apply))
    return predict(evaluate, variables, images, batch_size, jax_device)


def recalibrate_weights(variables: dict, images: np.ndarray, batch_size: int, device: str = "auto",
                        ops: str = "auto") -> dict:
    """`variables` with their BatchNorm statistics recomputed over normalised `images`
    (jax_impl.recalibration), as NumPy arrays."""
    jax_device, layers, variables = placed(variables, device, ops)
    statistics = jax.jit(functools.partial(batch_statistics, statistics_model(layers)))
    batch_stats = recalibrated_batch_stats(statistics, variables, images, batch_size, jax_device)
    return jax.device_get({"params": variables["params"], "batch_stats": batch_stats})


WEIGHTS = WeightsFunctions(read=read_weights, predict=predict_with_weights, recalibrate=recalibrate_weights)

if __name__ == "__main__":
    sys.exit(main(NAMES, "jax_impl.evaluate", WEIGHTS))
