"""This process's place among the processes of a data-parallel run, in terms both trainers share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

DeviceCount = int | str | None  # --devices: a number, "all", or None (one per process)


def _alone() -> None:
    """The barrier of a single process: nothing to wait for."""


@dataclass(frozen=True)
class Processes:
    """This process's place in a data-parallel run of several processes (torchrun, the elastic
    launcher, jax.distributed); a run of one process is index 0 of 1. Process 0 alone writes
    the run's files; each process feeds its part of every global batch (`EpochPlan.shard`)."""

    index: int = 0
    count: int = 1
    barrier: Callable[[], None] = field(default=_alone, compare=False)  # wait until every process arrives

    @property
    def is_main(self) -> bool:
        return self.index == 0


SINGLE_PROCESS = Processes()
