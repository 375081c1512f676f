"""`python -m jax_impl.train`: train the Session 6 model with JAX (see --help).

Same flags, output and artefacts as `python -m torch_ref.train`; compiled programs are kept
in a persistent cache (override the folder with $JAX_COMPILATION_CACHE_DIR), so a second run
starts without compiling. The training itself is jax_impl.training, read top to bottom.
"""

from __future__ import annotations

import os
import sys

import jax

from common.driver import main
from common.framework import Framework
from common.mnist import DEFAULT_DATA_DIR
from jax_impl.checkpoints import read_checkpoint, read_weights
from jax_impl.devices import join_processes, launch_processes
from jax_impl.evaluate import predict_with_weights, recalibrate_weights
from jax_impl.seed_group import JaxSeedGroup

FRAMEWORK = Framework(
    name="jax",
    title="JAX",
    module="jax_impl.train",
    checkpoint_name="checkpoint.msgpack",
    model_name="model.msgpack",
    create_seed_group=JaxSeedGroup,
    read_checkpoint=read_checkpoint,
    read_weights=read_weights,
    predict=predict_with_weights,
    recalibrate=recalibrate_weights,
    join_processes=join_processes,
    launch_processes=launch_processes,
)


def enable_compilation_cache() -> None:
    """Persist every compiled program (they take seconds to build, milliseconds to load)."""
    cache_dir = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(DEFAULT_DATA_DIR.parent / "era-s6-jax-cache"))
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


if __name__ == "__main__":
    enable_compilation_cache()
    sys.exit(main(FRAMEWORK))
