"""Where a JAX run computes: --device, --devices, --threads, and the facts config.json records."""

from __future__ import annotations

import os
import sys
from typing import Any

import flax
import jax
import optax

from common.errors import UserFacingError
from common.processes import DeviceCount
from common.system import pin_to_cores, usable_cpu_count


def limit_threads(threads: int | None) -> None:
    """--threads: pin the process to that many cores. XLA sizes its CPU thread pool from the
    cores the process may use when the backend starts, so this must run before first use."""
    if threads and not pin_to_cores(threads):
        raise UserFacingError(
            f"--threads {threads}: JAX's CPU backend sizes its thread pool from the cores the process may "
            f"run on, and only Linux lets a program choose them ({sys.platform} does not). Leave --threads "
            "out here: XLA then uses every core.")


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


def describe(devices: list[jax.Device], ops: str, step_options: dict[str, int]) -> dict[str, Any]:
    """The facts of a JAX run that config.json records, with the compiler options of its step."""
    return {"framework": "JAX", "version": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "device": str(devices[0]), "devices": len(devices), "processes": jax.process_count(), "ops": ops,
            "threads": usable_cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "step_compiler_options": step_options}
