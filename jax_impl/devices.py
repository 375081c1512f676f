"""Where a JAX run computes: --device, --threads, and the facts config.json records."""

from __future__ import annotations

import sys
from typing import Any

import flax
import jax
import optax

from common.errors import UserFacingError
from common.system import pin_to_cores, usable_cpu_count


def limit_threads(threads: int | None) -> None:
    """--threads: pin the process to that many cores. XLA sizes its CPU thread pool from the
    cores the process may use when the backend starts, so this must run before first use."""
    if threads and not pin_to_cores(threads):
        raise UserFacingError(
            f"--threads {threads}: JAX's CPU backend sizes its thread pool from the cores the process may "
            f"run on, and only Linux lets a program choose them ({sys.platform} does not). Leave --threads "
            "out here: XLA then uses every core.")


def select_device(choice: str) -> jax.Device:
    """--device: auto -> JAX's default backend (a GPU or TPU when present), cpu, or gpu."""
    if choice == "cpu":
        return jax.devices("cpu")[0]
    if choice == "auto":
        return jax.devices()[0]
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:
        raise UserFacingError("--device gpu: JAX sees no GPU here (is jax[cuda] installed?); "
                              "use --device cpu or auto.") from None


def describe(device: jax.Device, ops: str) -> dict[str, Any]:
    """The facts of a JAX run that config.json records."""
    return {"framework": "JAX", "version": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "device": str(device), "ops": ops, "threads": usable_cpu_count()}
