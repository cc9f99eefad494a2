"""Process-wide memory settings of an RL run: freed large tensors go back to the system
(glibc's mmap threshold), and oneDNN's bf16 kernel caches hold fewer shapes.

The allocator. glibc serves a request of at least M_MMAP_THRESHOLD bytes with its own
mmap, returned to the system when freed; smaller ones come from its heaps, where freed
space stays resident for reuse. The threshold starts at 128 KiB and, by default, rises to
the size of every mmapped block freed, up to 32 MiB: after the first steps every
activation of an RL update (1-32 MB each) lives in the heaps. Their sizes change with
every step's packed rows, and a step whose tensors fit no free gap grows the heaps by
hundreds of MB that stay: the RL speedrun's GRPO stage held 0.8 GB of live allocations
and 1.5-2.4 GB of free heap space by step 45, and grew in jumps (+0.5 GB at step 43).
A fixed threshold (1 MiB) ends the rise: large tensors are mapped and unmapped, the
resident set follows what is alive. glibc only; elsewhere nothing changes.

The kernel caches. A bf16 matmul on a CPU runs a oneDNN kernel generated for its shapes,
kept in two caches of 1,024 entries (oneDNN's primitive cache and ideep's, torch's
wrapper's): RL's shapes change with every update's rows and every decode batch of the
bf16 evaluation, and each entry holds 0.1-0.5 MB. Both capacities come from environment
variables read once, at the process's first bf16 matmul, so `cap_kernel_caches` only
takes effect before that (`nanoseek grpo`; a process that trained in bf16 first keeps
its caches). Numbers do not depend on either setting: the same kernels run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD = 1 << 20
KERNEL_CACHE_CAPACITY = 256  # entries per cache: one update's shapes (forward and backward) fit
CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def release_large_allocations(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes (see the module docstring) and hand
    back the free heap space earlier work left (an SFT stage in the same process); False
    where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc's own symbol: mallopt's numbers are glibc's
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, threshold) == 1
    libc.malloc_trim(0)
    return done


def cap_kernel_caches(capacity: int = KERNEL_CACHE_CAPACITY) -> None:
    """Ask oneDNN's and ideep's kernel caches for `capacity` entries each, unless the
    environment already sets them (effective only before the process's first bf16 matmul)."""
    for name in CACHE_VARIABLES:
        os.environ.setdefault(name, str(capacity))


def reset_peak() -> bool:
    """Start the process's peak resident set (VmHWM) again from what it holds now, so that
    `peak_rss_mb` is this run's peak, not an earlier stage's in the same process (the RL
    speedrun's SFT). Linux; False where /proc/self/clear_refs cannot be written."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """The process's peak resident memory in MB since `reset_peak` (VmHWM), or since it
    started (ru_maxrss) where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
