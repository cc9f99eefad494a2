"""The machine a benchmark ran on, recorded in its --json output: a figure means little
without the CPU (and whether it has fast bf16), the cores the process could use, the torch
build and how loaded the machine was."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform

# the CPU flags that decide what runs fast here: bf16 matmuls (AMX, AVX512-BF16) and the
# vector width fp32 kernels use
FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")


def cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str, set[str] | None]:
    """(model name, flags) of the first CPU; (platform's name, None) where there is no cpuinfo."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return platform.processor() or platform.machine() or "unknown", None
    fields = dict(line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return fields.get("model name", platform.machine() or "unknown"), set(fields.get("flags", "").split())


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def cores() -> int:
    """CPUs this process may run on (its affinity), not the host's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_info(load_at_start: float | None = None) -> dict:
    """What the results page prints about the machine; `load_at_start` is the 1-minute load
    average when the benchmark began (the one now is its end's)."""
    model, flags = cpuinfo()
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": model, "cpu_flags": None if flags is None else {f: f in flags for f in FLAGS}, "cores": cores(),
            "torch": version("torch"), "transformers": version("transformers"),
            "python": platform.python_version(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average_1min_start": load_at_start, "load_average_1min_end": load_average()}
