"""`python -m jax_impl.evaluate WEIGHTS`: test accuracy of JAX weights (see --help).

Builds the model and its weights, nothing else: evaluation needs no optimiser state.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from common.evaluation import main
from common.spec import IMAGE_SIZE
from jax_impl.checkpoints import restored
from jax_impl.devices import select_device
from jax_impl.model import Net
from jax_impl.ops import layers_for, resolve_ops
from jax_impl.training import eval_step, predict


def predict_with_weights(variables: dict, images: np.ndarray, batch_size: int, device: str = "auto",
                         ops: str = "auto") -> np.ndarray:
    """Eval-mode log-probabilities of normalised images (N, 28, 28) under `variables`
    {"params", "batch_stats"}, every shape checked against the model's."""
    jax_device = select_device(device)
    model = Net(layers=layers_for(resolve_ops(ops, jax_device.platform)))
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1)))
    variables = jax.device_put(restored(shapes, variables, "the weights file"), jax_device)
    return predict(jax.jit(functools.partial(eval_step, model.apply)), variables, images, batch_size, jax_device)


if __name__ == "__main__":
    from jax_impl.train import FRAMEWORK

    sys.exit(main(FRAMEWORK))
