"""`python -m tests.float64_jax_train ARGS`: `python -m jax_impl.train ARGS` with the training
state in float64, for tests that compare two set-ups of the same run (2 processes against one)
and must not depend on the CPU's float32 rounding (tests/test_data_parallel_jax.py says why).

A mistake named in $PARITY_MUTATION (tests/parity/mutations.py) is applied first, so that a
mutation reaches the processes a test starts.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import numpy as np

from common.driver import main
from common.framework import TrainerConfig
from jax_impl.devices import put_replicated, replicated
from jax_impl.seed_group import JaxSeedGroup
from jax_impl.train import FRAMEWORK, enable_compilation_cache
from tests.parity.mutations import apply_from_environment


def in_float64(tree):
    """Every float32 leaf of `tree` as float64 NumPy; other leaves (keys, counters) unchanged."""
    return jax.tree_util.tree_map(lambda leaf: np.asarray(leaf, np.float64) if leaf.dtype == np.float32 else leaf,
                                  jax.device_get(tree))


def float64_seed_group(config: TrainerConfig, seeds: list[int]) -> JaxSeedGroup:
    """The trainer's seed group with its state cast to float64 before the first step: the images
    and every computation on them follow the weights' dtype (needs jax_enable_x64)."""
    group = JaxSeedGroup(config, seeds)
    group.state = put_replicated(in_float64(group.state), replicated(group.mesh))
    return group


FLOAT64_FRAMEWORK = dataclasses.replace(FRAMEWORK, create_seed_group=float64_seed_group)

if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    apply_from_environment()
    enable_compilation_cache()
    sys.exit(main(FLOAT64_FRAMEWORK))
