"""Several seeds of one recipe (--seeds), each into <out>/seed<S>, then their summary.

PyTorch trains them one after another, each a run of torch_ref.train: a seed's weights,
batches and dropout masks come from its own seed and random stream, so each follows the run of
its seed alone. jax_impl.seeds is the JAX side, which on an accelerator vmaps them instead.
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
    """Train every seed in turn through `train` (torch_ref.train's)."""
    return train_in_turn(settings, seeds, processes, train)
