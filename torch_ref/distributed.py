"""Several PyTorch processes training one model, the way DistributedDataParallel is used.

`python -m torch_ref.train --devices N` starts N copies of itself through torch.distributed's
elastic launcher (what `torchrun` runs), one per device; under `torchrun` each copy finds its
rank in the environment instead. Every process takes its part of each global batch, and DDP
averages the gradients in backward(), so the weights stay identical on every process.

BatchNorm: on CUDA, `torch.nn.SyncBatchNorm` takes the batch statistics over the global batch,
as one device would. gloo (the CPU backend) cannot run SyncBatchNorm, so on CPUs each process
normalises with its own part's statistics, and the running statistics are process 0's (DDP
broadcasts them before every forward pass). N CPU processes therefore do not compute what one
process computes; tests/test_data_parallel_torch.py pins down what they do compute. JAX's N
devices do compute what one does (jax_impl.distributed).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from torch.nn.parallel import DistributedDataParallel

from common.errors import UserFacingError
from common.processes import (
    SINGLE_PROCESS,
    DeviceCount,
    Processes,
    bounded_join,
    environment_int,
    refuse_too_many_devices,
)
from common.system import usable_cpu_count

LAUNCHED_ENV = "WORLD_SIZE"  # set by torchrun and by the elastic launcher in every process they start
AGENT_STORE_ENV = "TORCHELASTIC_USE_AGENT_STORE"  # "True" where torchrun's (or our launcher's) agent holds the store
PARENT_POLL_SECONDS = 0.5
CPU_BATCHNORM = ("on CPUs each process normalises its part of every batch with its own BatchNorm statistics "
                 "(gloo has no SyncBatchNorm), so another count would continue on another trajectory")


def requested_count(devices: DeviceCount) -> int:
    """--devices as a number of processes: one per CUDA device for all (one on a CPU)."""
    if devices is None:
        return 1
    if devices == "all":
        return torch.cuda.device_count() or 1
    return devices


def uses_cuda(device: str) -> bool:
    """Whether --device puts the processes on CUDA devices (nccl, SyncBatchNorm) rather than CPUs."""
    return device != "cpu" and torch.cuda.is_available()


def launched_processes() -> tuple[int, int] | None:
    """(world size, rank) of a process started by torchrun, by launch_processes or by hand
    ($WORLD_SIZE and $RANK, with $MASTER_ADDR and $MASTER_PORT); None for a run of one. A half-set
    environment is an error here, not a traceback from torch.distributed."""
    world, rank = environment_int(LAUNCHED_ENV, lowest=1), environment_int("RANK")
    if world is None and rank is None:
        return None
    if world is None or rank is None:
        given, missing = ("$RANK", "$WORLD_SIZE") if world is None else ("$WORLD_SIZE", "$RANK")
        raise UserFacingError(f"{given} is set without {missing}: a process of a multi-process run needs both (and "
                              "$MASTER_ADDR, $MASTER_PORT). Set them, start the run with torchrun or --devices N, or "
                              f"unset {given} to train in one process.")
    if rank >= world:
        raise UserFacingError(f"$RANK={rank} with $WORLD_SIZE={world}: the processes are numbered 0 to {world - 1}; "
                              "give each its own.")
    return world, rank


def launches_processes(devices: DeviceCount) -> bool:
    """Whether this process starts the run's processes itself: several asked for, and not one of
    those processes already."""
    return LAUNCHED_ENV not in os.environ and requested_count(devices) > 1


def launch_processes(devices: DeviceCount, argv: list[str], main: Callable[[list[str]], int]) -> int:
    """Start one process per device running `main(argv)` (the trainer's, importable), and wait
    for them; returns the exit status of the first that failed, else 0."""
    count = requested_count(devices)
    if torch.cuda.is_available() and count > torch.cuda.device_count():
        raise UserFacingError(f"--devices {count}: PyTorch sees {torch.cuda.device_count()} CUDA device(s).")
    refuse_too_many_devices(count, "processes")
    # What `torchrun --standalone --nproc-per-node N` configures: a rendezvous on a free local port.
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=count, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, _train_in_process)(main, argv, os.getpid())
    except ChildFailedError as error:  # the launcher has stopped the other processes
        failure = next(iter(error.failures.values()))
        print(f"error: training process {failure.local_rank} stopped with exit status {failure.exitcode}; "
              "its message is above.", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def _train_in_process(main: Callable[[list[str]], int], argv: list[str], launcher: int) -> None:
    """What each launched process runs (the launcher spawns fresh interpreters, which import
    `main` by name). A failure must end the process with its status, so that the launcher stops
    the others rather than leave them waiting at the next collective."""
    _end_with(launcher)
    status = main(argv)
    if status:
        sys.exit(status)


def _end_with(launcher: int) -> None:
    """End this process when its launcher ends, even killed with SIGKILL (which leaves the
    launcher no chance to stop it): an orphan would wait for a rendezvous that died with the
    launcher, or keep training, holding cores and memory. torch arms a parent-death signal only
    on Linux, and only once the process runs; this watch covers the start and macOS, since
    POSIX gives an orphan a new parent. Windows keeps no such trace, and there the launcher's
    own shutdown is all there is."""
    if os.name == "nt":
        return

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(PARENT_POLL_SECONDS)
        print(f"error: the launcher (process {launcher}) has ended; this training process stops too.",
              file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="launcher watch", daemon=True).start()


def join_processes(device: str, devices: DeviceCount) -> Processes:
    """Join the process group this process was started into (torchrun, launch_processes or by
    hand): nccl between CUDA devices, one per process, else gloo; the wait for the others bounded."""
    launched = launched_processes()
    if launched is None:
        return SINGLE_PROCESS
    world, rank = launched
    if devices is not None and requested_count(devices) != world:
        raise UserFacingError(f"--devices {devices}: this process is one of {world} started by torchrun; "
                              f"leave --devices out (or give {world}).")
    if world == 1:
        return SINGLE_PROCESS
    if os.environ.get(AGENT_STORE_ENV) != "True":  # started by hand: process 0's address is the user's to give
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise UserFacingError(f"$RANK and $WORLD_SIZE are set without ${' and $'.join(missing)}: every process "
                                  "finds process 0 at $MASTER_ADDR:$MASTER_PORT. Set them, or start the run with "
                                  "torchrun or --devices N.")
        environment_int("MASTER_PORT", lowest=1)
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    on_cuda = uses_cuda(device)
    if on_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    waiting_for = (f"the other {world - 1} process(es) to join process 0 at {where}" if rank == 0 else
                   f"process 0 at {where} ($MASTER_ADDR:$MASTER_PORT)")
    with bounded_join(waiting_for):
        try:
            dist.init_process_group("nccl" if on_cuda else "gloo")
        except (RuntimeError, ValueError) as error:  # torch.distributed's errors: an address in use, unknown
            raise UserFacingError(f"torch.distributed cannot start process {rank} of {world} at {where}: {error}") \
                from error
    return Processes(rank, world, barrier=dist.barrier)


def threads_per_process(threads: int | None, processes: Processes) -> int | None:
    """--threads, else this machine's cores shared by the processes on it (each would take all)."""
    if threads or processes.count == 1:
        return threads
    return max(1, usable_cpu_count() // int(os.environ.get("LOCAL_WORLD_SIZE", processes.count)))


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` as DDP trains it: its BatchNorms synchronised on CUDA (see the module docstring)."""
    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)


def summed_over_processes(report: Callable[[int, dict], None], device: torch.device) -> Callable[[int, dict], None]:
    """`report(images, metrics)` of the global batch, from each process's part."""

    def report_global(images: int, metrics: dict) -> None:
        totals = torch.tensor([images, metrics["loss_sum"], metrics["correct"]], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        images, loss_sum, correct = totals.tolist()
        report(int(images), {"loss_sum": loss_sum, "correct": int(correct)})

    return report_global


def share_main_buffers(*models: torch.nn.Module | None) -> None:
    """Every process takes process 0's BatchNorm running statistics (those its checkpoint holds),
    so that all of them evaluate the same model; None (no average kept) is skipped."""
    for model in models:
        for buffer in model.buffers() if model is not None else ():
            dist.broadcast(buffer, src=0)
