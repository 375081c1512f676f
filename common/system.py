"""The CPUs a run may use, asked in a way every OS answers.

Only Linux tells a process which cores it may run on and lets it choose them
(`os.sched_getaffinity` / `os.sched_setaffinity`); macOS and Windows have neither call, so
every use goes through here and has an answer for them too.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def usable_cpus() -> list[int] | None:
    """The ids of the cores this process may run on (Linux); None where the OS does not say."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def usable_cpu_count() -> int:
    """How many cores this process may run on: its affinity on Linux, all cores elsewhere."""
    cpus = usable_cpus()
    return len(cpus) if cpus is not None else os.cpu_count() or 1


def pin_to_cores(count: int) -> bool:
    """Restrict this process to the first `count` of its cores; False where the OS cannot."""
    set_affinity, cpus = getattr(os, "sched_setaffinity", None), usable_cpus()
    if set_affinity is None or cpus is None:
        return False
    set_affinity(0, cpus[:count])
    return True


def cpu_name() -> str:
    """The processor's model name, to stand beside every time and every float32 result: both
    depend on it (the kernels XLA and oneDNN pick differ by instruction set). Linux names it in
    /proc/cpuinfo; elsewhere `platform.processor()` is the best the standard library offers."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


# The vector extensions whose kernels XLA:CPU and oneDNN choose between, narrowest first.
VECTOR_EXTENSIONS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile",
                     "asimd", "sve", "sve2")


def machine_facts() -> dict[str, object]:
    """The CPU a run's times and float32 results depend on, for its config.json."""
    return {"cpu": cpu_name(), "vector_extensions": cpu_vector_extensions(), "usable_cores": usable_cpu_count()}


def cpu_vector_extensions() -> list[str]:
    """Which of `VECTOR_EXTENSIONS` this CPU has: the same model name can come with or without
    AVX-512 (virtual machines hide some), and speed ratios follow the extensions. Linux lists them
    in /proc/cpuinfo ("flags" on x86, "Features" on Arm); other systems answer [] here."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return []
    for line in cpuinfo.read_text().splitlines():
        if line.startswith(("flags", "Features")):
            present = set(line.split(":", 1)[1].split())
            return [name for name in VECTOR_EXTENSIONS if name in present]
    return []
