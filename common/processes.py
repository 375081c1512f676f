"""This process's place among the processes of a data-parallel run, in terms both trainers share."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from common.errors import UserFacingError
from common.system import usable_cpu_count

DeviceCount = int | str | None  # --devices: a number, "all", or None (one per process)
JOIN_TIMEOUT_ENV = "MNIST_JOIN_TIMEOUT"
DEFAULT_JOIN_TIMEOUT = 300  # seconds; JAX's own default for jax.distributed.initialize
# Devices a machine with fewer cores may still ask for, to try data parallelism on CPU devices
# that share its cores (as JAX's own examples do with 8 host devices).
FEW_CPU_DEVICES = 8
QUIET_JOIN_SECONDS = 10  # a rendezvous that takes longer is announced, so that the wait is never silent


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


def environment_int(name: str, lowest: int = 0) -> int | None:
    """The integer in environment variable `name` (None when unset), at least `lowest`."""
    text = os.environ.get(name)
    if text is None:
        return None
    if not text.strip().isdigit() or int(text) < lowest:
        raise UserFacingError(f"${name}={text!r} is not an integer of at least {lowest}; set it to one, or unset it.")
    return int(text)


def host_and_port(name: str) -> tuple[str, int]:
    """Environment variable `name` as host:port (an IPv6 host in brackets)."""
    text = os.environ[name]
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserFacingError(f"${name}={text!r} is not host:port (e.g. 10.0.0.1:1234, the address of process 0); "
                              "set it to one, or unset it to train in one process.")
    return host.strip("[]"), int(port)


def join_timeout() -> int:
    """How long a process waits for the others of its run to join: $MNIST_JOIN_TIMEOUT seconds."""
    return environment_int(JOIN_TIMEOUT_ENV, lowest=1) or DEFAULT_JOIN_TIMEOUT


@contextmanager
def bounded_join(waiting_for: str) -> Iterator[None]:
    """Run the block (a framework's rendezvous) for at most join_timeout() seconds. The
    frameworks' own waits are half an hour in PyTorch and end in a C++ abort in JAX, so past the
    bound this process says what it waited for and exits with status 2: nothing has been written
    yet, and no framework call can be interrupted from Python while it waits."""
    seconds, joined = join_timeout(), threading.Event()
    quiet = min(seconds, QUIET_JOIN_SECONDS)

    def give_up() -> None:
        if joined.wait(quiet):
            return
        print(f"waiting for {waiting_for} (at most {seconds} s; {JOIN_TIMEOUT_ENV} changes it)",
              file=sys.stderr, flush=True)
        if not joined.wait(seconds - quiet):
            print(f"error: waited {seconds} s for {waiting_for}, in vain. Start every process of the run, or set "
                  f"{JOIN_TIMEOUT_ENV}=<seconds> to wait longer.", file=sys.stderr, flush=True)
            os._exit(2)

    threading.Thread(target=give_up, name="join timeout", daemon=True).start()
    try:
        yield
    finally:
        joined.set()


def refuse_too_many_devices(count: int, unit: str) -> None:
    """`count` devices (JAX, per process) or processes (PyTorch, per machine), `unit`, checked
    before any starts. On a CPU more than the cores only share them, costing memory and start-up
    time; accelerator hosts have at least as many cores as devices."""
    limit = max(FEW_CPU_DEVICES, usable_cpu_count())
    if count > limit:
        raise UserFacingError(f"--devices {count}: at most {limit} {unit} here, the cores this machine lets the "
                              f"run use ({usable_cpu_count()}) or {FEW_CPU_DEVICES} to try data parallelism on a "
                              "small machine. Ask for fewer.")
