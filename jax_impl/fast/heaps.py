"""Where XLA:CPU keeps the training step's temporaries: in heaps that malloc reuses.

The one XLA option this project sets, chosen here for every step loop that takes it (jax_impl.train,
benchmarks' JAX and NNX split/merge trainers) and recorded in config.json as
`step_compiler_options`. `nnx.jit` takes no compiler options, so nnx_impl's step keeps XLA's
defaults. Measurements: docs/speed.md, "Temporary heaps".
"""

from __future__ import annotations

# Under glibc's 32 MiB ceiling on the blocks it keeps for reuse, with room for alignment.
CPU_HEAP_BYTES = 24 * 2**20
# The largest batch whose every buffer fits in such a heap, plain or fast layers; XLA logs a
# warning for each buffer that does not, which still gets a block of its own.
CPU_HEAP_MAX_BATCH = 512


def step_compiler_options(platform: str, batch_size: int) -> dict[str, int]:
    """XLA's options for the training step of `batch_size` images on `platform`. XLA:CPU gives a
    program's temporaries one block, allocated at each call and freed after it; glibc hands a
    block over 32 MiB back to the kernel when it is freed, so the next step faults it in again, a
    page per 4 KiB. Cut into heaps under that size, the blocks
    are reused, and the step computes the same bits. Only the step of the step loop gets them:
    jaxlib cannot store a program of several heaps in its persistent compilation cache, and the
    step is the program that runs thousands of times. Accelerators draw every buffer from a pool
    of their own and keep XLA's default."""
    if platform != "cpu" or batch_size > CPU_HEAP_MAX_BATCH:
        return {}
    return {"xla_multiheap_size_constraint_per_heap": CPU_HEAP_BYTES}
