"""Several JAX devices and processes training one model: the mesh a batch is split over, and
the processes of a multi-process run.

Data parallelism the current JAX way: a 1-D mesh of the chosen devices (`jax.make_mesh`), every
batch split over its "data" axis and the training state replicated (`NamedSharding`), and the
unchanged single-device step jitted over them; XLA inserts the collectives, BatchNorm's batch
means included, so N devices compute what one computes (PyTorch's SyncBatchNorm semantics).
`pmap` is not used: it is in maintenance mode. One process drives all its devices; several
processes (several hosts, or one per GPU) are started by the user or the cluster and join here.
"""

from __future__ import annotations

import os
from typing import Any

import jax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from common.errors import UserFacingError
from common.processes import (
    SINGLE_PROCESS,
    DeviceCount,
    Processes,
    bounded_join,
    environment_int,
    host_and_port,
    join_timeout,
    refuse_too_many_devices,
)

DATA_AXIS = "data"
PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def join_processes(device: str, devices: DeviceCount) -> Processes:
    """`jax.distributed.initialize` when this process is one of several: $JAX_COORDINATOR_ADDRESS
    (host:port of process 0) set, with $JAX_NUM_PROCESSES and $JAX_PROCESS_ID, or with a cluster
    JAX recognises (SLURM, Open MPI, ...) supplying them. And for N devices, N CPU devices per
    process: JAX's CPU backend has one unless asked before it starts (a GPU run ignores them)."""
    processes = SINGLE_PROCESS
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        _initialize_distributed()
        processes = Processes(jax.process_index(), jax.process_count(),
                              barrier=lambda: multihost_utils.sync_global_devices("era-s6-mnist"))
    elif any(os.environ.get(name) for name in PROCESS_ENV[1:]):
        raise UserFacingError(f"${' and $'.join(n for n in PROCESS_ENV[1:] if os.environ.get(n))} set without "
                              "$JAX_COORDINATOR_ADDRESS: set it too (host:port of process 0) to train in several "
                              "processes, or unset them to train in one.")
    if isinstance(devices, int):
        refuse_too_many_devices(devices // processes.count, "devices per process")
    if isinstance(devices, int) and devices > processes.count:
        try:
            jax.config.update("jax_num_cpu_devices", max(1, devices // processes.count))
        except RuntimeError:
            pass  # JAX has already started (a notebook, a test): select_devices checks the count it has
    return processes


def _initialize_distributed() -> None:
    """jax.distributed.initialize from the environment, every value checked first and the wait
    bounded (common.processes.bounded_join), so that a mistake is a message rather than a
    traceback or an abort from XLA's C++ runtime."""
    host, port = host_and_port(PROCESS_ENV[0])
    count, index = environment_int(PROCESS_ENV[1], lowest=1), environment_int(PROCESS_ENV[2])
    if count is not None and index is not None and index >= count:
        raise UserFacingError(f"$JAX_PROCESS_ID={index} with $JAX_NUM_PROCESSES={count}: the processes are numbered "
                              f"0 to {count - 1}; give each its own.")
    if index == 0:
        waiting_for = f"the other processes to join process 0 at {host}:{port}"
    else:
        waiting_for = f"process 0 at {host}:{port} ($JAX_COORDINATOR_ADDRESS)"
    with bounded_join(waiting_for):
        try:
            # JAX's own bound lies beyond ours, which ends the wait with a message instead of an abort.
            jax.distributed.initialize(num_processes=count, process_id=index,
                                       initialization_timeout=join_timeout() + 60)
        except ValueError as error:
            raise UserFacingError(f"jax.distributed cannot start: {error} Set $JAX_NUM_PROCESSES (how many processes) "
                                  "and $JAX_PROCESS_ID (this one's number, from 0) beside $JAX_COORDINATOR_ADDRESS, "
                                  "or run under a cluster JAX recognises (SLURM, Open MPI).") from error


def data_mesh(devices: list[jax.Device]) -> Mesh:
    """A 1-D mesh whose "data" axis splits every batch. Auto axes: XLA propagates the shardings
    through the single-device code, so the model and the step need no annotation."""
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array: the training state, the data a scan epoch gathers from."""
    return NamedSharding(mesh, PartitionSpec())


def put_replicated(tree: Any, sharding: NamedSharding) -> Any:
    """Every leaf of `tree` (held whole by every process) on every device of `sharding`. A key
    array travels as its raw data: across processes, device_put accepts only plain arrays."""

    def put(leaf: Any) -> jax.Array:
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(jax.device_put(jax.random.key_data(leaf), sharding),
                                            impl=jax.random.key_impl(leaf))
        return jax.device_put(leaf, sharding)

    return jax.tree_util.tree_map(put, tree)


def split_along(mesh: Mesh, axis: int) -> NamedSharding:
    """Axis `axis` (the batch) cut into equal consecutive parts, one per device of the mesh."""
    return NamedSharding(mesh, PartitionSpec(*[None] * axis, DATA_AXIS))
