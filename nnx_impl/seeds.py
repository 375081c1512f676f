"""Several seeds of one recipe (--seeds), each into <out>/seed<S>, then their summary.

The NNX twin trains them one after another, each a run of nnx_impl.train, on every platform, as
PyTorch does: a seed's weights, batches and dropout masks come from its own seed, so each follows
the run of its seed alone. Stacking the seeds into one vmapped program, which pays on
accelerators, is the linen twin's (jax_impl.seeds).
"""

from __future__ import annotations

from collections.abc import Callable

from common.metrics import EpochRecord
from common.processes import Processes
from common.run import train_in_turn
from common.settings import RunSettings

Train = Callable[[RunSettings, Processes], list[EpochRecord]]


def train_seeds(settings: RunSettings, seeds: tuple[int, ...], processes: Processes,
                train: Train) -> list[list[EpochRecord]]:
    """Train every seed in turn through `train` (nnx_impl.train's)."""
    return train_in_turn(settings, seeds, processes, train)
