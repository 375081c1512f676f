"""Seconds JAX has spent tracing, lowering and compiling in this process, and the persistent
cache that spares a second run most of them.

Read from the events JAX reports through `jax.monitoring` rather than by compiling each
function ahead of time by hand, so that the training code calls its jitted functions plainly
and compile time is still reported apart from run time. Loading a program from the persistent
compilation cache counts as compiling (it is the cost a first step pays instead).
"""

from __future__ import annotations

import os
import warnings

import jax

from common.mnist import DEFAULT_DATA_DIR

COMPILE_EVENTS = frozenset({
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
    "/jax/compilation_cache/cache_retrieval_time_sec",
})
_seconds = [0.0]


def _record(event: str, duration: float, **_: object) -> None:
    if event in COMPILE_EVENTS:
        _seconds[0] += duration


jax.monitoring.register_event_duration_secs_listener(_record)


def compile_seconds() -> float:
    """Total so far; callers take differences around the work they time."""
    return _seconds[0]


def enable_compilation_cache() -> None:
    """Persist every compiled program (they take seconds to build, milliseconds to load), except
    a CPU step whose temporaries XLA cut into several heaps (jax_impl.fast.heaps):
    jaxlib cannot store one, so it compiles at every start, and the warning that it was not stored
    would repeat at every start with nothing for the user to do."""
    cache_dir = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(DEFAULT_DATA_DIR.parent / "era-s6-jax-cache"))
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    warnings.filterwarnings("ignore", message="Error writing persistent compilation cache entry .*"
                            "Multiple temp buffer allocations found")
