"""`python -m tests.float64_jax_train [--nnx] ARGS`: `python -m jax_impl.train ARGS` (with
--nnx, `python -m nnx_impl.train ARGS`) with the training state in float64, for tests that
compare two set-ups of the same run (2 processes against one) and must not depend on the CPU's
float32 rounding (tests/test_data_parallel_jax.py says why).

A mistake named in $PARITY_MUTATION (tests/parity/mutations.py) is applied first, so that a
mutation reaches the processes a test starts.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import jax
import numpy as np

import jax_impl.seeds
import jax_impl.train
import nnx_impl.train
from jax_impl.fast.compile_clock import enable_compilation_cache
from jax_impl.training import create_train_state
from nnx_impl import training as nnx_training
from nnx_impl.model import load_variables, variables_of
from tests.parity.mutations import apply_from_environment


def in_float64(tree):
    """Every float32 leaf of `tree` as float64 NumPy; other leaves (keys, counters) unchanged."""
    def widened(leaf):
        return np.asarray(leaf, np.float64) if np.asarray(leaf).dtype == np.float32 else leaf

    return jax.tree_util.tree_map(widened, jax.device_get(tree))


@contextlib.contextmanager
def float64_training() -> Iterator[None]:
    """jax_impl.train, jax_impl.seeds and nnx_impl.train with every new state cast to float64
    before its first step: the images and every computation on them follow the weights' dtype (jax_enable_x64
    is switched on)."""

    def float64_train_state(*args, **kwargs):
        state, key = create_train_state(*args, **kwargs)
        return in_float64(state), key

    def float64_optimizer(model, tx):
        """The NNX trainer's optimiser, of the model's weights made float64 in place first."""
        load_variables(model, in_float64(variables_of(model)))
        return nnx_training.create_train_state(model, tx)

    jax.config.update("jax_enable_x64", True)
    trainers = (jax_impl.train, jax_impl.seeds)
    for trainer in trainers:
        trainer.create_train_state = float64_train_state
    nnx_impl.train.create_train_state = float64_optimizer
    try:
        yield
    finally:
        for trainer in trainers:
            trainer.create_train_state = create_train_state
        nnx_impl.train.create_train_state = nnx_training.create_train_state
        jax.config.update("jax_enable_x64", False)


def main(argv: list[str] | None = None, twin: str = "jax") -> int:
    """`python -m jax_impl.train` (twin "jax") or `python -m nnx_impl.train` ("nnx") in float64."""
    with float64_training():
        return {"jax": jax_impl.train, "nnx": nnx_impl.train}[twin].main(argv)


if __name__ == "__main__":
    apply_from_environment()
    enable_compilation_cache()
    arguments = sys.argv[1:]
    nnx = arguments[:1] == ["--nnx"]
    sys.exit(main(arguments[1:] if nnx else arguments, "nnx" if nnx else "jax"))
