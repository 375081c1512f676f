"""The CPUs a run may use, and the memory-page settings its speed depends on, asked in a way
every OS answers.

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
    """The CPU a run's times and float32 results depend on, and the page settings its times
    depend on, for its config.json."""
    return {"cpu": cpu_name(), "vector_extensions": cpu_vector_extensions(), "usable_cores": usable_cpu_count(),
            "huge_pages": huge_page_settings()}


TRANSPARENT_HUGEPAGE_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
HUGE_PAGE_MALLOC = "glibc.malloc.hugetlb=1"
HUGE_PAGE_MALLOC_SINCE = (2, 35)  # the glibc release that added the tunable


def huge_page_settings() -> dict[str, str | None]:
    """What decides whether a step's large buffers come in 4 KiB pages or in huge ones.

    A step allocates its large buffers afresh at every step (XLA:CPU's temporaries unless the
    step's compiler options cut them into heaps; PyTorch's tensors). A buffer larger than the
    largest block glibc's malloc reuses (32 MiB) is mapped from the kernel and unmapped when
    freed, and the kernel faults in and zeroes the fresh memory one page at a time, at every
    step. Huge pages make those faults rare. Linux gives them to glibc's blocks when its
    transparent-huge-page mode is "always", or when it is "madvise" and glibc is asked for them
    (GLIBC_TUNABLES=glibc.malloc.hugetlb=1, glibc 2.35 and later). Other systems answer None
    (docs/speed.md has the measurements)."""
    return {"transparent_hugepages": transparent_hugepage_mode(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}


def transparent_hugepage_mode(setting: Path = TRANSPARENT_HUGEPAGE_MODE) -> str | None:
    """Linux's transparent-huge-page mode (the bracketed word of `setting`: always, madvise or
    never); None where the kernel has no such setting."""
    try:
        text = setting.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def huge_page_advice(settings: dict[str, str | None]) -> str | None:
    """The one setting that would give a step's buffers huge pages, where the kernel gives them
    only on request and glibc is not asked; None where there is nothing to do."""
    present = settings["glibc_tunables"] or ""
    if settings["transparent_hugepages"] != "madvise" or HUGE_PAGE_MALLOC in present:
        return None
    library, version = platform.libc_ver()
    if library != "glibc" or tuple(int(part) for part in version.split(".")[:2]) < HUGE_PAGE_MALLOC_SINCE:
        return None
    return "GLIBC_TUNABLES=" + ":".join(filter(None, (present, HUGE_PAGE_MALLOC)))  # any present kept


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
