"""Where a JAX run computes: --device, --devices, --threads, the processes of a multi-process
run, and the facts config.json records.

Data parallelism the current JAX way: a 1-D mesh of the chosen devices (`jax.make_mesh`), every
batch split over its "data" axis and the training state replicated (`NamedSharding`), and the
unchanged single-device step jitted over them; XLA inserts the collectives. `pmap` is not used:
it is in maintenance mode.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import flax
import jax
import optax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from common.errors import UserFacingError
from common.framework import SINGLE_PROCESS, DeviceCount, Processes
from common.system import pin_to_cores, usable_cpu_count

DATA_AXIS = "data"
PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def limit_threads(threads: int | None) -> None:
    """--threads: pin the process to that many cores. XLA sizes its CPU thread pool from the
    cores the process may use when the backend starts, so this must run before first use."""
    if threads and not pin_to_cores(threads):
        raise UserFacingError(
            f"--threads {threads}: JAX's CPU backend sizes its thread pool from the cores the process may "
            f"run on, and only Linux lets a program choose them ({sys.platform} does not). Leave --threads "
            "out here: XLA then uses every core.")


def join_processes(device: str, devices: DeviceCount) -> Processes:
    """`jax.distributed.initialize` when this process is one of several: $JAX_COORDINATOR_ADDRESS
    (host:port of process 0) set, with $JAX_NUM_PROCESSES and $JAX_PROCESS_ID, or with a cluster
    JAX recognises (SLURM, Open MPI, ...) supplying them. And for N devices, N CPU devices per
    process: JAX's CPU backend has one unless asked before it starts (a GPU run ignores them)."""
    processes = SINGLE_PROCESS
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        count, index = (_environment_int(name) for name in PROCESS_ENV[1:])
        jax.distributed.initialize(num_processes=count, process_id=index)
        processes = Processes(jax.process_index(), jax.process_count(),
                              barrier=lambda: multihost_utils.sync_global_devices("era-s6-mnist"))
    if isinstance(devices, int) and devices > processes.count:
        try:
            jax.config.update("jax_num_cpu_devices", max(1, devices // processes.count))
        except RuntimeError:
            pass  # JAX has already started (a notebook, a test): select_devices checks the count it has
    return processes


def launch_processes(devices: DeviceCount, argv: list[str]) -> None:
    """Nothing to launch: one JAX process drives all its devices. Several processes (several
    hosts, or one per GPU) are started by the user or the cluster, see `join_processes`."""
    return None


def _environment_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None:
        return None
    if not text.isdigit():
        raise UserFacingError(f"${name}={text!r} is not a non-negative integer; set it to one, or unset it.")
    return int(text)


def _platform(choice: str) -> str:
    """--device: auto -> JAX's default backend (a GPU or TPU when present), cpu, or gpu."""
    if choice == "gpu" and not any(device.platform == "gpu" for device in jax.devices()):
        raise UserFacingError("--device gpu: JAX sees no GPU here (is jax[cuda] installed?); use --device cpu or auto.")
    return jax.default_backend() if choice == "auto" else choice


def select_device(choice: str) -> jax.Device:
    """One device of --device's platform (evaluation)."""
    return jax.local_devices(backend=_platform(choice))[0]


def select_devices(choice: str, requested: DeviceCount) -> list[jax.Device]:
    """The devices of a data-parallel run: `requested` (--devices: a number, all, or None for one
    per process) of --device's platform, the same number from every process, in process order."""
    platform = _platform(choice)
    available = jax.devices(platform)  # every process's
    processes = jax.process_count()
    wanted = processes if requested is None else len(available) if requested == "all" else requested
    if wanted > len(available) or wanted % processes:
        if platform == "cpu" and processes == 1:
            raise UserFacingError(
                f"--devices {wanted}: JAX has {len(available)} CPU device(s), and started before the trainer "
                f"could ask for more. Set jax.config.update('jax_num_cpu_devices', {wanted}) (or XLA_FLAGS="
                f"--xla_force_host_platform_device_count={wanted}) before JAX starts.")
        raise UserFacingError(f"--devices {wanted}: JAX sees {len(available)} {platform} device(s) in "
                              f"{processes} process(es); ask for at most that many, the same number per process.")
    per_process = wanted // processes
    return [device for index in range(processes)
            for device in [d for d in available if d.process_index == index][:per_process]]


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


def describe(devices: list[jax.Device], ops: str) -> dict[str, Any]:
    """The facts of a JAX run that config.json records."""
    return {"framework": "JAX", "version": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "device": str(devices[0]), "devices": len(devices), "processes": jax.process_count(), "ops": ops,
            "threads": usable_cpu_count()}
